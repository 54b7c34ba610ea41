"""VGG (Simonyan & Zisserman 2014, arXiv 1409.1556), configuration D = VGG-16, no batch norm.

Layout and module names follow torchvision's `vgg16` (`features.{i}` conv/ReLU/max-pool
Sequential, `avgpool` = AdaptiveAvgPool2d(7), `classifier.{i}` = Linear 25088-4096, ReLU,
Dropout, Linear 4096-4096, ReLU, Dropout, Linear 4096-1000), so the parameter count is
torchvision's published `num_params` for `VGG16_Weights.IMAGENET1K_V1`: 138,357,544.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import inputs
from .registry import register_family, register_flavour



@dataclass(frozen=True)
class VGGConfig:
    """A VGG classifier without batch norm (torchvision's `make_layers(cfg, batch_norm=False)`)."""

    widths: tuple[int, ...] = (64, 128, 256, 512, 512)
    """Output channels of the convolutions of each stage (configuration D)."""
    convs: tuple[int, ...] = (2, 2, 3, 3, 3)
    """3x3 convolutions per stage; each stage ends with a 2x2 stride-2 max pool."""
    fc_width: int = 4096
    """Width of the two hidden fully connected layers."""
    num_classes: int = 1000
    """Output classes (ImageNet-1k)."""
    image_size: int = 224
    """Height and width of the (square) input images."""
    in_channels: int = 3
    """Input image channels (RGB)."""
    pool_output: int = 7
    """Side of the AdaptiveAvgPool2d output the classifier reads (7 in torchvision)."""
    dropout: float = 0.5
    """Dropout probability before the second and third fully connected layers."""

    def validate(self) -> None:
        """Raise ValueError naming the field that breaks a shape rule."""
        if len(self.widths) != len(self.convs) or not self.widths:
            raise ValueError(f"vgg: widths ({len(self.widths)} stages) and convs "
                             f"({len(self.convs)} stages) must have the same non-zero length")
        for name, values in (("widths", self.widths), ("convs", self.convs)):
            if any(v < 1 for v in values):
                raise ValueError(f"vgg: every entry of {name} must be >= 1, got {values}")
        for name in ("fc_width", "num_classes", "in_channels", "pool_output"):
            if getattr(self, name) < 1:
                raise ValueError(f"vgg: {name} must be >= 1, got {getattr(self, name)}")
        if self.image_size < 2 ** len(self.widths):
            raise ValueError(f"vgg: image_size ({self.image_size}) must be >= 2**stages "
                             f"({2 ** len(self.widths)}) so every max pool has an input")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"vgg: dropout must be in [0, 1), got {self.dropout}")


class VGG(nn.Module):
    """Images (B, C, H, W) -> logits (B, num_classes)."""

    def __init__(self, cfg: VGGConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        layers: list[nn.Module] = []
        c = cfg.in_channels
        for width, n in zip(cfg.widths, cfg.convs):
            for _ in range(n):
                layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(inplace=True)]
                c = width
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(cfg.pool_output)
        self.classifier = nn.Sequential(
            nn.Linear(c * cfg.pool_output ** 2, cfg.fc_width), nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.fc_width, cfg.fc_width), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.fc_width, cfg.num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))             # (B, C, 7, 7)
        return self.classifier(torch.flatten(x, 1))    # (B, num_classes)


register_family("vgg", VGGConfig, VGG,
                lambda cfg, batch, device: inputs.images(batch, cfg.image_size, device,
                                                         cfg.in_channels),
                "VGG plain CNN classifier (torchvision layout, no batch norm)")

register_flavour("vgg16", "vgg", VGGConfig(),
                 "Simonyan & Zisserman 2014 (arXiv 1409.1556) Table 1 configuration D; "
                 "torchvision.models.vgg16 (num_params 138,357,544)")
register_flavour("vgg-tiny", "vgg", VGGConfig(widths=(8, 16, 16, 32, 32), fc_width=64,
                                              num_classes=10, image_size=64, pool_output=2),
                 "tiny CPU flavour of this project")
