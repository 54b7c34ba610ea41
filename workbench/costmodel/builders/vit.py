"""Analytic graph of `workbench.models.vit.VisionTransformer` (and, through `vit_layers`,
of the V-MoE variant)."""
from __future__ import annotations

from typing import Callable

from ...models.vit import ViTConfig
from ..graph import POST_UNIT, PRE_UNIT, GraphBuilder, LayerGraph
from . import graph_builder
from .common import FeatureMap
from .transformer import add_block


def vit_layers(cfg: ViTConfig, batch: int, dtype_bytes: int,
               moe_for: Callable[[int], dict | None] = lambda i: None) -> list:
    """Layers of a ViT: patch conv, class token and positions, `layers` blocks, final norm,
    head on the class token, loss. `moe_for(i)` gives `add_moe` arguments for block i, or None
    for the dense MLP."""
    b = GraphBuilder(dtype_bytes)
    s, h = cfg.seq, cfg.hidden
    t = batch * s
    images = FeatureMap(batch, 3, (cfg.image_size, cfg.image_size), requires_grad=False)
    images.conv(b, "conv_proj", h, kernel=cfg.patch, stride=cfg.patch)
    b.add("class_token", "parameter", elements=h, unit=PRE_UNIT, tp="replicate")
    b.add("encoder.pos_embedding", "parameter", elements=s * h, unit=PRE_UNIT, tp="replicate")
    # Class token concatenated in front of the patches, then the positions added.
    b.add("encoder.pos_add", "elementwise", elements=t * h, inputs=2, saves_input=False,
          unit=PRE_UNIT, tp="sequence", cp=True)
    for i in range(cfg.layers):
        add_block(b, f"encoder.layers.{i}", i, batch, s, h, cfg.heads, cfg.ffn, causal=False,
                  moe=moe_for(i))
    b.add("encoder.ln", "norm", elements=t * h, channels=h, unit=POST_UNIT, tp="sequence",
          cp=True)
    width = h
    if cfg.representation_size:
        b.add("heads.pre_logits", "linear", tokens=batch, in_features=h,
              out_features=cfg.representation_size, unit=POST_UNIT, tp="replicate")
        b.add("heads.act", "elementwise", elements=batch * cfg.representation_size,
              flops_per_element=4, unit=POST_UNIT, tp="replicate")
        width = cfg.representation_size
    b.add("heads.head", "linear", tokens=batch, in_features=width, out_features=cfg.num_classes,
          unit=POST_UNIT, tp="replicate")
    b.add("loss", "elementwise", elements=batch * cfg.num_classes, flops_per_element=4,
          unit=POST_UNIT, tp="replicate")
    return b.layers


@graph_builder(ViTConfig)
def vit_graph(cfg: ViTConfig, batch: int, dtype_bytes: int) -> LayerGraph:
    """Patch embedding, `layers` pre-norm blocks (non-causal attention, GELU MLP), class-token
    head."""
    return LayerGraph(model="", family="vit", layers=vit_layers(cfg, batch, dtype_bytes),
                      batch=batch, seq=cfg.seq, units=cfg.layers, heads=cfg.heads,
                      kv_heads=cfg.heads, dtype_bytes=dtype_bytes, config=cfg.__dict__.copy())
