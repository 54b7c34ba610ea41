"""CNN + LSTM image captioner in the style of Show and Tell (Vinyals et al. 2015, 1411.4555).

A ResNet encoder (`ResNet.features` + global average pool) gives one image vector; a Linear
(`image_embedding`) maps it to the word-embedding size and it is the LSTM's first input
(t = -1); the caption's word embeddings (`seq_embedding`) follow, and a Linear (`logits`)
maps the LSTM outputs of the caption steps to the vocabulary (the output of the image step
predicts nothing, as in the paper). Sizes and names follow the authors' TensorFlow release,
im2txt (tensorflow/models research/im2txt, `configuration.py` and `show_and_tell_model.py`):
512-wide embeddings and LSTM, a 12,000-word vocabulary, an image embedding without bias, and
dropout (keep probability 0.7) on the LSTM's inputs and outputs. Two deliberate differences:
the encoder is a ResNet (im2txt uses Inception v3), and `nn.LSTM` carries two bias vectors
per layer (b_ih and b_hh; TensorFlow's LSTM cell has one), 4 x hidden more parameters.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import inputs
from .registry import register_family, register_flavour
from .resnet import ResNet, ResNetConfig


@dataclass(frozen=True)
class CaptionerConfig:
    """A ResNet encoder feeding an LSTM language model (Show and Tell)."""

    encoder: ResNetConfig = field(default_factory=ResNetConfig)
    """The ResNet encoder (its fc is dropped); its `image_size` is the input size and its
    `num_classes` is not used."""
    embed_dim: int = 512
    """Word-embedding size, also the image embedding's and the LSTM input's (im2txt 512)."""
    hidden: int = 512
    """LSTM hidden size (im2txt `num_lstm_units` 512; the paper's 512-unit memory)."""
    lstm_layers: int = 1
    """Stacked LSTM layers (1 in the paper and im2txt)."""
    vocab: int = 12000
    """Vocabulary size, unknown-word token included (im2txt `vocab_size` 12000: MSCOCO words
    seen at least 4 times, rounded up)."""
    caption_len: int = 17
    """Caption tokens fed per sample: <start> + up to 16 words (the 16-word cap of the
    widely used MSCOCO caption preprocessing, Karpathy's neuraltalk2 `prepro.py`); the LSTM
    runs caption_len + 1 steps, the image first."""
    dropout: float = 0.3
    """Dropout on the LSTM inputs and outputs (im2txt `lstm_dropout_keep_prob` 0.7), and
    between stacked LSTM layers."""

    def validate(self) -> None:
        """Raise ValueError naming the field that breaks a rule."""
        self.encoder.validate()
        for name in ("embed_dim", "hidden", "lstm_layers", "vocab", "caption_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"captioner: {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"captioner: dropout must be in [0, 1), got {self.dropout}")


class Captioner(nn.Module):
    """(images (B, 3, H, W), caption ids (B, T)) -> next-word logits (B, T, vocab)."""

    def __init__(self, cfg: CaptionerConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = ResNet(cfg.encoder)
        del self.encoder.fc  # features + global average pool only
        self.image_embedding = nn.Linear(cfg.encoder.out_channels, cfg.embed_dim, bias=False)
        self.seq_embedding = nn.Embedding(cfg.vocab, cfg.embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(cfg.embed_dim, cfg.hidden, cfg.lstm_layers, batch_first=True,
                            dropout=cfg.dropout if cfg.lstm_layers > 1 else 0.0)
        self.logits = nn.Linear(cfg.hidden, cfg.vocab)

    def forward(self, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        feats = self.encoder.avgpool(self.encoder.features(images)).flatten(1)  # (B, C)
        image = self.image_embedding(feats).unsqueeze(1)                        # (B, 1, E)
        words = self.seq_embedding(captions)                                    # (B, T, E)
        x = self.dropout(torch.cat((image, words), dim=1))                      # (B, T+1, E)
        out, _ = self.lstm(x)                                                   # (B, T+1, H)
        return self.logits(self.dropout(out[:, 1:]))                            # (B, T, V)


def captioner_inputs(cfg: CaptionerConfig, batch: int, device) -> tuple[torch.Tensor, ...]:
    """Seeded images (B, 3, S, S) and caption token ids (B, caption_len) in [0, vocab)."""
    (images,) = inputs.images(batch, cfg.encoder.image_size, device)
    (captions,) = inputs.tokens(cfg.vocab, cfg.caption_len, batch, device)
    return images, captions


register_family("captioner", CaptionerConfig, Captioner, captioner_inputs,
                "CNN + LSTM image captioner (Show and Tell)")

register_flavour("captioner-r50", "captioner", CaptionerConfig(),
                 "Vinyals et al. 2015 (arXiv 1411.4555) Sec. 3 and 4.3; im2txt "
                 "(tensorflow/models research/im2txt configuration.py) sizes; ResNet-50 "
                 "encoder (He et al. 2016, torchvision layout) in place of Inception v3")
register_flavour("captioner-tiny", "captioner",
                 CaptionerConfig(encoder=ResNetConfig(stages=(1, 1, 1, 1), width=8,
                                                      image_size=64),
                                 embed_dim=16, hidden=32, lstm_layers=2, vocab=50,
                                 caption_len=6),
                 "tiny CPU flavour of this project (resnet-tiny encoder, 2 LSTM layers)")
