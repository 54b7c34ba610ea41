"""AlexNet (Krizhevsky, Sutskever & Hinton 2012), the one-tower variant torchvision ships.

Layout and module names follow torchvision's `alexnet` (which follows Krizhevsky's "One weird
trick" paper, arXiv 1404.5997: 64-192-384-256-256 convolutions, no local response norm):
`features.{i}` conv/ReLU/max-pool Sequential, `avgpool` = AdaptiveAvgPool2d(6), `classifier.{i}`
= Dropout, Linear 9216-4096, ReLU, Dropout, Linear 4096-4096, ReLU, Linear 4096-1000. Its
parameter count is torchvision's published `num_params` for `AlexNet_Weights.IMAGENET1K_V1`:
61,100,840.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import inputs
from .registry import register_family, register_flavour

# (kernel, stride, padding, max pool after) of the five convolutions (torchvision alexnet.py).
CONV_SPECS: tuple[tuple[int, int, int, bool], ...] = (
    (11, 4, 2, True), (5, 1, 2, True), (3, 1, 1, False), (3, 1, 1, False), (3, 1, 1, True))
POOL_KERNEL, POOL_STRIDE = 3, 2
"""Overlapping 3x3 stride-2 max pooling (Krizhevsky et al. 2012, section 3.4)."""


@dataclass(frozen=True)
class AlexNetConfig:
    """AlexNet: five convolutions (kernels 11, 5, 3, 3, 3) and three fully connected layers."""

    widths: tuple[int, ...] = (64, 192, 384, 256, 256)
    """Output channels of the five convolutions."""
    fc_width: int = 4096
    """Width of the two hidden fully connected layers."""
    num_classes: int = 1000
    """Output classes (ImageNet-1k)."""
    image_size: int = 224
    """Height and width of the (square) input images."""
    in_channels: int = 3
    """Input image channels (RGB)."""
    pool_output: int = 6
    """Side of the AdaptiveAvgPool2d output the classifier reads (6 in torchvision)."""
    dropout: float = 0.5
    """Dropout probability before the first and second fully connected layers."""

    def feature_size(self) -> int:
        """Side of the feature map after the last max pool (6 for 224x224 images)."""
        s = self.image_size
        for kernel, stride, padding, pool in CONV_SPECS:
            s = (s + 2 * padding - kernel) // stride + 1
            if pool:
                s = (s - POOL_KERNEL) // POOL_STRIDE + 1
        return s

    def validate(self) -> None:
        """Raise ValueError naming the field that breaks a shape rule."""
        if len(self.widths) != len(CONV_SPECS) or any(w < 1 for w in self.widths):
            raise ValueError(f"alexnet: widths must be {len(CONV_SPECS)} positive channel counts, "
                             f"got {self.widths}")
        for name in ("fc_width", "num_classes", "in_channels", "pool_output"):
            if getattr(self, name) < 1:
                raise ValueError(f"alexnet: {name} must be >= 1, got {getattr(self, name)}")
        if self.image_size < 1 or self.feature_size() < 1:
            raise ValueError(f"alexnet: image_size ({self.image_size}) leaves the last max pool "
                             f"no input; it must be >= 63")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"alexnet: dropout must be in [0, 1), got {self.dropout}")


class AlexNet(nn.Module):
    """Images (B, C, H, W) -> logits (B, num_classes)."""

    def __init__(self, cfg: AlexNetConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        layers: list[nn.Module] = []
        c = cfg.in_channels
        for width, (kernel, stride, padding, pool) in zip(cfg.widths, CONV_SPECS):
            layers += [nn.Conv2d(c, width, kernel, stride=stride, padding=padding),
                       nn.ReLU(inplace=True)]
            if pool:
                layers.append(nn.MaxPool2d(POOL_KERNEL, POOL_STRIDE))
            c = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(cfg.pool_output)
        self.classifier = nn.Sequential(
            nn.Dropout(cfg.dropout), nn.Linear(c * cfg.pool_output ** 2, cfg.fc_width),
            nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout), nn.Linear(cfg.fc_width, cfg.fc_width), nn.ReLU(inplace=True),
            nn.Linear(cfg.fc_width, cfg.num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))             # (B, 256, 6, 6)
        return self.classifier(torch.flatten(x, 1))    # (B, num_classes)


register_family("alexnet", AlexNetConfig, AlexNet,
                lambda cfg, batch, device: inputs.images(batch, cfg.image_size, device,
                                                         cfg.in_channels),
                "AlexNet CNN classifier (torchvision one-tower layout)")

register_flavour("alexnet", "alexnet", AlexNetConfig(),
                 "Krizhevsky et al. 2012 (NeurIPS) and arXiv 1404.5997; torchvision.models.alexnet "
                 "(num_params 61,100,840)")
register_flavour("alexnet-tiny", "alexnet", AlexNetConfig(widths=(8, 16, 16, 16, 16), fc_width=64,
                                                          num_classes=10, image_size=96,
                                                          pool_output=2),
                 "tiny CPU flavour of this project")
