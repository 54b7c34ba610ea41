"""LSTM language model (Zaremba, Sutskever, Vinyals 2014, "Recurrent Neural Network
Regularization", arXiv 1409.2329), optionally with tied input/output embeddings (Press & Wolf
2017, "Using the Output Embedding to Improve Language Models", arXiv 1608.05859).

Token ids -> `encoder` (embedding) -> dropout -> stacked `layers` (one single-layer
nn.LSTM each, dropout between them) -> dropout -> `decoder` (linear over the vocabulary), the
layout of the PyTorch port, pytorch/examples `word_language_model/model.py` (`RNNModel`),
with its multi-layer nn.LSTM written as the same layers one module each (the same maths and
parameters, dropout on each output but the last as nn.LSTM applies it), so that FSDP can
shard each layer as a unit. Dropout sits on the non-recurrent connections only, as in the
paper. Penn Treebank setting: 10k vocabulary,
35 unrolled steps; medium = 2 x 650 units (dropout 0.5, init +-0.05), large = 2 x 1500 units
(dropout 0.65, init +-0.04).

Parameters (nn.LSTM keeps two bias vectors per layer, b_ih and b_hh):
medium 10,000 x 650 + 2 x (4 x 650 x (650 + 650) + 2 x 4 x 650) + 650 x 10,000 + 10,000
= 19,780,400 (Press & Wolf's Penn Treebank table: 20M); large 15,000,000 + 2 x 18,012,000
+ 15,010,000 = 66,034,000 (66M); large tied: 66,034,000 - 15,000,000 = 51,034,000 (51M).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import inputs
from .registry import register_family, register_flavour


@dataclass(frozen=True)
class LSTMConfig:
    """A word-level LSTM language model."""

    layers: int = 2
    """Stacked LSTM layers."""
    hidden: int = 650
    """LSTM units per layer."""
    vocab: int = 10000
    """Vocabulary size (Penn Treebank: 10k)."""
    seq: int = 35
    """Unrolled steps per sample (truncated backpropagation length)."""
    embed: int = 650
    """Embedding width (the input of the first LSTM layer)."""
    tied: bool = False
    """Tie the output weight to the embedding (Press & Wolf 2017); needs embed == hidden.
    The output bias stays its own."""
    dropout: float = 0.5
    """Dropout probability on the non-recurrent connections (0.5 medium, 0.65 large)."""
    init_range: float = 0.05
    """Weights are initialised uniformly in [-init_range, init_range] (0.05 medium, 0.04
    large)."""

    def validate(self) -> None:
        """Raise ValueError naming the field that breaks a shape rule."""
        for name in ("layers", "hidden", "vocab", "seq", "embed"):
            if getattr(self, name) < 1:
                raise ValueError(f"lstm: {name} must be >= 1, got {getattr(self, name)}")
        if self.tied and self.embed != self.hidden:
            raise ValueError(f"lstm: tied=True needs embed ({self.embed}) == hidden "
                             f"({self.hidden})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lstm: dropout must be in [0, 1), got {self.dropout}")
        if self.init_range <= 0:
            raise ValueError(f"lstm: init_range must be > 0, got {self.init_range}")


class LSTMLanguageModel(nn.Module):
    """Token ids (B, S) -> logits (B, S, vocab)."""

    def __init__(self, cfg: LSTMConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = nn.Embedding(cfg.vocab, cfg.embed)
        self.drop_in = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            nn.LSTM(cfg.embed if i == 0 else cfg.hidden, cfg.hidden, batch_first=True)
            for i in range(cfg.layers))
        self.drop_between = nn.Dropout(cfg.dropout)
        self.drop_out = nn.Dropout(cfg.dropout)
        self.decoder = nn.Linear(cfg.hidden, cfg.vocab)
        for p in self.parameters():
            nn.init.uniform_(p, -cfg.init_range, cfg.init_range)
        if cfg.tied:
            self.decoder.weight = self.encoder.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        y = self.drop_in(self.encoder(tokens))     # (B, S, E)
        for i, layer in enumerate(self.layers):
            if i:
                y = self.drop_between(y)           # between layers, as nn.LSTM's dropout
            y, _ = layer(y)                        # (B, S, H); h_0 = c_0 = 0
        return self.decoder(self.drop_out(y))      # (B, S, V)


register_family("lstm", LSTMConfig, LSTMLanguageModel,
                lambda cfg, batch, device: inputs.tokens(cfg.vocab, cfg.seq, batch, device),
                "LSTM language model (Zaremba et al. 2014), optionally with tied embeddings")

_ZAREMBA = ("Zaremba, Sutskever, Vinyals 2014 (arXiv 1409.2329) Sec. 4.1, Penn Treebank {} "
            "LSTM; pytorch/examples word_language_model")
register_flavour("lstm-medium", "lstm", LSTMConfig(), _ZAREMBA.format("medium"))
register_flavour("lstm-large", "lstm", LSTMConfig(hidden=1500, embed=1500, dropout=0.65,
                                                  init_range=0.04),
                 _ZAREMBA.format("large"))
register_flavour("lstm-large-tied", "lstm", LSTMConfig(hidden=1500, embed=1500, dropout=0.65,
                                                       init_range=0.04, tied=True),
                 _ZAREMBA.format("large") + "; output weight tied to the embedding (Press & "
                 "Wolf 2017, arXiv 1608.05859, Penn Treebank table: 51M parameters)")
register_flavour("lstm-tiny", "lstm", LSTMConfig(layers=2, hidden=32, vocab=100, seq=8,
                                                 embed=32, dropout=0.1),
                 "tiny CPU flavour of this project")
