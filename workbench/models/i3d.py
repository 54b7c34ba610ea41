"""I3D-ResNet: a 2D ResNet (`workbench.models.resnet`) inflated to a 3D video network.

What is followed, and from where:
- Wang et al. 2018, "Non-local Neural Networks" (arXiv 1711.07971), Table 1 (the ResNet-50
  video baseline, 32x224x224 clips): conv1 temporal stride 2, pool1 3x3x3 max stride 2,2,2,
  pool2 3x1x1 max stride 2,1,1 after res2 (T: 32 -> 16 -> 8 -> 4), global average pool, fc.
  Sec. 4.1 (I3D): conv1 inflated to 5x7x7; the 3x1x1 variant inflates the first 1x1 conv of a
  bottleneck to 3x1x1, in one of every two residual blocks; Sec. 5 (Kinetics training):
  dropout 0.5 after the global pool.
- Which blocks are inflated: the official code's I3D-ResNet-50 (github.com/facebookresearch/
  video-nonlocal-net, lib/models/resnet_video.py, `obtain_arc`, arc_type 2): res2 (1,1,1),
  res3 (1,0,1,0), res4 (1,0,1,0,1,0), res5 (0,1,0), all temporal strides 1 inside the blocks.
  For any depth this is: every block of the first stage, blocks 0, 2, 4... of the middle
  stages, blocks 1, 3... of the last (it also gives the code's ResNet-101 pattern, arc_type 4).
  mmaction2 publishes this I3D-R50 with 400 classes at 28,043,472 parameters
  (configs/recognition/i3d/metafile.yml; mmaction2 uses a 1x3x3 pool1 with temporal stride 2
  and a 2x1x1 pool2 instead of Table 1's pools: same parameters, same conv shapes).
- Inflation (Carreira & Zisserman 2017, "Quo Vadis, Action Recognition?", arXiv 1705.07750,
  Sec. 2.2): a t x k x k kernel is the k x k kernel repeated t times over time, divided by t.

Everything else is the 2D network's (stride on the 3x3 conv, torchvision v1.5, as the
official code), so module names equal the 2D ResNet's and `inflate()` maps weights by name.
Temporal padding replicates the edge frames (explicit `F.pad(mode='replicate')`; the Conv3d
pads only in space), so a static clip (one frame repeated) gives exactly the 2D network's
logits: the reference code zero-pads time, which breaks that identity at the clip ends.

Pipeline units are the residual blocks (16 for ResNet-50); pool2 belongs to the last block
of the first stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import inputs
from .registry import register_family, register_flavour
from .resnet import ResNet, ResNetConfig, block_plan


def nonlocal_net_inflation(stages: tuple[int, ...]) -> tuple[int, ...]:
    """0/1 per residual block: the inflation pattern of video-nonlocal-net's I3D (see above)."""
    flags: list[int] = []
    for s, blocks in enumerate(stages):
        for i in range(blocks):
            if s == 0:
                flags.append(1)
            elif s == len(stages) - 1:
                flags.append(i % 2)
            else:
                flags.append(1 - i % 2)
    return tuple(flags)


