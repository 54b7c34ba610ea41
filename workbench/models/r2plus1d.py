"""R(2+1)D-18 exactly as torchvision's `r2plus1d_18` (Tran et al. 2018, "A Closer Look at
Spatiotemporal Convolutions for Action Recognition", arXiv 1711.11248).

Every 3x3x3 convolution of a 3D ResNet-18 is factored into a 1x3x3 spatial convolution to
`midplanes` channels, BatchNorm, ReLU and a 3x1x1 temporal convolution, with torchvision's
midplanes rule `(in * out * 3 * 3 * 3) // (in * 3 * 3 + 3 * out)` (computed once per block from
its input and output widths and used by both of its convolutions). A strided block strides in
space (spatial conv) and time (temporal conv) and its shortcut is a 1x1x1 convolution with
stride s x s x s. The stem (`R2Plus1dStem`) is conv 1x7x7 stride 1x2x2 to 45 channels, BN,
ReLU, conv 3x1x1 to 64, BN, ReLU; no max pool. Module names follow torchvision (`stem.0`,
`layer2.0.conv1.0.3`, `layer2.0.downsample.0`, `fc`), so the parameter count is its published
`num_params` 31,505,325 (400 Kinetics classes) and its weights load unchanged.

Pipeline units are the residual blocks (8 for R(2+1)D-18); the stem is before them, pooling
and classifier after.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import inputs
from .registry import register_family, register_flavour
from .resnet import ResNetConfig, block_plan


@dataclass(frozen=True)
class R2Plus1DConfig:
    """A video ResNet of basic blocks whose 3x3x3 convolutions are (2+1)D factored."""

    stages: tuple[int, ...] = (2, 2, 2, 2)
    """Residual blocks per stage (each stage after the first halves T, H and W)."""
    width: int = 64
    """Channels of the stem output and of the first stage (doubled every stage)."""
    stem_mid: int = 45
    """Channels between the stem's 1x7x7 and 3x1x1 convolutions (torchvision: 45)."""
    num_classes: int = 400
    """Classifier outputs (400 Kinetics classes)."""
    frames: int = 16
    """Clip length T in frames (torchvision's Kinetics weights: 16-frame clips)."""
    image_size: int = 112
    """Frame height and width in pixels (torchvision's Kinetics weights: 112x112 crops)."""

    def resnet_plan(self) -> list[tuple[str, int, int, int]]:
        """(module path, in channels, planes, stride) per block, as a 2D basic-block ResNet."""
        return block_plan(ResNetConfig(block="basic", stages=self.stages, width=self.width))

    def validate(self) -> None:
        """Raise ValueError naming the field that breaks a rule."""
        if not self.stages or min(self.stages) < 1:
            raise ValueError(f"r2plus1d: stages must be positive block counts, got {self.stages}")
        for name in ("width", "stem_mid", "num_classes", "frames", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"r2plus1d: {name} must be >= 1, got {getattr(self, name)}")


def midplanes(in_planes: int, out_planes: int) -> int:
    """torchvision's (2+1)D inner width: about the parameters of a full 3x3x3 convolution."""
    return (in_planes * out_planes * 3 * 3 * 3) // (in_planes * 3 * 3 + 3 * out_planes)


class Conv2Plus1D(nn.Sequential):
    """1x3x3 spatial conv (stride 1 x s x s) -> BN -> ReLU -> 3x1x1 temporal conv (s x 1 x 1)."""

    def __init__(self, in_planes: int, out_planes: int, mid: int, stride: int = 1):
        super().__init__(
            nn.Conv3d(in_planes, mid, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False),
            nn.BatchNorm3d(mid),
            nn.ReLU(inplace=True),
            nn.Conv3d(mid, out_planes, (3, 1, 1), (stride, 1, 1), (1, 0, 0), bias=False),
        )


class BasicBlock(nn.Module):
    """Two (2+1)D convolutions with BN, residual connection (torchvision's video BasicBlock)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        mid = midplanes(in_planes, planes)
        self.conv1 = nn.Sequential(Conv2Plus1D(in_planes, planes, mid, stride),
                                   nn.BatchNorm3d(planes), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(Conv2Plus1D(planes, planes, mid), nn.BatchNorm3d(planes))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm3d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        residual = x if self.downsample is None else self.downsample(x)  # after, as torchvision
        return self.relu(out + residual)


class R2Plus1D(nn.Module):
    """Clips (B, 3, T, H, W) -> logits (B, num_classes)."""

    def __init__(self, cfg: R2Plus1DConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.stem = nn.Sequential(
            nn.Conv3d(3, cfg.stem_mid, (1, 7, 7), (1, 2, 2), (0, 3, 3), bias=False),
            nn.BatchNorm3d(cfg.stem_mid),
            nn.ReLU(inplace=True),
            nn.Conv3d(cfg.stem_mid, cfg.width, (3, 1, 1), 1, (1, 0, 0), bias=False),
            nn.BatchNorm3d(cfg.width),
            nn.ReLU(inplace=True),
        )
        stages: dict[str, list[nn.Module]] = {}
        for path, cin, planes, stride in cfg.resnet_plan():
            stages.setdefault(path.split(".")[0], []).append(BasicBlock(cin, planes, stride))
        for name, blocks in stages.items():
            self.add_module(name, nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(cfg.width * 2 ** (len(cfg.stages) - 1), cfg.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's VideoResNet initialisation."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)                                    # (B, 64, T, H/2, W/2)
        for s in range(len(self.cfg.stages)):
            x = getattr(self, f"layer{s + 1}")(x)           # (B, 512, T/8, H/16, W/16) at the end
        return self.fc(torch.flatten(self.avgpool(x), 1))


register_family("r2plus1d", R2Plus1DConfig, R2Plus1D,
                lambda cfg, batch, device: inputs.clips(batch, cfg.frames, cfg.image_size, device),
                "R(2+1)D video ResNet with factored spatial/temporal convolutions (torchvision)")

register_flavour("r2plus1d-18", "r2plus1d", R2Plus1DConfig(),
                 "Tran et al. 2018 (arXiv 1711.11248); torchvision.models.video.r2plus1d_18 "
                 "(num_params 31,505,325, Kinetics-400, 16x112x112 clips)")
register_flavour("r2plus1d-tiny", "r2plus1d", R2Plus1DConfig(stages=(1, 1, 1, 1), width=8,
                                                             stem_mid=6, num_classes=10,
                                                             frames=8, image_size=32),
                 "tiny CPU flavour of this project")
