"""Llama-style decoder: RMSNorm, SwiGLU, RoPE, grouped-query attention; dense or MoE.

Layout and names follow Meta's reference `llama/model.py` and torchtitan (`tok_embeddings`,
`layers.{i}.attention.wq`, `feed_forward.w1/w2/w3`, `norm`, `output`), so parameter counts
are the published ones (Llama 3 8B: 8,030,261,248; Mixtral 8x7B: 46,702,792,704).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import apply_rope, rope_tables
from .moe import MoE
from . import inputs
from .registry import register_family, register_flavour


@dataclass(frozen=True)
class LlamaConfig:
    """A Llama-style decoder (dense when `experts` is 0)."""

    layers: int = 32
    """Transformer blocks."""
    hidden: int = 4096
    """Model width (d_model)."""
    heads: int = 32
    """Query heads."""
    kv_heads: int = 8
    """Key/value heads (grouped-query attention); equal to `heads` for plain MHA."""
    ffn: int = 14336
    """SwiGLU inner width (per expert for MoE)."""
    vocab: int = 128256
    """Vocabulary size."""
    seq: int = 8192
    """Training sequence length (tokens per sample)."""
    rope_theta: float = 500000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    experts: int = 0
    """Experts per MoE layer; 0 makes every feed-forward dense."""
    top_k: int = 2
    """Experts each token is routed to (MoE only)."""
    capacity_factor: float = 1.0
    """Expert capacity over the mean load (MoE only); 1.0 = exactly top_k x tokens / experts."""

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden // self.heads

    def validate(self) -> None:
        """Raise ValueError naming the field that breaks a shape rule."""
        for name in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "seq"):
            if getattr(self, name) < 1:
                raise ValueError(f"llama: {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"llama: hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.head_dim % 2:
            raise ValueError(f"llama: hidden/heads ({self.head_dim}) must be even for RoPE")
        if self.heads % self.kv_heads:
            raise ValueError(f"llama: heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})")
        if self.experts and not 1 <= self.top_k <= self.experts:
            raise ValueError(f"llama: top_k ({self.top_k}) must be in 1..experts ({self.experts})")
        if self.experts and self.capacity_factor <= 0:
            raise ValueError(f"llama: capacity_factor must be > 0, got {self.capacity_factor}")


class Attention(nn.Module):
    """Grouped-query attention with rotary embeddings and a causal mask, no biases."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.hidden, cfg.heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.heads * cfg.head_dim, cfg.hidden, bias=False)
        self.attention_fn = F.scaled_dot_product_attention  # the runner's CP swaps this

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        # -1 heads: under tensor parallelism a rank holds heads / tp of them.
        q = self.wq(x).view(b, s, -1, self.head_dim).transpose(1, 2)   # (B, nh, S, hs)
        k = self.wk(x).view(b, s, -1, self.head_dim).transpose(1, 2)   # (B, nkv, S, hs)
        v = self.wv(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = self.attention_fn(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x) (Shazeer 2020)."""

    def __init__(self, dim: int, ffn: int):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn, bias=False)
        self.w2 = nn.Linear(ffn, dim, bias=False)
        self.w3 = nn.Linear(dim, ffn, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """x + attention(norm(x)), then + feed_forward(norm(x)) (dense or MoE)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        if cfg.experts:
            self.feed_forward = MoE(cfg.hidden, cfg.ffn, cfg.experts, cfg.top_k,
                                    cfg.capacity_factor, gated=True, bias=False)
        else:
            self.feed_forward = FeedForward(cfg.hidden, cfg.ffn)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """Token ids (B, S) -> logits (B, S, vocab)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.seq, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, self.rope_cos, self.rope_sin)
        return self.output(self.norm(h))



register_family("llama", LlamaConfig, Llama,
                lambda cfg, batch, device: inputs.tokens(cfg.vocab, cfg.seq, batch, device),
                "Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA), dense or MoE")

_LLAMA3 = "Llama 3 herd paper (Dubey et al. 2024, arXiv 2407.21783) Table 3; Meta llama3 model.py"
register_flavour("llama3-8b", "llama", LlamaConfig(), _LLAMA3)
register_flavour("llama3-70b", "llama", LlamaConfig(layers=80, hidden=8192, heads=64,
                                                    ffn=28672), _LLAMA3)
register_flavour("llama3-405b", "llama", LlamaConfig(layers=126, hidden=16384, heads=128,
                                                     ffn=53248), _LLAMA3)
register_flavour("llama-tiny", "llama", LlamaConfig(layers=2, hidden=64, heads=4, kv_heads=2,
                                                    ffn=128, vocab=256, seq=32),
                 "tiny CPU flavour of this project")
register_flavour("mixtral-8x7b", "llama", LlamaConfig(vocab=32000, seq=4096, rope_theta=1e6,
                                                      experts=8, top_k=2),
                 "Mixtral of Experts (Jiang et al. 2024, arXiv 2401.04088) Table 1")
register_flavour("llama-moe-tiny", "llama", LlamaConfig(layers=2, hidden=64, heads=4, kv_heads=2,
                                                        ffn=96, vocab=256, seq=32, experts=4,
                                                        top_k=2),
                 "tiny CPU flavour of this project")
