"""Analytic graph of `workbench.models.detr.DETR`.

Pipeline units, in order: the backbone's residual blocks (`sum(backbone.stages)`), then the
encoder layers, then the decoder layers. The backbone holds most of the FLOPs (86% of the
counted forward of DETR-R50 at 800x1216), so units limited to the transformer layers would
leave a pipeline's first stage with nearly all the work; with the residual blocks as units
too, a pipeline can balance. `input_proj` and the positional encoding go with the first
encoder unit, the query embedding with the first decoder unit, and the decoder's final norm,
the heads and the loss on the last stage. Every decoder unit reads the encoder memory and
the positional encoding, and the last stage reads every decoder layer's output (the heads
run on all of them), so a pipeline split inside the decoder forwards those tensors along
with the activations.
"""
from __future__ import annotations

from dataclasses import asdict
from math import prod

from ...models.detr import DetrConfig
from ...models.resnet import block_plan
from ..graph import POST_UNIT, GraphBuilder, LayerGraph, make_layer
from . import graph_builder
from .common import FeatureMap
from .resnet import add_resnet_features


def _freeze_norms(b: GraphBuilder, prefix: str) -> None:
    """Make the norms under `prefix` FrozenBatchNorm2d: no trainable affine parameters."""
    b.layers = [make_layer(l.name, "norm", unit=l.unit, tp=l.tp,
                           **{**l.shape, "affine_params": 0})
                if l.kind == "norm" and l.name.startswith(prefix) else l for l in b.layers]


def _ew(b: GraphBuilder, name: str, elements: int, unit: int, tp: str = "replicate",
        **kw) -> None:
    """An elementwise op (activation, dropout, residual or positional add)."""
    b.add(name, "elementwise", elements=elements, unit=unit, tp=tp, **kw)


