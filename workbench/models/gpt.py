"""GPT decoder in the Megatron-LM layout (Shoeybi et al. 2019; Narayanan et al. 2021).

Learned position embeddings, pre-norm blocks (LayerNorm, fused-QKV causal attention with
biases, GELU MLP), final LayerNorm, output layer tied to the word embedding. Parameters:
V h + s h + l (12 h^2 + 13 h) + 2 h, the count behind Narayanan et al.'s Table 1.
Every dimension is a free parameter (`workbench graph gpt --set layers=96,hidden=12288`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import Block
from . import inputs
from .registry import register_family, register_flavour


@dataclass(frozen=True)
class GPTConfig:
    """A Megatron-style GPT; `ffn` 0 means the usual 4 x hidden."""

    layers: int = 24
    """Transformer blocks."""
    hidden: int = 2304
    """Model width."""
    heads: int = 24
    """Attention heads."""
    ffn: int = 0
    """MLP inner width; 0 means 4 x hidden."""
    vocab: int = 51200
    """Vocabulary (Megatron pads GPT-2's 50,257 to a multiple of 1024)."""
    seq: int = 2048
    """Training sequence length (also the number of learned positions)."""
    dropout: float = 0.0
    """Hidden and attention dropout probability (Megatron-LM's default is 0.1)."""
    tied: bool = True
    """Output layer shares the word embedding's weight (Megatron-LM's default)."""

    @property
    def ffn_width(self) -> int:
        """The MLP inner width actually used."""
        return self.ffn or 4 * self.hidden

    def validate(self) -> None:
        """Raise ValueError naming the field that breaks a shape rule."""
        for name in ("layers", "hidden", "heads", "vocab", "seq"):
            if getattr(self, name) < 1:
                raise ValueError(f"gpt: {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"gpt: dropout must be in [0, 1), got {self.dropout}")
        if self.ffn < 0:
            raise ValueError(f"gpt: ffn must be >= 0 (0 = 4 x hidden), got {self.ffn}")
        if self.hidden % self.heads:
            raise ValueError(f"gpt: hidden ({self.hidden}) must be divisible by heads ({self.heads})")


class GPT(nn.Module):
    """Token ids (B, S) -> logits (B, S, vocab)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.hidden)
        self.wpe = nn.Embedding(cfg.seq, cfg.hidden)
        self.h = nn.ModuleList(Block(cfg.hidden, cfg.heads, cfg.ffn_width, causal=True,
                                     dropout=cfg.dropout) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        if cfg.tied:
            self.lm_head.weight = self.wte.weight  # tied, as Megatron-LM does by default
        self.position_offset = 0  # first position of this rank's sequence shard (CP)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device) + self.position_offset
        x = self.wte(tokens) + self.wpe(positions)  # (B, S, h)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


register_family("gpt", GPTConfig, GPT,
                lambda cfg, batch, device: inputs.tokens(cfg.vocab, cfg.seq, batch, device),
                "Megatron-style GPT decoder with free dimensions")

_MEGATRON = "Narayanan et al. 2021 (arXiv 2104.04473) Table 1"
register_flavour("gpt", "gpt", GPTConfig(), f"{_MEGATRON}, 1.7B row (the family default)")
register_flavour("gpt3-175b", "gpt", GPTConfig(layers=96, hidden=12288, heads=96),
                 "Brown et al. 2020 (arXiv 2005.14165) Table 2.1; Megatron vocab padding")
register_flavour("gpt-1t", "gpt", GPTConfig(layers=128, hidden=25600, heads=160),
                 f"{_MEGATRON}, 1008B row")
register_flavour("gpt-tiny", "gpt", GPTConfig(layers=2, hidden=64, heads=4, vocab=256, seq=32),
                 "tiny CPU flavour of this project")
