"""Building blocks shared by the transformer families (GPT, ViT, ViT-MoE, Llama).

Attention always goes through `F.scaled_dot_product_attention` (flash kernels on GPU); the
cost model's `attention` op and the tracer both key on that call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused QKV projection.

    Same parameters as `nn.MultiheadAttention(dim, heads)`: in-projection (3d x d + 3d) and
    output projection (d x d + d). The fused projection's rows are grouped per head
    (q, k, v of head 0, then of head 1, ...: Megatron-LM's layout), so a column-parallel
    split of `qkv` gives each tensor-parallel rank whole heads; the views use -1 heads so
    the same code runs on a rank's local heads. `attention_fn` is the attention kernel
    (`F.scaled_dot_product_attention`; the runner swaps in ring attention for CP).
    """

    def __init__(self, dim: int, heads: int, causal: bool, bias: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        self.head_dim, self.causal, self.dropout = dim // heads, causal, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.attention_fn = F.scaled_dot_product_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, -1, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4)  # each (B, nh, S, hs)
        y = self.attention_fn(q, k, v, is_causal=self.causal,
                              dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    """Linear -> GELU -> Linear (the transformer MLP of GPT and ViT)."""

    def __init__(self, dim: int, ffn: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ffn, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    `mlp` may be replaced (ViT-MoE puts an MoE layer there); `dropout` > 0 adds Megatron's
    hidden dropouts and attention dropout.
    """

    def __init__(self, dim: int, heads: int, ffn: int, causal: bool, eps: float = 1e-5,
                 mlp: nn.Module | None = None, dropout: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SelfAttention(dim, heads, causal, dropout=dropout)
        self.ln_2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = mlp if mlp is not None else MLP(dim, ffn)
        # Megatron-LM's hidden dropout after the attention and MLP outputs (0 = none).
        self.attn_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.mlp_dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_dropout(self.attn(self.ln_1(x)))
        return x + self.mlp_dropout(self.mlp(self.ln_2(x)))


def rope_tables(head_dim: int, seq: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (seq, head_dim/2) of rotary position embeddings (Su et al. 2021)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x (B, nh, S, hs) by the position angles."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[: x.shape[-2]], sin[: x.shape[-2]]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)
