"""ResNet-18/34/50/101/152 exactly as torchvision's `resnet*` (He et al. 2016, v1.5 strides).

Module names follow torchvision (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`,
`fc`), so parameter counts are torchvision's published `num_params`. `ResNet.features()` is
the backbone the DETR, captioner and I3D models reuse.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import inputs
from .registry import register_family, register_flavour


@dataclass(frozen=True)
class ResNetConfig:
    """A ResNet of basic (two 3x3) or bottleneck (1x1, 3x3, 1x1) residual blocks."""

    block: str = "bottleneck"
    """`basic` (ResNet-18/34) or `bottleneck` (ResNet-50/101/152)."""
    stages: tuple[int, ...] = (3, 4, 6, 3)
    """Residual blocks per stage (4 stages, each halving the resolution after the first)."""
    width: int = 64
    """Channels of the stem and of the first stage's 3x3 convolutions."""
    num_classes: int = 1000
    """Classifier outputs."""
    image_size: int = 224
    """Input height and width in pixels."""

    @property
    def expansion(self) -> int:
        """Output channels of a block over its inner width (1 basic, 4 bottleneck)."""
        return 4 if self.block == "bottleneck" else 1

    @property
    def out_channels(self) -> int:
        """Channels of the last stage's output feature map."""
        return self.width * 2 ** (len(self.stages) - 1) * self.expansion

    def validate(self) -> None:
        """Raise ValueError naming the field that breaks a rule."""
        if self.block not in ("basic", "bottleneck"):
            raise ValueError(f"resnet: block must be 'basic' or 'bottleneck', got {self.block!r}")
        if not self.stages or min(self.stages) < 1:
            raise ValueError(f"resnet: stages must be positive block counts, got {self.stages}")
        for name in ("width", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"resnet: {name} must be >= 1")
        if self.image_size < 2 ** (len(self.stages) + 1):
            raise ValueError(f"resnet: image_size must be >= {2 ** (len(self.stages) + 1)}")


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (followed by BatchNorm)."""
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, width, stride), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = conv3x3(width, width), nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, width, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, torchvision's v1.5), 1x1 expand x4, residual."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = conv3x3(width, width, stride), nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, width * 4, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def _downsample(cin: int, cout: int, stride: int) -> nn.Module | None:
    """1x1 strided projection + BatchNorm when the shortcut changes shape, else None."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


def block_plan(cfg: ResNetConfig) -> list[tuple[str, int, int, int]]:
    """(module path, in channels, inner width, stride) of every residual block, in order."""
    plan, cin = [], cfg.width
    for s, blocks in enumerate(cfg.stages):
        width = cfg.width * 2 ** s
        for i in range(blocks):
            stride = 2 if s > 0 and i == 0 else 1
            plan.append((f"layer{s + 1}.{i}", cin, width, stride))
            cin = width * cfg.expansion
    return plan


class ResNet(nn.Module):
    """Images (B, 3, H, W) -> logits (B, num_classes)."""

    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        block = Bottleneck if cfg.block == "bottleneck" else BasicBlock
        self.conv1 = nn.Conv2d(3, cfg.width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(cfg.width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages: dict[str, list[nn.Module]] = {}
        for path, cin, width, stride in block_plan(cfg):
            stages.setdefault(path.split(".")[0], []).append(block(cin, width, stride))
        for name, blocks in stages.items():
            self.add_module(name, nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cfg.out_channels, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (B, out_channels, H/32, W/32)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for s in range(len(self.cfg.stages)):
            x = getattr(self, f"layer{s + 1}")(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))



register_family("resnet", ResNetConfig, ResNet,
                lambda cfg, batch, device: inputs.images(batch, cfg.image_size, device),
                "ResNet image classifier (torchvision layout)")

_TV = "He et al. 2016 (arXiv 1512.03385) Table 1; torchvision.models.resnet (v1.5)"
register_flavour("resnet18", "resnet", ResNetConfig(block="basic", stages=(2, 2, 2, 2)), _TV)
register_flavour("resnet34", "resnet", ResNetConfig(block="basic", stages=(3, 4, 6, 3)), _TV)
register_flavour("resnet50", "resnet", ResNetConfig(), _TV)
register_flavour("resnet101", "resnet", ResNetConfig(stages=(3, 4, 23, 3)), _TV)
register_flavour("resnet152", "resnet", ResNetConfig(stages=(3, 8, 36, 3)), _TV)
register_flavour("resnet-tiny", "resnet", ResNetConfig(stages=(1, 1, 1, 1), width=8,
                                                       num_classes=10, image_size=64),
                 "tiny CPU flavour of this project")
