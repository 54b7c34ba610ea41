"""C3D exactly as Tran et al. 2015 ("Learning Spatiotemporal Features with 3D Convolutional
Networks", arXiv 1412.0767, Sec. 3.3 and Fig. 3) and its PyTorch port of the Sports-1M Caffe
model (github.com/DavideA/c3d-pytorch, `C3D_model.py`).

Eight 3x3x3 convolutions (stride 1, padding 1) in five stages of 64, 128, 256x2, 512x2, 512x2
channels, each stage closed by a max pool (pool1 1x2x2, the others 2x2x2; pool5 pads the
spatial dims by 1 as the port does to reproduce Caffe's ceil rounding, so a 16x112x112 clip
leaves 512x1x4x4 = 8192 features), then fc6 4096, fc7 4096 (ReLU, dropout 0.5) and fc8 over the
487 Sports-1M classes. Module names follow the port (`conv3a`, `pool5`, `fc6`), so its weights
load unchanged. The forward returns logits (the port ends in a softmax).

Pipeline units are the 8 convolutional layers (each with its ReLU and, when it closes a stage,
its pool); the classifier (fc6..fc8) is after the last unit. Its input, as every video
model's here, is clips (B, 3, T, H, W) (`inputs.clips`).
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch
from torch import nn

from . import inputs
from .registry import register_family, register_flavour


@dataclass(frozen=True)
class C3DConfig:
    """A C3D-style plain 3D CNN: stages of 3x3x3 convolutions, each closed by a max pool."""

    widths: tuple[int, ...] = (64, 128, 256, 512, 512)
    """Output channels of the convolutions of each stage."""
    convs: tuple[int, ...] = (1, 1, 2, 2, 2)
    """Convolutions per stage (named `conv{s}` when one, `conv{s}a`, `conv{s}b`... when more)."""
    fc: int = 4096
    """Width of the two hidden fully connected layers."""
    num_classes: int = 487
    """Classifier outputs (487 Sports-1M classes)."""
    frames: int = 16
    """Clip length T in frames."""
    image_size: int = 112
    """Frame height and width in pixels."""
    dropout: float = 0.5
    """Dropout probability after fc6 and fc7."""

    def pool_shapes(self) -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
        """(kernel = stride, padding) of each stage's max pool, as in the reference port."""
        last = len(self.widths) - 1
        return [((1, 2, 2) if s == 0 else (2, 2, 2), (0, 1, 1) if s == last else (0, 0, 0))
                for s in range(len(self.widths))]

    def feature_shape(self) -> tuple[int, int, int]:
        """(T, H, W) after the last pool; a convolution keeps the size (3x3x3, padding 1)."""
        size = [self.frames, self.image_size, self.image_size]
        for kernel, pad in self.pool_shapes():
            size = [(n + 2 * p - k) // k + 1 for n, k, p in zip(size, kernel, pad)]
        return tuple(size)

    @property
    def flat_features(self) -> int:
        """Inputs of fc6: channels x T x H x W after the last pool (8192 for C3D)."""
        return self.widths[-1] * prod(self.feature_shape())

    def validate(self) -> None:
        """Raise ValueError naming the field that breaks a rule."""
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"c3d: widths must be positive channel counts, got {self.widths}")
        if len(self.convs) != len(self.widths) or min(self.convs) < 1:
            raise ValueError(f"c3d: convs must give >= 1 convolution for each of the "
                             f"{len(self.widths)} stages in widths, got {self.convs}")
        if max(self.convs) > 26:
            raise ValueError("c3d: convs allows at most 26 convolutions a stage (names a..z)")
        for name in ("fc", "num_classes", "frames", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"c3d: {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"c3d: dropout must be in [0, 1), got {self.dropout}")
        t, h, _ = self.feature_shape()
        if t < 1:
            raise ValueError(f"c3d: frames={self.frames} leaves no frame after the "
                             f"{len(self.widths)} pools (each pool but pool1 halves time)")
        if h < 1:
            raise ValueError(f"c3d: image_size={self.image_size} leaves no pixel after the "
                             f"{len(self.widths)} pools (each halves height and width)")


def conv_names(cfg: C3DConfig) -> list[list[str]]:
    """Module names of the convolutions, per stage (`conv1`, `conv2`, `conv3a`, `conv3b`...)."""
    return [[f"conv{s + 1}"] if n == 1 else [f"conv{s + 1}{chr(97 + i)}" for i in range(n)]
            for s, n in enumerate(cfg.convs)]


def fc_names(cfg: C3DConfig) -> tuple[str, str, str]:
    """Names of the three fully connected layers (`fc6`, `fc7`, `fc8` for five stages)."""
    s = len(cfg.widths)
    return f"fc{s + 1}", f"fc{s + 2}", f"fc{s + 3}"


class C3D(nn.Module):
    """Clips (B, 3, T, H, W) -> logits (B, num_classes)."""

    def __init__(self, cfg: C3DConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.stages: list[tuple[list[str], str]] = []
        cin = 3
        for s, (names, width, (kernel, pad)) in enumerate(
                zip(conv_names(cfg), cfg.widths, cfg.pool_shapes())):
            for name in names:
                self.add_module(name, nn.Conv3d(cin, width, 3, 1, 1))
                cin = width
            self.add_module(f"pool{s + 1}", nn.MaxPool3d(kernel, kernel, pad))
            self.stages.append((names, f"pool{s + 1}"))
        self.fc_names = fc_names(cfg)
        hidden, out, head = self.fc_names
        self.add_module(hidden, nn.Linear(cfg.flat_features, cfg.fc))
        self.add_module(out, nn.Linear(cfg.fc, cfg.fc))
        self.add_module(head, nn.Linear(cfg.fc, cfg.num_classes))
        self.dropout = nn.Dropout(cfg.dropout)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for names, pool in self.stages:
            for name in names:
                x = self.relu(getattr(self, name)(x))
            x = getattr(self, pool)(x)                      # (B, C, T', H', W')
        x = torch.flatten(x, 1)                             # (B, 8192) for C3D
        hidden, out, head = self.fc_names
        x = self.dropout(self.relu(getattr(self, hidden)(x)))
        x = self.dropout(self.relu(getattr(self, out)(x)))
        return getattr(self, head)(x)



register_family("c3d", C3DConfig, C3D,
                lambda cfg, batch, device: inputs.clips(batch, cfg.frames, cfg.image_size, device),
                "C3D plain 3D CNN video classifier (8 conv3d 3x3x3, 3 fully connected)")

register_flavour("c3d", "c3d", C3DConfig(),
                 "Tran et al. 2015 (arXiv 1412.0767) Sec. 3.3 / Fig. 3, Sports-1M model; "
                 "PyTorch port github.com/DavideA/c3d-pytorch C3D_model.py (pool5 padding 0,1,1)")
register_flavour("c3d-tiny", "c3d", C3DConfig(widths=(8, 16, 32, 32, 32), fc=64, num_classes=10,
                                              image_size=32),
                 "tiny CPU flavour of this project")
