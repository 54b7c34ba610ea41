"""Pieces shared by the transformer builders: the pre-norm block and the MoE layer.

Layer names match the modules of `workbench.models.layers` and `workbench.models.moe`, so the
analytic graph and the traced graph line up name by name.
"""
from __future__ import annotations

from ...models.moe import expert_capacity
from ..graph import GraphBuilder


def add_block(b: GraphBuilder, prefix: str, unit: int, batch: int, seq: int, dim: int,
              heads: int, ffn: int, causal: bool, moe: dict | None = None,
              dropout: float = 0.0) -> None:
    """`workbench.models.layers.Block`: LN, fused-QKV attention, LN, GELU MLP (or MoE), and
    with `dropout` > 0 the hidden dropouts (attention dropout runs inside the attention op)."""
    tokens = batch * seq
    hd = dim // heads
    seq_op = dict(unit=unit, tp="sequence", cp=True)
    b.add(f"{prefix}.ln_1", "norm", elements=tokens * dim, channels=dim, **seq_op)
    b.add(f"{prefix}.attn.qkv", "linear", tokens=tokens, in_features=dim, out_features=3 * dim,
          unit=unit, tp="column", cp=True)
    b.add(f"{prefix}.attn.sdpa", "attention", batch=batch, heads=heads, q_len=seq, kv_len=seq,
          head_dim=hd, causal=causal, unit=unit, tp="heads", cp=True)
    b.add(f"{prefix}.attn.proj", "linear", tokens=tokens, in_features=dim, out_features=dim,
          unit=unit, tp="row", cp=True)
    if dropout:
        b.add(f"{prefix}.attn_dropout", "dropout", elements=tokens * dim, **seq_op)
    b.add(f"{prefix}.attn_residual", "elementwise", elements=tokens * dim, inputs=2,
          saves_input=False, **seq_op)
    b.add(f"{prefix}.ln_2", "norm", elements=tokens * dim, channels=dim, **seq_op)
    if moe is not None:
        add_moe(b, f"{prefix}.mlp", unit, tokens, dim, ffn, **moe)
    else:
        b.add(f"{prefix}.mlp.fc1", "linear", tokens=tokens, in_features=dim, out_features=ffn,
              unit=unit, tp="column", cp=True)
        b.add(f"{prefix}.mlp.act", "elementwise", elements=tokens * ffn, flops_per_element=8,
              unit=unit, tp="column", cp=True)
        b.add(f"{prefix}.mlp.fc2", "linear", tokens=tokens, in_features=ffn, out_features=dim,
              unit=unit, tp="row", cp=True)
    if dropout:
        b.add(f"{prefix}.mlp_dropout", "dropout", elements=tokens * dim, **seq_op)
    b.add(f"{prefix}.mlp_residual", "elementwise", elements=tokens * dim, inputs=2,
          saves_input=False, **seq_op)


def add_moe(b: GraphBuilder, prefix: str, unit: int, tokens: int, dim: int, ffn: int,
            experts: int, top_k: int, capacity_factor: float, gated: bool, bias: bool) -> None:
    """`workbench.models.moe.MoE`: router linear + top-k routing, then capacity-padded experts.

    Each expert runs `capacity` slots whatever the routing, so FLOPs are
    experts x capacity x (2 or 3 matmuls of dim x ffn). Tensor parallelism leaves the whole
    block on every TP rank (experts are split by EP instead, as the runner's TP plan does):
    its ops are `replicate`, the gate `gathered` (with sequence parallelism the block's input
    is all-gathered and its output split again).
    """
    cap = expert_capacity(tokens, experts, top_k, capacity_factor)
    b.add(f"{prefix}.gate", "linear", tokens=tokens, in_features=dim, out_features=experts,
          bias=False, unit=unit, tp="gathered", cp=True)
    b.add(f"{prefix}.router", "moe_router", tokens=tokens, experts=experts, top_k=top_k,
          unit=unit, tp="replicate", cp=True)
    up = dict(batch=experts, m=cap, k=dim, n=ffn, params=True, unit=unit, tp="replicate", ep=True)
    b.add(f"{prefix}.experts.w1", "batched_matmul", bias=bias, **up)
    if gated:
        b.add(f"{prefix}.experts.w3", "batched_matmul", **up)
    b.add(f"{prefix}.experts.act", "elementwise", elements=experts * cap * ffn,
          flops_per_element=8, unit=unit, tp="replicate", ep=True)
    b.add(f"{prefix}.experts.w2", "batched_matmul", batch=experts, m=cap, k=ffn, n=dim,
          params=True, bias=bias, unit=unit, tp="replicate", ep=True)
    b.add(f"{prefix}.combine", "elementwise", elements=top_k * tokens * dim, flops_per_element=2,
          unit=unit, tp="replicate", cp=True)
