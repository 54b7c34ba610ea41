"""Analytic graph of `workbench.models.llama.Llama` (dense and MoE)."""
from __future__ import annotations

from dataclasses import asdict

from ...models.llama import LlamaConfig
from ..graph import POST_UNIT, PRE_UNIT, GraphBuilder, LayerGraph
from . import graph_builder
from .transformer import add_moe


@graph_builder(LlamaConfig)
def llama_graph(cfg: LlamaConfig, batch: int, dtype_bytes: int) -> LayerGraph:
    """Embedding, `layers` x (RMSNorm, GQA attention with RoPE, RMSNorm, SwiGLU or MoE), head."""
    b = GraphBuilder(dtype_bytes)
    s, h, hd = cfg.seq, cfg.hidden, cfg.head_dim
    t = batch * s
    b.add("tok_embeddings", "embedding", tokens=t, num_embeddings=cfg.vocab, dim=h,
          unit=PRE_UNIT, tp="vocab", cp=True)
    for i in range(cfg.layers):
        p = f"layers.{i}"
        seq_op = dict(unit=i, tp="sequence", cp=True)
        col = dict(unit=i, tp="column", cp=True)
        b.add(f"{p}.attention_norm", "norm", elements=t * h, channels=h, affine_params=1, **seq_op)
        b.add(f"{p}.attention.wq", "linear", tokens=t, in_features=h,
              out_features=cfg.heads * hd, bias=False, **col)
        b.add(f"{p}.attention.wk", "linear", tokens=t, in_features=h,
              out_features=cfg.kv_heads * hd, bias=False, **col)
        b.add(f"{p}.attention.wv", "linear", tokens=t, in_features=h,
              out_features=cfg.kv_heads * hd, bias=False, **col)
        b.add(f"{p}.attention.rope", "elementwise", elements=t * (cfg.heads + cfg.kv_heads) * hd,
              flops_per_element=3, **col)
        b.add(f"{p}.attention.sdpa", "attention", batch=batch, heads=cfg.heads, q_len=s,
              kv_len=s, head_dim=hd, kv_heads=cfg.kv_heads, causal=True,
              unit=i, tp="heads", cp=True)
        b.add(f"{p}.attention.wo", "linear", tokens=t, in_features=cfg.heads * hd,
              out_features=h, bias=False, unit=i, tp="row", cp=True)
        b.add(f"{p}.attention_residual", "elementwise", elements=t * h, inputs=2,
              saves_input=False, **seq_op)
        b.add(f"{p}.ffn_norm", "norm", elements=t * h, channels=h, affine_params=1, **seq_op)
        if cfg.experts:
            add_moe(b, f"{p}.feed_forward", i, t, h, cfg.ffn, cfg.experts, cfg.top_k,
                    cfg.capacity_factor, gated=True, bias=False)
        else:
            b.add(f"{p}.feed_forward.w1", "linear", tokens=t, in_features=h,
                  out_features=cfg.ffn, bias=False, **col)
            b.add(f"{p}.feed_forward.w3", "linear", tokens=t, in_features=h,
                  out_features=cfg.ffn, bias=False, **col)
            b.add(f"{p}.feed_forward.swiglu", "elementwise", elements=t * cfg.ffn,
                  flops_per_element=5, inputs=2, **col)
            b.add(f"{p}.feed_forward.w2", "linear", tokens=t, in_features=cfg.ffn,
                  out_features=h, bias=False, unit=i, tp="row", cp=True)
        b.add(f"{p}.ffn_residual", "elementwise", elements=t * h, inputs=2, saves_input=False,
              **seq_op)
    b.add("norm", "norm", elements=t * h, channels=h, affine_params=1, unit=POST_UNIT,
          tp="sequence", cp=True)
    b.add("output", "linear", tokens=t, in_features=h, out_features=cfg.vocab, bias=False,
          unit=POST_UNIT, tp="vocab", cp=True)
    b.add("loss", "elementwise", elements=t * cfg.vocab, flops_per_element=4, unit=POST_UNIT,
          tp="vocab", cp=True)
    return LayerGraph(model="", family="llama", layers=b.layers, batch=batch, seq=s,
                      units=cfg.layers, heads=cfg.heads, kv_heads=cfg.kv_heads,
                      experts=cfg.experts or None, dtype_bytes=dtype_bytes,
                      config=asdict(cfg))