def _pooled(size: int, kernel: int, stride: int) -> int:
    """Output length of a temporal window with padding (kernel - 1) // 2 (PyTorch's floor)."""
    return (size + 2 * ((kernel - 1) // 2) - kernel) // stride + 1


@dataclass(frozen=True)
class I3DConfig:
    """A 2D ResNet inflated to 3D: temporal kernels on conv1 and on a subset of blocks."""

    base: ResNetConfig = field(default_factory=ResNetConfig)
    """The 2D ResNet that is inflated (block, stages, width). Its own `num_classes` and
    `image_size` describe the 2D network only; the I3D's are the fields below."""
    frames: int = 32
    """Clip length T in frames (Wang et al. Table 1: 32)."""
    image_size: int = 224
    """Frame height and width in pixels."""
    num_classes: int = 400
    """Classifier outputs (400 Kinetics classes)."""
    conv1_t: int = 5
    """Temporal kernel of the inflated conv1 (odd; Wang et al. Sec. 4.1: 5x7x7)."""
    conv1_stride_t: int = 2
    """Temporal stride of conv1 (Table 1)."""
    pool1_t: int = 3
    """Temporal kernel of the max pool after conv1 (Table 1: 3x3x3)."""
    pool1_stride_t: int = 2
    """Temporal stride of that max pool (Table 1)."""
    pool2_t: int = 3
    """Temporal kernel of the max pool after the first stage (Table 1: 3x1x1)."""
    pool2_stride_t: int = 2
    """Temporal stride of that max pool (Table 1)."""
    block_t: int = 3
    """Temporal kernel of an inflated block's first conv (odd; 3x1x1 bottleneck, 3x3x3 basic)."""
    inflated: tuple[int, ...] = ()
    """0/1 per residual block in order: 1 inflates its first conv; empty = the official
    pattern `nonlocal_net_inflation(base.stages)`."""
    dropout: float = 0.5
    """Dropout probability before the classifier (Wang et al. Sec. 5)."""

    @property
    def block_inflation(self) -> tuple[int, ...]:
        """The 0/1 inflation flag of every residual block (`inflated` resolved)."""
        return self.inflated or nonlocal_net_inflation(self.base.stages)

    def temporal_sizes(self) -> tuple[int, int, int]:
        """T after conv1, after pool1 and after pool2 (the stages keep T)."""
        t1 = _pooled(self.frames, self.conv1_t, self.conv1_stride_t)
        t2 = _pooled(t1, self.pool1_t, self.pool1_stride_t)
        return t1, t2, _pooled(t2, self.pool2_t, self.pool2_stride_t)

    def validate(self) -> None:
        """Raise ValueError naming the field that breaks a rule."""
        self.base.validate()
        for name in ("frames", "num_classes", "conv1_t", "conv1_stride_t", "pool1_t",
                     "pool1_stride_t", "pool2_t", "pool2_stride_t", "block_t"):
            if getattr(self, name) < 1:
                raise ValueError(f"i3d: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("conv1_t", "block_t"):
            if getattr(self, name) % 2 == 0:
                raise ValueError(f"i3d: {name} must be odd (centred temporal kernel), "
                                 f"got {getattr(self, name)}")
        if self.image_size < 2 ** (len(self.base.stages) + 1):
            raise ValueError(f"i3d: image_size must be >= {2 ** (len(self.base.stages) + 1)}, "
                             f"got {self.image_size}")
        blocks = sum(self.base.stages)
        if self.inflated and (len(self.inflated) != blocks or set(self.inflated) - {0, 1}):
            raise ValueError(f"i3d: inflated must be empty or one 0/1 flag for each of the "
                             f"{blocks} residual blocks, got {self.inflated}")
        if min(self.temporal_sizes()) < 1:
            raise ValueError(f"i3d: frames={self.frames} leaves no frame after conv1, pool1 "
                             f"and pool2 (T sizes {self.temporal_sizes()})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"i3d: dropout must be in [0, 1), got {self.dropout}")


def temporal_conv(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` after replicate-padding time by (kt - 1) // 2 frames on each side."""
    pad = (conv.kernel_size[0] - 1) // 2
    if pad:
        x = F.pad(x, (0, 0, 0, 0, pad, pad), mode="replicate")  # (B, C, T + 2 pad, H, W)
    return conv(x)


def _downsample(cin: int, cout: int, stride: int) -> nn.Module | None:
    """1x1x1 projection (stride 1 x s x s) + BatchNorm when the shortcut changes shape."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv3d(cin, cout, 1, (1, stride, stride), bias=False),
                         nn.BatchNorm3d(cout))


class Bottleneck3d(nn.Module):
    """kt x 1 x 1 reduce, 1x3x3 (spatial stride), 1x1x1 expand x4, residual."""

    def __init__(self, cin: int, width: int, stride: int, kt: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv3d(cin, width, (kt, 1, 1), bias=False), nn.BatchNorm3d(width)
        self.conv2 = nn.Conv3d(width, width, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False)
        self.bn2 = nn.BatchNorm3d(width)
        self.conv3, self.bn3 = nn.Conv3d(width, width * 4, 1, bias=False), nn.BatchNorm3d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, width * 4, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(temporal_conv(self.conv1, x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class BasicBlock3d(nn.Module):
    """kt x 3 x 3 (spatial stride) then 1x3x3, residual."""

    def __init__(self, cin: int, width: int, stride: int, kt: int):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, width, (kt, 3, 3), (1, stride, stride), (0, 1, 1), bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.conv2 = nn.Conv3d(width, width, (1, 3, 3), 1, (0, 1, 1), bias=False)
        self.bn2 = nn.BatchNorm3d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, width, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(temporal_conv(self.conv1, x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class I3D(nn.Module):
    """Clips (B, 3, T, H, W) -> logits (B, num_classes)."""

    def __init__(self, cfg: I3DConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        base = cfg.base
        block = Bottleneck3d if base.block == "bottleneck" else BasicBlock3d
        self.conv1 = nn.Conv3d(3, base.width, (cfg.conv1_t, 7, 7), (cfg.conv1_stride_t, 2, 2),
                               (0, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(base.width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d((cfg.pool1_t, 3, 3), (cfg.pool1_stride_t, 2, 2),
                                    ((cfg.pool1_t - 1) // 2, 1, 1))
        stages: dict[str, list[nn.Module]] = {}
        for (path, cin, width, stride), flag in zip(block_plan(base), cfg.block_inflation):
            kt = cfg.block_t if flag else 1
            stages.setdefault(path.split(".")[0], []).append(block(cin, width, stride, kt))
        for name, blocks in stages.items():
            self.add_module(name, nn.Sequential(*blocks))
        self.pool2 = nn.MaxPool3d((cfg.pool2_t, 1, 1), (cfg.pool2_stride_t, 1, 1),
                                  ((cfg.pool2_t - 1) // 2, 0, 0))
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(base.out_channels, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Table 1 at 32x224x224: (B, 64, 8, 56, 56) after maxpool, T 4 after pool2
        x = self.maxpool(self.relu(self.bn1(temporal_conv(self.conv1, x))))
        x = self.pool2(self.layer1(x))                       # (B, 256, 4, 56, 56)
        for s in range(1, len(self.cfg.base.stages)):
            x = getattr(self, f"layer{s + 1}")(x)
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


def inflate(resnet2d: ResNet, **fields) -> I3D:
    """An I3D whose weights are `resnet2d`'s inflated (Carreira & Zisserman 2017, Sec. 2.2).

    `fields` are I3DConfig fields (`frames`, `inflated`, ...); `base` is `resnet2d.cfg`, and
    `image_size` and `num_classes` default to the 2D network's. Each t x k x k kernel is the
    2D k x k kernel repeated over time and divided by t; BatchNorm parameters and running
    statistics are copied; the classifier is copied when the class counts agree, else the new
    one keeps its fresh initialisation. The result is on `resnet2d`'s device, in its mode.
    """
    if "base" in fields:
        raise ValueError("inflate: base is resnet2d.cfg; do not pass it")
    base = resnet2d.cfg
    fields.setdefault("image_size", base.image_size)
    fields.setdefault("num_classes", base.num_classes)
    param = next(resnet2d.parameters())
    with torch.device(param.device):
        model = I3D(I3DConfig(base=base, **fields))
    source = resnet2d.state_dict()
    target = model.state_dict()
    if set(source) != set(target):
        raise ValueError(f"inflate: 2D and 3D parameter names differ: "
                         f"{sorted(set(source) ^ set(target))[:6]}")
    for name, weight in target.items():
        src = source[name]
        if weight.dim() == 5:                        # (out, in, t, k, k) <- (out, in, k, k)
            t = weight.shape[2]
            target[name] = src.unsqueeze(2).repeat(1, 1, t, 1, 1) / t
        elif name.startswith("fc.") and src.shape != weight.shape:
            continue                                 # a new classifier for new classes
        else:
            target[name] = src.clone()
    model.load_state_dict(target)
    return model.to(param.dtype).train(resnet2d.training)


register_family("i3d", I3DConfig, I3D,
                lambda cfg, batch, device: inputs.clips(batch, cfg.frames, cfg.image_size, device),
                "I3D: a 2D ResNet inflated to 3D (Carreira & Zisserman 2017; Wang et al. 2018)")

register_flavour("i3d-r50", "i3d", I3DConfig(),
                 "Wang et al. 2018 (arXiv 1711.07971) Table 1 + Sec. 4.1 I3D 3x1x1 (conv1 5x7x7); "
                 "inflated blocks from github.com/facebookresearch/video-nonlocal-net "
                 "resnet_video.py obtain_arc(2); base torchvision resnet50; 28,043,472 params "
                 "as mmaction2 i3d_r50 metafile")
register_flavour("i3d-tiny", "i3d", I3DConfig(base=ResNetConfig(stages=(1, 1, 1, 1), width=8,
                                                               num_classes=10, image_size=64),
                                              frames=8, image_size=32, num_classes=10),
                 "tiny CPU flavour of this project (base: resnet-tiny)")
