"""U-Net (Ronneberger, Fischer & Brox 2015, "U-Net: Convolutional Networks for Biomedical
Image Segmentation", MICCAI; arXiv 1505.04597), exactly as its Figure 1.

Contracting path: per level two unpadded 3x3 convolutions + ReLU, then a 2x2 stride-2 max
pool; channels 64, 128, 256, 512 and 1024 at the bottom. Expansive path: a 2x2 stride-2
up-convolution (ConvTranspose2d) that halves the channels, concatenation with the centre
crop of the contracting map of the same level, two unpadded 3x3 convolutions + ReLU. A 1x1
convolution maps the 64 channels to the 2 classes. A 572x572 one-channel tile gives a
388x388 map. Parameters (weights + biases), in_channels 1, 2 classes:
  contracting  (1*64*9+64) + (64*64*9+64) = 37,568; 128: 221,440; 256: 885,248;
               512: 3,539,968; bottom 1024: 14,157,824                 = 18,842,048
  expansive    up 1024->512 (2,097,664) + 3x3 1024->512, 512->512 (7,078,912) = 9,176,576
               up 512->256 (524,544) + 1,769,984                            = 2,294,528
               up 256->128 (131,200) + 442,624                              =   573,824
               up 128->64 (32,832) + 110,720                                =   143,552
  1x1 head     64*2 + 2                                                     =       130
  total                                                                     31,030,658
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import inputs
from .registry import register_family, register_flavour


@dataclass(frozen=True)
class UNetConfig:
    """U-Net with unpadded convolutions, crop-and-concat skips and learned up-convolutions."""

    base_width: int = 64
    """Channels of the first level; level i has base_width * 2**i."""
    depth: int = 4
    """Max pools (and up-convolutions); the bottom level has base_width * 2**depth channels."""
    num_classes: int = 2
    """Classes scored per output pixel (cell / background in the paper)."""
    image_size: int = 572
    """Height and width of the (square) input tile."""
    in_channels: int = 1
    """Input image channels (grey-scale microscopy images in the paper)."""

    def sizes(self) -> tuple[list[int], list[int]]:
        """Sides of the contracting maps before each pool (the skips) and of the expansive maps
        after each level's two convolutions; the last expansive side is the output's."""
        s, skips = self.image_size, []
        for _ in range(self.depth):
            s -= 4
            skips.append(s)
            s //= 2
        s -= 4
        ups = []
        for _ in range(self.depth):
            s = 2 * s - 4
            ups.append(s)
        return skips, ups

    def validate(self) -> None:
        """Raise ValueError naming the field that breaks a shape rule."""
        for name in ("base_width", "depth", "num_classes", "image_size", "in_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"unet: {name} must be >= 1, got {getattr(self, name)}")
        skips, ups = self.sizes()
        # Paper, section 3: every 2x2 max pool must see an even side.
        if any(s < 2 or s % 2 for s in skips):
            raise ValueError(f"unet: image_size {self.image_size} gives max-pool inputs of sides "
                             f"{skips}; each must be even and >= 2 (572 works)")
        bottom = skips[-1] // 2 - 4
        if bottom < 1 or min(ups) < 1:
            raise ValueError(f"unet: image_size {self.image_size} is too small for depth "
                             f"{self.depth}: the bottom side is {bottom}, the expansive sides {ups}")


class DoubleConv(nn.Module):
    """Two unpadded 3x3 convolutions, each followed by a ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3)
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.conv2(self.relu1(self.conv1(x))))


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The central (height, width) window of x (B, C, H, W)."""
    top, left = (x.shape[2] - height) // 2, (x.shape[3] - width) // 2
    return x[:, :, top:top + height, left:left + width]


class UNet(nn.Module):
    """Images (B, C, H, W) -> per-pixel class scores (B, num_classes, H', W'), H' < H."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        widths = [cfg.base_width * 2 ** i for i in range(cfg.depth + 1)]
        ins = [cfg.in_channels] + widths[:-1]
        self.encoder = nn.ModuleList(DoubleConv(i, o) for i, o in zip(ins, widths))
        self.pools = nn.ModuleList(nn.MaxPool2d(2, 2) for _ in range(cfg.depth))
        deep_first = widths[-2::-1]                              # 512, 256, 128, 64
        self.upconvs = nn.ModuleList(nn.ConvTranspose2d(2 * w, w, 2, stride=2) for w in deep_first)
        self.decoder = nn.ModuleList(DoubleConv(2 * w, w) for w in deep_first)
        self.head = nn.Conv2d(cfg.base_width, cfg.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for enc, pool in zip(self.encoder, self.pools):
            x = enc(x)
            skips.append(x)
            x = pool(x)
        x = self.encoder[-1](x)                                  # bottom (B, 1024, 28, 28)
        for up, dec, skip in zip(self.upconvs, self.decoder, reversed(skips)):
            x = up(x)
            x = dec(torch.cat([center_crop(skip, x.shape[2], x.shape[3]), x], dim=1))
        return self.head(x)                                      # (B, 2, 388, 388)


register_family("unet", UNetConfig, UNet,
                lambda cfg, batch, device: inputs.images(batch, cfg.image_size, device,
                                                         cfg.in_channels),
                "U-Net segmenter (unpadded convs, crop-and-concat, up-convolutions)")

register_flavour("unet", "unet", UNetConfig(),
                 "Ronneberger, Fischer & Brox 2015 (arXiv 1505.04597) Figure 1 "
                 "(31,030,658 parameters, derived in workbench/models/unet.py)")
register_flavour("unet-tiny", "unet", UNetConfig(base_width=4, image_size=188),
                 "tiny CPU flavour of this project")
