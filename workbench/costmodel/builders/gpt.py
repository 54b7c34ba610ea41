"""Analytic graph of `workbench.models.gpt.GPT`."""
from __future__ import annotations

from dataclasses import asdict

from ...models.gpt import GPTConfig
from ..graph import POST_UNIT, PRE_UNIT, GraphBuilder, LayerGraph
from . import graph_builder
from .transformer import add_block


@graph_builder(GPTConfig)
def gpt_graph(cfg: GPTConfig, batch: int, dtype_bytes: int) -> LayerGraph:
    """Embeddings (first stage), `layers` pre-norm blocks, final norm and tied head (last)."""
    b = GraphBuilder(dtype_bytes)
    s, h = cfg.seq, cfg.hidden
    t = batch * s
    b.add("wte", "embedding", tokens=t, num_embeddings=cfg.vocab, dim=h, unit=PRE_UNIT,
          tp="vocab", cp=True)
    b.add("wpe", "embedding", tokens=s, num_embeddings=s, dim=h, unit=PRE_UNIT, cp=True)
    b.add("embedding_sum", "elementwise", elements=t * h, inputs=2, saves_input=False,
          unit=PRE_UNIT, tp="sequence", cp=True)
    for i in range(cfg.layers):
        add_block(b, f"h.{i}", i, batch, s, h, cfg.heads, cfg.ffn_width, causal=True,
                  dropout=cfg.dropout)
    b.add("ln_f", "norm", elements=t * h, channels=h, unit=POST_UNIT, tp="sequence", cp=True)
    b.add("lm_head", "linear", tokens=t, in_features=h, out_features=cfg.vocab, bias=False,
          unit=POST_UNIT, tp="vocab", cp=True, tied_to="wte" if cfg.tied else None)
    b.add("loss", "elementwise", elements=t * cfg.vocab, flops_per_element=4, unit=POST_UNIT,
          tp="vocab", cp=True)
    return LayerGraph(model="", family="gpt", layers=b.layers, batch=batch, seq=s,
                      units=cfg.layers, heads=cfg.heads, kv_heads=cfg.heads,
                      dtype_bytes=dtype_bytes, config=asdict(cfg))
