"""Analytic graph of `workbench.models.vit_moe.VisionMoE` (V-MoE)."""
from __future__ import annotations

from ...models.vit_moe import ViTMoEConfig
from ..graph import LayerGraph
from . import graph_builder
from .vit import vit_layers


@graph_builder(ViTMoEConfig)
def vit_moe_graph(cfg: ViTMoEConfig, batch: int, dtype_bytes: int) -> LayerGraph:
    """The ViT graph with `add_moe` (router + capacity-padded GELU experts with biases) as the
    MLP of the blocks in `cfg.moe_layers`."""
    moe = dict(experts=cfg.experts, top_k=cfg.top_k, capacity_factor=cfg.capacity_factor,
               gated=False, bias=True)
    moe_layers = set(cfg.moe_layers)
    layers = vit_layers(cfg, batch, dtype_bytes, lambda i: moe if i in moe_layers else None)
    return LayerGraph(model="", family="vit-moe", layers=layers, batch=batch, seq=cfg.seq,
                      units=cfg.layers, heads=cfg.heads, kv_heads=cfg.heads,
                      experts=cfg.experts, dtype_bytes=dtype_bytes,
                      config=cfg.__dict__.copy())
