"""FCN-8s (Long, Shelhamer & Darrell 2015, "Fully Convolutional Networks for Semantic
Segmentation", CVPR; arXiv 1411.4038) on a VGG-16 backbone, with learned upsampling.

Layout and module names follow the reference caffe net `voc-fcn8s` (fcn.berkeleyvision.org)
as ported by wkentaro/pytorch-fcn `torchfcn/models/fcn8s.py` (class `FCN8s`): conv1_1 padded
by 100, VGG-16 convolutions `conv{s}_{j}` with `relu{s}_{j}` and ceil-mode max pools
`pool{s}`, fc6 as a 7x7 convolution to 4096, fc7 as a 1x1 convolution, 1x1 score layers
`score_fr`, `score_pool4`, `score_pool3`, bias-free transposed convolutions `upscore2`
(4x4 stride 2), `upscore_pool4` (4x4 stride 2), `upscore8` (16x16 stride 8), and the caffe
Crop offsets 5, 9 and 31. Parameters for 21 PASCAL VOC classes (multiply-adds as weights,
+ biases):
  VGG-16 convolutions                                     14,714,688
  fc6  512 x 4096 x 7 x 7 + 4096                         102,764,544
  fc7  4096 x 4096 + 4096                                 16,781,312
  score_fr 4096 x 21 + 21 = 86,037; score_pool4 512 x 21 + 21 = 10,773;
  score_pool3 256 x 21 + 21 = 5,397                          102,207
  upscore2, upscore_pool4 21 x 21 x 4 x 4 = 7,056 each;
  upscore8 21 x 21 x 16 x 16 = 112,896                       127,008
  total                                                  134,489,759
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import inputs
from .registry import register_family, register_flavour

FIRST_PADDING = 100
"""Padding of conv1_1, so that any input leaves fc6 (a 7x7 convolution) an input."""
CROP_POOL4, CROP_POOL3, CROP_OUT = 5, 9, 31
"""Offsets of the caffe Crop layers (score_pool4c, score_pool3c, score) of voc-fcn8s."""


def _pool_ceil(n: int) -> int:
    """Output side of MaxPool2d(2, 2, ceil_mode=True)."""
    return (n + 1) // 2


@dataclass(frozen=True)
class FCNConfig:
    """FCN-8s: VGG-style backbone of five stages, fc6/fc7 as convolutions, three-stream head."""

    widths: tuple[int, ...] = (64, 128, 256, 512, 512)
    """Output channels of the 3x3 convolutions of each of the five stages (VGG-16)."""
    convs: tuple[int, ...] = (2, 2, 3, 3, 3)
    """3x3 convolutions per stage; each stage ends with a 2x2 stride-2 ceil-mode max pool."""
    fc_width: int = 4096
    """Channels of fc6 (7x7 convolution) and fc7 (1x1 convolution)."""
    num_classes: int = 21
    """Classes scored per pixel (PASCAL VOC: 20 objects + background)."""
    image_size: int = 500
    """Height and width of the (square) input images (PASCAL VOC images are at most 500)."""
    in_channels: int = 3
    """Input image channels (RGB)."""
    dropout: float = 0.5
    """Dropout2d probability after fc6 and fc7."""

    def sizes(self) -> dict[str, int]:
        """Spatial sides of the maps the head crops and adds (pool3, pool4, upscore2, ...)."""
        s = self.image_size + 2 * FIRST_PADDING - 2        # conv1_1; other 3x3 convs keep size
        out = {}
        for stage in range(1, 6):
            s = _pool_ceil(s)
            out[f"pool{stage}"] = s
        out["score_fr"] = s - 6                              # fc6: 7x7, no padding
        out["upscore2"] = (out["score_fr"] - 1) * 2 + 4
        out["upscore_pool4"] = (out["upscore2"] - 1) * 2 + 4
        out["upscore8"] = (out["upscore_pool4"] - 1) * 8 + 16
        return out

    def validate(self) -> None:
        """Raise ValueError naming the field that breaks a shape rule."""
        if len(self.widths) != 5 or len(self.convs) != 5:
            raise ValueError(f"fcn: widths and convs must have 5 stages (the head reads pool3 and "
                             f"pool4), got {len(self.widths)} and {len(self.convs)}")
        for name, values in (("widths", self.widths), ("convs", self.convs)):
            if any(v < 1 for v in values):
                raise ValueError(f"fcn: every entry of {name} must be >= 1, got {values}")
        for name in ("fc_width", "num_classes", "in_channels", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"fcn: {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"fcn: dropout must be in [0, 1), got {self.dropout}")
        # With pad 100 and the caffe offsets every image_size fits; this guards the geometry.
        s = self.sizes()
        if (s["score_fr"] < 1 or s["pool4"] < CROP_POOL4 + s["upscore2"]
                or s["pool3"] < CROP_POOL3 + s["upscore_pool4"]
                or s["upscore8"] < CROP_OUT + self.image_size):
            raise ValueError(f"fcn: image_size {self.image_size} does not fit the FCN-8s crops "
                             f"(sides {s})")


class FCN8s(nn.Module):
    """Images (B, C, H, W) -> per-pixel class scores (B, num_classes, H, W)."""

    def __init__(self, cfg: FCNConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        c = cfg.in_channels
        for stage, (width, n) in enumerate(zip(cfg.widths, cfg.convs), start=1):
            for j in range(1, n + 1):
                pad = FIRST_PADDING if (stage, j) == (1, 1) else 1
                self.add_module(f"conv{stage}_{j}", nn.Conv2d(c, width, 3, padding=pad))
                self.add_module(f"relu{stage}_{j}", nn.ReLU(inplace=True))
                c = width
            self.add_module(f"pool{stage}", nn.MaxPool2d(2, stride=2, ceil_mode=True))
        k = cfg.num_classes
        self.fc6 = nn.Conv2d(c, cfg.fc_width, 7)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout2d(cfg.dropout)
        self.fc7 = nn.Conv2d(cfg.fc_width, cfg.fc_width, 1)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout2d(cfg.dropout)
        self.score_fr = nn.Conv2d(cfg.fc_width, k, 1)
        self.score_pool3 = nn.Conv2d(cfg.widths[2], k, 1)
        self.score_pool4 = nn.Conv2d(cfg.widths[3], k, 1)
        self.upscore2 = nn.ConvTranspose2d(k, k, 4, stride=2, bias=False)
        self.upscore8 = nn.ConvTranspose2d(k, k, 16, stride=8, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(k, k, 4, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, pools = x, {}
        for stage, n in enumerate(self.cfg.convs, start=1):
            for j in range(1, n + 1):
                h = getattr(self, f"relu{stage}_{j}")(getattr(self, f"conv{stage}_{j}")(h))
            h = pools[stage] = getattr(self, f"pool{stage}")(h)
        h = self.drop6(self.relu6(self.fc6(h)))
        h = self.drop7(self.relu7(self.fc7(h)))
        up2 = self.upscore2(self.score_fr(h))                                   # 1/16
        s4 = self.score_pool4(pools[4])
        s4 = s4[:, :, CROP_POOL4:CROP_POOL4 + up2.shape[2], CROP_POOL4:CROP_POOL4 + up2.shape[3]]
        up4 = self.upscore_pool4(up2 + s4)                                      # 1/8
        s3 = self.score_pool3(pools[3])
        s3 = s3[:, :, CROP_POOL3:CROP_POOL3 + up4.shape[2], CROP_POOL3:CROP_POOL3 + up4.shape[3]]
        h = self.upscore8(up4 + s3)                                             # 1/1 (+ margin)
        return h[:, :, CROP_OUT:CROP_OUT + x.shape[2], CROP_OUT:CROP_OUT + x.shape[3]].contiguous()


register_family("fcn", FCNConfig, FCN8s,
                lambda cfg, batch, device: inputs.images(batch, cfg.image_size, device,
                                                         cfg.in_channels),
                "FCN-8s semantic segmenter, VGG-16 backbone, transposed-conv upsampling")

register_flavour("fcn8s", "fcn", FCNConfig(),
                 "Long, Shelhamer & Darrell 2015 (arXiv 1411.4038), caffe voc-fcn8s "
                 "(fcn.berkeleyvision.org); wkentaro/pytorch-fcn torchfcn/models/fcn8s.py FCN8s "
                 "(134,489,759 parameters for 21 classes, derived in workbench/models/fcn.py)")
register_flavour("fcn-tiny", "fcn", FCNConfig(widths=(8, 8, 16, 16, 16), fc_width=32,
                                              num_classes=5, image_size=32),
                 "tiny CPU flavour of this project")