def _add_attention(b: GraphBuilder, p: str, unit: int, batch: int, q_len: int, kv_len: int,
                   d: int, heads: int, v_input_grad: bool = True) -> None:
    """`DetrAttention`: q/k/v projections (column), fused attention (heads), out_proj (row)."""
    tq, tk = batch * q_len, batch * kv_len
    col = dict(unit=unit, tp="column")
    b.add(f"{p}.q_proj", "linear", tokens=tq, in_features=d, out_features=d, **col)
    b.add(f"{p}.k_proj", "linear", tokens=tk, in_features=d, out_features=d, **col)
    b.add(f"{p}.v_proj", "linear", tokens=tk, in_features=d, out_features=d,
          input_grad=v_input_grad, **col)
    b.add(f"{p}.sdpa", "attention", batch=batch, heads=heads, q_len=q_len, kv_len=kv_len,
          head_dim=d // heads, unit=unit, tp="heads")
    b.add(f"{p}.out_proj", "linear", tokens=tq, in_features=d, out_features=d, unit=unit,
          tp="row")


def _add_ffn(b: GraphBuilder, p: str, unit: int, tokens: int, d: int, ffn: int,
             dropout: str, norm: str) -> None:
    """linear1, ReLU, dropout, linear2, then `dropout`, residual add and `norm` (post-norm)."""
    col, row = dict(unit=unit, tp="column"), dict(unit=unit, tp="row")
    b.add(f"{p}.linear1", "linear", tokens=tokens, in_features=d, out_features=ffn, **col)
    _ew(b, f"{p}.relu", tokens * ffn, unit, tp="column")
    _ew(b, f"{p}.dropout", tokens * ffn, unit, tp="column")
    b.add(f"{p}.linear2", "linear", tokens=tokens, in_features=ffn, out_features=d, **row)
    _ew(b, f"{p}.{dropout}", tokens * d, unit)
    _ew(b, f"{p}.ffn_residual", tokens * d, unit, inputs=2, saves_input=False)
    b.add(f"{p}.{norm}", "norm", elements=tokens * d, channels=d, unit=unit, tp="replicate")


def _post_attention(b: GraphBuilder, p: str, unit: int, tokens: int, d: int, i: int) -> None:
    """dropout{i} on the attention output, residual add, norm{i}."""
    _ew(b, f"{p}.dropout{i}", tokens * d, unit)
    _ew(b, f"{p}.residual{i}", tokens * d, unit, inputs=2, saves_input=False)
    b.add(f"{p}.norm{i}", "norm", elements=tokens * d, channels=d, unit=unit, tp="replicate")


@graph_builder(DetrConfig)
def detr_graph(cfg: DetrConfig, batch: int, dtype_bytes: int) -> LayerGraph:
    """Backbone blocks, encoder layers and decoder layers as units; heads on the last stage."""
    b = GraphBuilder(dtype_bytes)
    d, heads, q = cfg.hidden, cfg.heads, cfg.num_queries
    image = FeatureMap(batch, 3, tuple(cfg.image_size), requires_grad=False)
    fm = add_resnet_features(b, cfg.backbone, image, prefix="backbone.")
    _freeze_norms(b, "backbone.")
    first_enc = len(block_plan(cfg.backbone))
    first_dec = first_enc + cfg.encoder_layers
    fm = fm.conv(b, "input_proj", d, 1, unit=first_enc if cfg.encoder_layers else first_dec)
    s = prod(fm.spatial)          # memory tokens per image: H/32 x W/32
    t, tq = batch * s, batch * q  # memory tokens, query tokens
    _ew(b, "position_embedding", s * d, first_enc if cfg.encoder_layers else first_dec,
        flops_per_element=2, saves_input=False)
    for i in range(cfg.encoder_layers):
        u, p = first_enc + i, f"transformer.encoder.layers.{i}"
        _ew(b, f"{p}.pos_add", t * d, u, inputs=2, saves_input=False)
        _add_attention(b, f"{p}.self_attn", u, batch, s, s, d, heads)
        _post_attention(b, p, u, t, d, 1)
        _add_ffn(b, p, u, t, d, cfg.ffn, "dropout2", "norm2")
    b.add("query_embed", "embedding", tokens=q, num_embeddings=q, dim=d, unit=first_dec)
    for i in range(cfg.decoder_layers):
        u, p = first_dec + i, f"transformer.decoder.layers.{i}"
        _ew(b, f"{p}.query_pos_add", tq * d, u, inputs=2, saves_input=False)
        # Layer 0's target is zeros, so its value projection needs no input gradient.
        _add_attention(b, f"{p}.self_attn", u, batch, q, q, d, heads, v_input_grad=i > 0)
        _post_attention(b, p, u, tq, d, 1)
        _ew(b, f"{p}.cross_query_pos_add", tq * d, u, inputs=2, saves_input=False)
        _ew(b, f"{p}.memory_pos_add", t * d, u, inputs=2, saves_input=False)
        _add_attention(b, f"{p}.multihead_attn", u, batch, q, s, d, heads)
        _post_attention(b, p, u, tq, d, 2)
        _add_ffn(b, p, u, tq, d, cfg.ffn, "dropout3", "norm3")
    hs = cfg.decoder_layers * tq  # the heads run on every decoder layer's output
    post = dict(unit=POST_UNIT, tp="replicate")
    b.add("transformer.decoder.norm", "norm", elements=hs * d, channels=d, **post)
    b.add("class_embed", "linear", tokens=hs, in_features=d, out_features=cfg.num_classes + 1,
          **post)
    for j, (fan_in, fan_out) in enumerate([(d, d), (d, d), (d, 4)]):
        b.add(f"bbox_embed.layers.{j}", "linear", tokens=hs, in_features=fan_in,
              out_features=fan_out, **post)
        if j < 2:
            _ew(b, f"bbox_embed.relu{j}", hs * fan_out, POST_UNIT)
    _ew(b, "bbox_embed.sigmoid", hs * 4, POST_UNIT, flops_per_element=4)
    # Set loss per decoder layer: class cross-entropy over Q x (C + 1), L1 + GIoU on boxes.
    _ew(b, "loss", hs * (cfg.num_classes + 1 + 4), POST_UNIT, flops_per_element=4)
    return LayerGraph(model="", family="detr", layers=b.layers, batch=batch,
                      units=first_dec + cfg.decoder_layers, heads=heads, kv_heads=heads,
                      dtype_bytes=dtype_bytes, config=asdict(cfg))
