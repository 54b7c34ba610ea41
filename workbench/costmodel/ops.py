"""Per-op cost formulas, one pure shape function per op kind, in a registry.

Both the analytic graph builders and the meta-device tracer turn an op into an `OpCost`
through these functions, so that the two graphs can only differ in the shapes they see.

Conventions (DESIGN.md):
- A multiply-add is 2 FLOPs.
- `counted` ops are the ones `torch.utils.flop_counter.FlopCounterMode` counts (matmul,
  convolution, attention, LSTM gates); their FLOPs mirror its formulas exactly, quirks
  included, so tests can compare them to the real module. Other ops (norms, pooling,
  elementwise, embedding lookups) are still costed here, with simple per-element counts
  that FlopCounterMode never sees.
- `saved_bytes` is what autograd keeps for backward (at `dtype_bytes` per element);
  `read_bytes` and `write_bytes` are the forward pass's memory traffic (inputs and weights in,
  output out), the roofline's memory side.

NB: the grouped-convolution weight gradient is counted `groups` times the forward, as
FlopCounterMode's `conv_backward_flop` does (it uses the full input channels as the batch).
NB: attention is counted dense: a causal mask does not halve it (neither does FlopCounterMode,
nor the MFU definitions of Megatron-LM or PaLM).
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Callable

__all__ = ["OpCost", "REGISTRY", "register", "cost"]


@dataclass(frozen=True)
class OpCost:
    """What one op costs for the shapes it was given."""

    fwd_flops: int
    """Forward FLOPs (multiply-add = 2)."""
    bwd_flops: int
    """Backward FLOPs: input gradient (when the input needs one) plus weight gradient."""
    params: int
    """Trainable parameters the op owns."""
    saved_bytes: int
    """Activation bytes autograd saves for the backward pass."""
    read_bytes: int
    """Bytes the forward pass reads (inputs and weights)."""
    write_bytes: int
    """Bytes the forward pass writes (outputs)."""
    counted: bool
    """True for the op kinds FlopCounterMode counts (matmul, conv, attention, LSTM)."""


REGISTRY: dict[str, Callable[..., OpCost]] = {}


def register(kind: str):
    """Register a formula under an op kind; a kind may be registered once only."""

    def wrap(fn):
        if kind in REGISTRY:
            raise ValueError(f"op kind {kind!r} is registered twice")
        REGISTRY[kind] = fn
        return fn

    return wrap


def cost(kind: str, **shape) -> OpCost:
    """The `OpCost` of op `kind` for keyword `shape` arguments (see each formula)."""
    try:
        fn = REGISTRY[kind]
    except KeyError:
        raise ValueError(f"unknown op kind {kind!r}; known: {sorted(REGISTRY)}") from None
    return fn(**shape)


def _mm_flops(m: int, k: int, n: int) -> int:
    """FLOPs of an (m, k) x (k, n) matrix product."""
    return 2 * m * k * n


@register("linear")
def linear(tokens: int, in_features: int, out_features: int, bias: bool = True,
           input_grad: bool = True, dtype_bytes: int = 2) -> OpCost:
    """y = x W^T + b over `tokens` rows. Backward: weight grad, plus input grad if needed."""
    fwd = _mm_flops(tokens, in_features, out_features)
    return OpCost(
        fwd_flops=fwd,
        bwd_flops=fwd * (2 if input_grad else 1),
        params=in_features * out_features + (out_features if bias else 0),
        saved_bytes=tokens * in_features * dtype_bytes,
        read_bytes=(tokens * in_features + in_features * out_features) * dtype_bytes,
        write_bytes=tokens * out_features * dtype_bytes,
        counted=True,
    )


@register("batched_matmul")
def batched_matmul(batch: int, m: int, k: int, n: int, params: bool = False, bias: bool = False,
                   input_grad: bool = True, dtype_bytes: int = 2) -> OpCost:
    """`batch` independent (m, k) x (k, n) products (MoE experts: one per expert).

    `params` when the right side is a learned weight, `bias` when a learned (batch, n) bias is
    added (its add is not a matmul and is not counted).
    """
    fwd = batch * _mm_flops(m, k, n)
    return OpCost(
        fwd_flops=fwd,
        bwd_flops=fwd * (2 if input_grad else 1),
        params=(batch * k * n if params else 0) + (batch * n if bias else 0),
        saved_bytes=batch * (m * k + (0 if params else k * n)) * dtype_bytes,
        read_bytes=batch * (m * k + k * n) * dtype_bytes,
        write_bytes=batch * m * n * dtype_bytes,
        counted=True,
    )


@register("conv")
def conv(batch: int, in_channels: int, out_channels: int, kernel: tuple[int, ...],
         in_spatial: tuple[int, ...], out_spatial: tuple[int, ...], groups: int = 1,
         bias: bool = True, transposed: bool = False, input_grad: bool = True,
         dtype_bytes: int = 2) -> OpCost:
    """1-, 2- or 3-D convolution (or transposed convolution), as FlopCounterMode counts it.

    Forward = 2 x batch x prod(spatial) x C_in/groups x C_out x prod(kernel), where spatial is
    the output for a convolution and the input for a transposed one (each input pixel is
    scattered through the kernel). Input grad = forward; weight grad = groups x forward.
    """
    spatial = in_spatial if transposed else out_spatial
    fwd = 2 * batch * prod(spatial) * (in_channels // groups) * out_channels * prod(kernel)
    weights = in_channels // groups * out_channels * prod(kernel)
    in_elems = batch * in_channels * prod(in_spatial)
    out_elems = batch * out_channels * prod(out_spatial)
    return OpCost(
        fwd_flops=fwd,
        bwd_flops=(fwd if input_grad else 0) + fwd * groups,
        params=weights + (out_channels if bias else 0),
        saved_bytes=in_elems * dtype_bytes,
        read_bytes=(in_elems + weights) * dtype_bytes,
        write_bytes=out_elems * dtype_bytes,
        counted=True,
    )


@register("attention")
def attention(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int,
              kv_heads: int | None = None, causal: bool = False, dtype_bytes: int = 2) -> OpCost:
    """softmax(Q K^T / sqrt(d)) V per head, fused (flash-style) kernel.

    Forward = QK^T + AV = 2 x (2 b h s_q s_kv d); backward = 8 b h s_q s_kv d (dV, dP, dQ, dK),
    as FlopCounterMode's sdpa formulas. Saved: Q, K, V, the output and the per-row log-sum-exp
    (fp32); K and V have `kv_heads` heads (grouped-query attention).
    """
    kv_heads = kv_heads or heads
    fwd = 2 * _mm_flops(batch * heads * q_len, head_dim, kv_len)
    q_bytes = batch * heads * q_len * head_dim * dtype_bytes
    kv_bytes = 2 * batch * kv_heads * kv_len * head_dim * dtype_bytes
    lse_bytes = batch * heads * q_len * 4
    return OpCost(
        fwd_flops=fwd,
        bwd_flops=2 * fwd,
        params=0,
        saved_bytes=2 * q_bytes + kv_bytes + lse_bytes,
        read_bytes=q_bytes + kv_bytes,
        write_bytes=q_bytes,
        counted=True,
    )


@register("lstm")
def lstm(batch: int, seq: int, input_size: int, hidden: int, bias: bool = True,
         input_grad: bool = True, dtype_bytes: int = 2) -> OpCost:
    """One LSTM layer over `seq` steps, as PyTorch's CPU kernel (mkldnn off) runs it.

    The input projection of all steps is one (seq x batch, input) x (input, 4h) product; each
    step adds an (batch, h) x (h, 4h) product. Backward: weight grads of both, the input grad
    of the input projection when the input needs one, and the hidden-state grad of every step
    but the first (h_0 is a constant zero state).
    """
    gates = 4 * hidden
    fwd_ih = _mm_flops(seq * batch, input_size, gates)
    fwd_hh_step = _mm_flops(batch, hidden, gates)
    fwd = fwd_ih + seq * fwd_hh_step
    bwd = fwd_ih * (2 if input_grad else 1) + seq * fwd_hh_step + (seq - 1) * fwd_hh_step
    weights = gates * (input_size + hidden) + (2 * gates if bias else 0)
    # Saved per step: the input, h_{t-1}, c_{t-1}, the 4 gate activations and tanh(c_t).
    saved = seq * batch * (input_size + 2 * hidden + gates + hidden) * dtype_bytes
    return OpCost(
        fwd_flops=fwd,
        bwd_flops=bwd,
        params=weights,
        saved_bytes=saved,
        read_bytes=(seq * batch * input_size + weights) * dtype_bytes,
        write_bytes=seq * batch * hidden * dtype_bytes,
        counted=True,
    )


@register("norm")
def norm(elements: int, channels: int, affine_params: int = 2, dtype_bytes: int = 2) -> OpCost:
    """LayerNorm, RMSNorm, BatchNorm or GroupNorm over `elements` values.

    `affine_params` learned vectors of length `channels` (2 for weight and bias, 1 for
    RMSNorm). About 5 FLOPs an element forward (mean, variance, normalise, scale, shift) and
    twice that backward; the input is saved.
    """
    return OpCost(
        fwd_flops=5 * elements,
        bwd_flops=10 * elements,
        params=affine_params * channels,
        saved_bytes=elements * dtype_bytes,
        read_bytes=elements * dtype_bytes,
        write_bytes=elements * dtype_bytes,
        counted=False,
    )


@register("elementwise")
def elementwise(elements: int, flops_per_element: int = 1, inputs: int = 1,
                saves_input: bool = True, dtype_bytes: int = 2) -> OpCost:
    """Activation, residual add, softmax, scaling, RoPE: `flops_per_element` per output value."""
    return OpCost(
        fwd_flops=flops_per_element * elements,
        bwd_flops=flops_per_element * elements,
        params=0,
        saved_bytes=elements * dtype_bytes if saves_input else 0,
        read_bytes=inputs * elements * dtype_bytes,
        write_bytes=elements * dtype_bytes,
        counted=False,
    )


@register("dropout")
def dropout(elements: int, dtype_bytes: int = 2) -> OpCost:
    """Dropout: a random mask (1 byte an element, saved for backward) applied with scaling."""
    return OpCost(
        fwd_flops=2 * elements,
        bwd_flops=elements,
        params=0,
        saved_bytes=elements,
        read_bytes=elements * dtype_bytes,
        write_bytes=elements * (dtype_bytes + 1),
        counted=False,
    )


@register("pool")
def pool(batch: int, channels: int, kernel: tuple[int, ...], in_spatial: tuple[int, ...],
         out_spatial: tuple[int, ...], dtype_bytes: int = 2) -> OpCost:
    """Max or average pooling (adaptive pools pass their effective window as `kernel`)."""
    out_elems = batch * channels * prod(out_spatial)
    in_elems = batch * channels * prod(in_spatial)
    return OpCost(
        fwd_flops=out_elems * prod(kernel),
        bwd_flops=out_elems * prod(kernel),
        params=0,
        saved_bytes=in_elems * dtype_bytes,
        read_bytes=in_elems * dtype_bytes,
        write_bytes=out_elems * dtype_bytes,
        counted=False,
    )


@register("embedding")
def embedding(tokens: int, num_embeddings: int, dim: int, dtype_bytes: int = 2) -> OpCost:
    """Table lookup of `tokens` rows of width `dim`; no FLOPs, the indices are saved."""
    return OpCost(
        fwd_flops=0,
        bwd_flops=0,
        params=num_embeddings * dim,
        saved_bytes=tokens * 8,
        read_bytes=tokens * dim * dtype_bytes,
        write_bytes=tokens * dim * dtype_bytes,
        counted=False,
    )


@register("parameter")
def parameter(elements: int, dtype_bytes: int = 2) -> OpCost:
    """A free-standing learned tensor (class token, position table, DETR queries)."""
    return OpCost(0, 0, elements, 0, elements * dtype_bytes, 0, counted=False)


@register("moe_router")
def moe_router(tokens: int, experts: int, top_k: int, dtype_bytes: int = 2) -> OpCost:
    """Softmax over expert logits, top-k choice and capacity bookkeeping (the router's linear
    projection is a separate `linear` op). A handful of FLOPs per token and expert."""
    elements = tokens * experts
    return OpCost(
        fwd_flops=5 * elements,
        bwd_flops=5 * elements,
        params=0,
        saved_bytes=elements * 4 + tokens * top_k * 8,
        read_bytes=elements * dtype_bytes,
        write_bytes=tokens * top_k * (dtype_bytes + 8),
        counted=False,
    )
