"""Ring attention for context parallelism over point-to-point sends (CPU gloo and CUDA nccl).

PyTorch's `context_parallel` only shards CUDA attention kernels (see
shared/notes/torch-distributed-on-cpu.md), so the runner uses this implementation on every
device. The algorithm is the one of Liu et al., "Ring Attention with Blockwise Transformers for
Near-Infinite Context" (arXiv:2310.01889), with the block merge by log-sum-exp of Milakov and
Gimelshein, "Online normalizer calculation for softmax" (arXiv:1805.02867), and the backward of
FlashAttention (Dao et al., arXiv:2205.14135, Algorithm 4) applied block by block, as in
zhuzilin/ring-flash-attention (`ring_flash_attn/ring_flash_attn.py`).

Layout: rank r of the context-parallel group holds the contiguous sequence positions
[r * S_local, (r + 1) * S_local) of q, k and v. Load balancing (zig-zag shards that give every
rank the same causal work) is not implemented: with contiguous shards and a causal mask, rank r
computes r + 1 of the W blocks while every rank still relays all W - 1 K/V blocks, so the last
rank sets the pace. The runner shards with `shard_sequence`, which keeps this layout.

Forward: K and V (stacked into one buffer, with their own kv heads, never repeated for GQA)
travel around the ring, to the next rank and from the previous one, W - 1 times; the transfer of
the next block overlaps the computation on the current one. Each block's partial output and
log-sum-exp merge into the running result. Backward: with the saved global log-sum-exp, each
block's contribution to dQ is local, and the dK/dV accumulators travel around the ring one step
behind the K/V blocks they belong to, W sends in all, so that each arrives back at its owner.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

_KV_TAG = 1
"""P2P tag of K/V block transfers (gloo matches messages by tag; nccl ignores tags)."""
_DKV_TAG = 2
"""P2P tag of dK/dV accumulator transfers, distinct so concurrent transfers never cross."""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics and gradient accumulators stay in float32 for 16-bit inputs."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _group_info(group: dist.ProcessGroup | None) -> tuple[dist.ProcessGroup, int, int, int, int]:
    """(group, rank in group, group size, global rank of next, global rank of previous)."""
    group = dist.group.WORLD if group is None else group
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    nxt = dist.get_global_rank(group, (rank + 1) % world)
    prv = dist.get_global_rank(group, (rank - 1) % world)
    return group, rank, world, nxt, prv


def _start_shift(send: torch.Tensor, group: dist.ProcessGroup, nxt: int, prv: int, tag: int):
    """Send `send` to the next rank and receive a same-shaped tensor from the previous one.

    Returns (receive buffer, list of works to wait on).
    """
    recv = torch.empty_like(send)
    ops = [dist.P2POp(dist.isend, send, nxt, group, tag), dist.P2POp(dist.irecv, recv, prv, group, tag)]
    return recv, dist.batch_isend_irecv(ops)


def _wait(works) -> None:
    """Wait for every work of a batch of point-to-point operations."""
    for w in works:
        w.wait()


def _block_forward(q5, k, v, scale: float, diagonal: bool):
    """Attention of a query shard on one K/V block.

    q5: (B, Hkv, G, S, D), G = query heads per kv head; k, v: (B, Hkv, Sk, D).
    Returns the block's normalised output (B, Hkv, G, S, D) and log-sum-exp (B, Hkv, G, S).
    `diagonal` applies the causal mask of a block against itself (same positions).
    """
    s = torch.matmul(q5, k.unsqueeze(2).transpose(-1, -2)) * scale  # (B, Hkv, G, S, Sk)
    if diagonal:
        s = s.masked_fill(_upper_mask(s), float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    p = torch.exp(s - m)
    den = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, v.unsqueeze(2)) / den
    return out, (m + torch.log(den)).squeeze(-1)


def _upper_mask(s: torch.Tensor) -> torch.Tensor:
    """True strictly above the diagonal of the last two dims: keys after the query."""
    n_q, n_k = s.shape[-2], s.shape[-1]
    return torch.ones(n_q, n_k, dtype=torch.bool, device=s.device).triu(1)


def _block_backward(q5, k, v, dout5, lse, delta, scale: float, diagonal: bool):
    """Gradients of one K/V block, given the global log-sum-exp of the queries.

    q5, dout5: (B, Hkv, G, S, D); k, v: (B, Hkv, Sk, D); lse, delta: (B, Hkv, G, S) where
    delta = rowsum(dout * out). Returns dq5 (B, Hkv, G, S, D) and dk, dv (B, Hkv, Sk, D), the
    latter summed over the G query heads that share each kv head.
    """
    k5, v5 = k.unsqueeze(2), v.unsqueeze(2)
    s = torch.matmul(q5, k5.transpose(-1, -2)) * scale
    p = torch.exp(s - lse.unsqueeze(-1))  # softmax against the global normaliser
    if diagonal:
        p = p.masked_fill(_upper_mask(p), 0.0)
    dv = torch.matmul(p.transpose(-1, -2), dout5).sum(dim=2)
    dp = torch.matmul(dout5, v5.transpose(-1, -2))
    ds = p * (dp - delta.unsqueeze(-1))
    dq5 = torch.matmul(ds, k5) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q5).sum(dim=2) * scale
    return dq5, dk, dv


class _RingAttention(torch.autograd.Function):
    """Ring attention with a ring backward (never autograd through the sends)."""

    @staticmethod
    def forward(ctx, q, k, v, group, causal: bool, scale: float):
        """Attention of the local query shard over every rank's K/V shard."""
        group, rank, world, nxt, prv = _group_info(group)
        b, h, s_local, d = q.shape
        h_kv = k.shape[1]
        cdt = _compute_dtype(q.dtype)
        q5 = q.to(cdt).reshape(b, h_kv, h // h_kv, s_local, d)
        kv = torch.stack((k, v)).contiguous()  # travels in the input dtype
        out = lse = None
        for step in range(world):
            src = (rank - step) % world  # the rank whose K/V block is held at this step
            works = None
            if step + 1 < world:
                kv_next, works = _start_shift(kv, group, nxt, prv, _KV_TAG)
            if not (causal and src > rank):  # later positions are masked out entirely
                blk_out, blk_lse = _block_forward(q5, kv[0].to(cdt), kv[1].to(cdt), scale, causal and src == rank)
                if out is None:
                    out, lse = blk_out, blk_lse
                else:
                    new_lse = torch.logaddexp(lse, blk_lse)
                    out = (torch.exp(lse - new_lse).unsqueeze(-1) * out
                           + torch.exp(blk_lse - new_lse).unsqueeze(-1) * blk_out)
                    lse = new_lse
            if works is not None:
                _wait(works)
                kv = kv_next
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.causal, ctx.scale = group, causal, scale
        return out.reshape(b, h, s_local, d).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        """Rotate K/V (one step ahead) and the dK/dV accumulators (one step behind)."""
        q, k, v, out5, lse = ctx.saved_tensors
        group, causal, scale = ctx.group, ctx.causal, ctx.scale
        group, rank, world, nxt, prv = _group_info(group)
        b, h, s_local, d = q.shape
        h_kv = k.shape[1]
        cdt = _compute_dtype(q.dtype)
        q5 = q.to(cdt).reshape(b, h_kv, h // h_kv, s_local, d)
        dout5 = dout.to(cdt).reshape(out5.shape)
        delta = (dout5 * out5).sum(dim=-1)  # (B, Hkv, G, S)
        dq5 = torch.zeros_like(q5)
        kv = torch.stack((k, v)).contiguous()
        dkv_recv, dkv_works = None, None
        for step in range(world):
            src = (rank - step) % world
            kv_works = None
            if step + 1 < world:
                kv_next, kv_works = _start_shift(kv, group, nxt, prv, _KV_TAG)
            blk = None
            if not (causal and src > rank):
                dq_blk, dk_blk, dv_blk = _block_backward(
                    q5, kv[0].to(cdt), kv[1].to(cdt), dout5, lse, delta, scale, causal and src == rank)
                dq5 += dq_blk
                blk = torch.stack((dk_blk, dv_blk))
            if dkv_works is not None:  # the accumulator of block `src`, from the previous rank
                _wait(dkv_works)
                dkv = dkv_recv if blk is None else dkv_recv + blk
            else:
                dkv = blk if blk is not None else torch.zeros((2,) + k.shape, dtype=cdt, device=k.device)
            dkv_recv, dkv_works = _start_shift(dkv.contiguous(), group, nxt, prv, _DKV_TAG)
            if kv_works is not None:
                _wait(kv_works)
                kv = kv_next
        _wait(dkv_works)  # after W shifts each accumulator is back at the owner of its block
        dq = dq5.reshape(q.shape).to(q.dtype)
        return dq, dkv_recv[0].to(k.dtype), dkv_recv[1].to(v.dtype), None, None, None


def _single_rank_ring(q, k, v, causal: bool, scale: float) -> torch.Tensor:
    """Group of one rank: the same block maths with autograd, and no communication."""
    b, h, s_local, d = q.shape
    cdt = _compute_dtype(q.dtype)
    q5 = q.to(cdt).reshape(b, k.shape[1], h // k.shape[1], s_local, d)
    out, _ = _block_forward(q5, k.to(cdt), v.to(cdt), scale, causal)
    return out.reshape(q.shape).to(q.dtype)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> None:
    """Raise ValueError naming the argument and the shape rule it breaks."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"ring_attention: {name} must be 4-D (B, H, S_local, D), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"ring_attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"ring_attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"ring_attention: batch of q ({q.shape[0]}) and k ({k.shape[0]}) must be equal")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"ring_attention: S_local of q ({q.shape[2]}) and k ({k.shape[2]}) must be equal "
                         "(self-attention over equal shards)")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"ring_attention: head dim of q ({q.shape[3]}) and k ({k.shape[3]}) must be equal")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"ring_attention: q heads ({q.shape[1]}) must be divisible by k heads ({k.shape[1]})")
    if scale is not None and not scale > 0:
        raise ValueError(f"ring_attention: scale must be > 0, got {scale}")


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None,
                   causal: bool, scale: float | None = None) -> torch.Tensor:
    """Exact softmax attention over a sequence sharded across a context-parallel group.

    q: (B, H, S_local, D), k and v: (B, H_kv, S_local, D) with H divisible by H_kv (grouped-query
    attention with the semantics of `scaled_dot_product_attention(..., enable_gqa=True)`: query
    head i uses kv head i // (H / H_kv)). Rank r of `group` (the default group when None) holds
    global positions [r * S_local, (r + 1) * S_local). `causal` masks keys after each query by
    global position; `scale` defaults to 1 / sqrt(D). Returns this rank's output shard
    (B, H, S_local, D), differentiable in q, k and v; every rank of the group must call it with
    the same shapes, `causal` and `scale`.
    """
    _check_inputs(q, k, v, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if dist.get_world_size(dist.group.WORLD if group is None else group) == 1:
        return _single_rank_ring(q, k, v, causal, scale)
    return _RingAttention.apply(q, k, v, group, causal, scale)


def shard_sequence(x: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s contiguous shard of `x` along `dim`: positions [rank * n, (rank + 1) * n), n = len / world.

    The layout `ring_attention` expects. Returns a contiguous tensor (a view when the slice
    already is contiguous), differentiable like any slice.
    """
    if world < 1:
        raise ValueError(f"shard_sequence: world must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"shard_sequence: rank must be in 0..world-1 ({world - 1}), got {rank}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"shard_sequence: dim must be in -{x.dim()}..{x.dim() - 1}, got {dim}")
    length = x.shape[dim]
    if length % world:
        raise ValueError(f"shard_sequence: length of dim {dim} ({length}) must be divisible by world ({world})")
    n = length // world
    return x.narrow(dim, rank * n, n).contiguous()


class _GatherSequence(torch.autograd.Function):
    """All-gather of sequence shards; backward keeps this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, dim: int, group):
        """Concatenate every rank's shard along `dim`, in group-rank order."""
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.dim, ctx.rank, ctx.n = dim, dist.get_rank(group), x.shape[dim]
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        """The gathered tensor is replicated, so its gradient is too: take the local slice."""
        return grad.narrow(ctx.dim, ctx.rank * ctx.n, ctx.n).contiguous(), None, None


def gather_sequence(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Full tensor from every rank's contiguous shard along `dim` (inverse of `shard_sequence`).

    Every rank of `group` (the default group when None) gets the whole tensor. Differentiable
    with replicated-output semantics (as DTensor's Shard -> Replicate): every rank is assumed to
    compute the same loss from the result, so the gradient of the local shard is the local
    slice of the incoming gradient, with no communication.
    """
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"gather_sequence: dim must be in -{x.dim()}..{x.dim() - 1}, got {dim}")
    group = dist.group.WORLD if group is None else group
    return _GatherSequence.apply(x, dim % x.dim(), group)
