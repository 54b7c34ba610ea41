"""Mixture-of-experts layer with top-k routing and a fixed expert capacity.

Shared by ViT-MoE (V-MoE, Riquelme et al. 2021: GELU experts with biases, capacity factor)
and the Llama MoE variant (Mixtral-style SwiGLU experts without biases).

Capacity makes the compute shape static: every expert processes exactly
`capacity = ceil(top_k x tokens x capacity_factor / experts)` slots per call (GShard, Lepikhin
et al. 2020), tokens past an expert's capacity are dropped (their MoE output is zero) and
empty slots are padding. So FLOPs do not depend on the routing, and the same graph holds on
the meta device, on a CPU and on a GPU. Dispatch and combine are gathers and scatters (no
one-hot matmuls), so the counted FLOPs are the experts' batched matmuls and the router.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def expert_capacity(tokens: int, experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(top_k x tokens x capacity_factor / experts), at least 1."""
    return max(1, math.ceil(top_k * tokens * capacity_factor / experts))


class Experts(nn.Module):
    """`num_experts` independent MLPs applied to a (E, C, dim) buffer with batched matmuls.

    gated=True: SwiGLU, w2(silu(x w1) * (x w3)) (Llama/Mixtral). gated=False: w2(gelu(x w1 + b1))
    + b2 (V-MoE).
    """

    def __init__(self, num_experts: int, dim: int, ffn: int, gated: bool, bias: bool):
        super().__init__()
        self.gated = gated
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, ffn))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn, dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, ffn)) if gated else None
        self.b1 = nn.Parameter(torch.zeros(num_experts, 1, ffn)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, 1, dim)) if bias else None
        for w in (self.w1, self.w2, self.w3):
            if w is not None:
                nn.init.normal_(w, std=dim ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (E, C, dim)
        h = torch.bmm(x, self.w1)
        if self.b1 is not None:
            h = h + self.b1
        if self.gated:
            h = F.silu(h) * torch.bmm(x, self.w3)
        else:
            h = F.gelu(h)
        y = torch.bmm(h, self.w2)
        return y + self.b2 if self.b2 is not None else y


class MoE(nn.Module):
    """Router (`gate`, a bias-free linear) + top-k dispatch with capacity + `experts`."""

    def __init__(self, dim: int, ffn: int, num_experts: int, top_k: int,
                 capacity_factor: float, gated: bool, bias: bool):
        super().__init__()
        self.num_experts, self.top_k, self.capacity_factor = num_experts, top_k, capacity_factor
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.experts = Experts(num_experts, dim, ffn, gated, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (S, d): S tokens
        tokens, e, k = x.shape[0], self.num_experts, self.top_k
        cap = expert_capacity(tokens, e, k, self.capacity_factor)
        probs = self.gate(x).float().softmax(dim=-1)            # (S, E)
        weight, expert = probs.topk(k, dim=-1)                   # (S, k)
        # Priority: every token's first choice before any second choice (V-MoE, GShard).
        expert = expert.t().reshape(-1)                           # (k*S,)
        weight = weight.t().reshape(-1)
        onehot = torch.zeros(k * tokens, e, device=x.device).scatter_(1, expert[:, None], 1.0)
        position = ((onehot.cumsum(0) - 1) * onehot).sum(1).long()  # slot within its expert
        kept = position < cap
        slot = torch.where(kept, expert * cap + position, torch.full_like(position, e * cap))
        source = x.repeat(k, 1)                                   # (k*S, d)
        buffer = x.new_zeros(e * cap + 1, shape[-1]).index_add(0, slot, source)
        out = self.experts(buffer[: e * cap].view(e, cap, -1)).reshape(e * cap, -1)
        out = torch.cat([out, out.new_zeros(1, out.shape[-1])])  # the overflow slot yields 0
        combined = out[slot] * (weight * kept).to(out.dtype)[:, None]
        return combined.view(k, tokens, -1).sum(0).view(shape)
