"""YOLO v1 (Redmon, Divvala, Girshick & Farhadi 2016, "You Only Look Once: Unified, Real-Time
Object Detection", CVPR; arXiv 1506.02640), the single-stage detector of its Figure 3.

24 convolutions (with bias, no batch norm: that came with YOLO v2) and 2 fully connected
layers; every layer but the last is followed by a leaky ReLU (slope 0.1), dropout 0.5 follows
the first fully connected layer (section 2.2). A 448x448 image gives a 7x7 grid (S = 7) and an
S x S x (B*5 + C) = 7 x 7 x 30 output for B = 2 boxes and C = 20 PASCAL VOC classes.
Parameters (weights + biases):
  group 1  7x7x64-s-2                               3*64*49 + 64 =       9,472
  group 2  3x3x192                                 64*192*9 + 192 =     110,784
  group 3  1x1x128, 3x3x256, 1x1x256, 3x3x512                     =   1,565,824
  group 4  {1x1x256, 3x3x512} x 4, 1x1x512, 3x3x1024              =  10,228,224
  group 5  {1x1x512, 3x3x1024} x 2, 3x3x1024, 3x3x1024-s-2        =  29,365,248
  group 6  3x3x1024, 3x3x1024                                     =  18,876,416
  fc1      7*7*1024 * 4096 + 4096                                 = 205,524,992
  fc2      4096 * 1470 + 1470                                     =   6,022,590
  total                                                            271,703,550
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import inputs
from .registry import register_family, register_flavour

_G4 = ((1, 256, 1, False), (3, 512, 1, False)) * 4
_G5 = ((1, 512, 1, False), (3, 1024, 1, False)) * 2
CONV_SPECS: tuple[tuple[int, int, int, bool], ...] = (
    (7, 64, 2, True),
    (3, 192, 1, True),
    (1, 128, 1, False), (3, 256, 1, False), (1, 256, 1, False), (3, 512, 1, True),
    *_G4, (1, 512, 1, False), (3, 1024, 1, True),
    *_G5, (3, 1024, 1, False), (3, 1024, 2, False),
    (3, 1024, 1, False), (3, 1024, 1, False),
)
"""(kernel, output channels, stride, 2x2 max pool after) of the 24 convolutions, Figure 3.
Padding is kernel // 2 ("same"), so only the strides and the pools shrink the map."""
STRIDE_TOTAL = 64
"""Image side / grid side: the stride-2 first conv, four 2x2 pools and the stride-2 conv."""


@dataclass(frozen=True)
class YOLOConfig:
    """YOLO v1: Figure 3 convolutions (widths divisible by `width_divisor`) and two FC layers."""

    image_size: int = 448
    """Height and width of the (square) input images; a multiple of 64 (grid S = size / 64)."""
    in_channels: int = 3
    """Input image channels (RGB)."""
    width_divisor: int = 1
    """Every convolution width of Figure 3 is divided by this (1 = the paper's network)."""
    fc_width: int = 4096
    """Width of the first fully connected layer."""
    boxes: int = 2
    """Boxes B predicted per grid cell (each: x, y, w, h, confidence)."""
    num_classes: int = 20
    """Classes C (PASCAL VOC)."""
    dropout: float = 0.5
    """Dropout probability after the first fully connected layer."""
    leaky_slope: float = 0.1
    """Negative slope of the leaky ReLU."""

    @property
    def grid(self) -> int:
        """Grid side S."""
        return self.image_size // STRIDE_TOTAL

    @property
    def cell_outputs(self) -> int:
        """Predictions per grid cell: B * 5 + C."""
        return self.boxes * 5 + self.num_classes

    def widths(self) -> list[int]:
        """Output channels of the 24 convolutions."""
        return [c // self.width_divisor for _, c, _, _ in CONV_SPECS]

    def validate(self) -> None:
        """Raise ValueError naming the field that breaks a shape rule."""
        for name in ("image_size", "in_channels", "width_divisor", "fc_width", "boxes",
                     "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"yolo: {name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % STRIDE_TOTAL:
            raise ValueError(f"yolo: image_size must be a multiple of {STRIDE_TOTAL} "
                             f"(the network's total stride), got {self.image_size}")
        if any(c % self.width_divisor for _, c, _, _ in CONV_SPECS):
            raise ValueError(f"yolo: width_divisor ({self.width_divisor}) must divide every "
                             f"convolution width (64, 128, 192, 256, 512, 1024)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"yolo: dropout must be in [0, 1), got {self.dropout}")


class ConvBlock(nn.Module):
    """Convolution ("same" padding), leaky ReLU, and a 2x2 max pool where Figure 3 has one."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, pool: bool,
                 slope: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2)
        self.act = nn.LeakyReLU(slope, inplace=True)
        self.pool = nn.MaxPool2d(2, 2) if pool else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv(x))
        return self.pool(x) if self.pool is not None else x


class YOLOv1(nn.Module):
    """Images (B, C, H, W) -> predictions (B, S, S, boxes * 5 + num_classes)."""

    def __init__(self, cfg: YOLOConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        blocks, c = [], cfg.in_channels
        for width, (kernel, _, stride, pool) in zip(cfg.widths(), CONV_SPECS):
            blocks.append(ConvBlock(c, width, kernel, stride, pool, cfg.leaky_slope))
            c = width
        self.features = nn.Sequential(*blocks)
        self.fc1 = nn.Linear(c * cfg.grid ** 2, cfg.fc_width)
        self.fc1_act = nn.LeakyReLU(cfg.leaky_slope, inplace=True)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc2 = nn.Linear(cfg.fc_width, cfg.grid ** 2 * cfg.cell_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)                   # (B, 1024 * 7 * 7)
        x = self.fc2(self.dropout(self.fc1_act(self.fc1(x))))    # (B, 1470), linear activation
        s = self.cfg.grid
        return x.view(-1, s, s, self.cfg.cell_outputs)           # (B, 7, 7, 30)


register_family("yolo", YOLOConfig, YOLOv1,
                lambda cfg, batch, device: inputs.images(batch, cfg.image_size, device,
                                                         cfg.in_channels),
                "YOLO v1 single-stage detector (24 convs + 2 FC, 7x7x30 output)")

register_flavour("yolov1", "yolo", YOLOConfig(),
                 "Redmon et al. 2016 (arXiv 1506.02640) Figure 3 and section 2 "
                 "(271,703,550 parameters, derived in workbench/models/yolo.py)")
register_flavour("yolo-tiny", "yolo", YOLOConfig(image_size=128, width_divisor=16, fc_width=64),
                 "tiny CPU flavour of this project (not the paper's Fast YOLO)")
