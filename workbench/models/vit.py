"""Vision Transformer (Dosovitskiy et al. 2021, arXiv 2010.11929), as torchvision builds it.

Layout follows torchvision's `torchvision/models/vision_transformer.py`: a strided convolution
`conv_proj` cuts the image into patches, a learned `class_token` is prepended, a learned
`encoder.pos_embedding` (1 + patches positions) is added, pre-norm encoder blocks
(`encoder.layers.{i}`, LayerNorm eps 1e-6), a final `encoder.ln`, and a classifier `heads`
(optional `pre_logits` + tanh, then `head`) on the class token. The encoder block is the
shared `workbench.models.layers.Block`, which has the parameters of torchvision's
`EncoderBlock` (fused QKV = `nn.MultiheadAttention`'s in-projection). So the parameter counts
are torchvision's `num_params`: vit_b_16 86,567,656, vit_l_16 304,326,632, vit_h_14 632,045,800.
Dropout is left out: torchvision's ViT builders use dropout 0.0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .layers import Block
from . import inputs
from .registry import register_family, register_flavour


@dataclass(frozen=True)
class ViTConfig:
    """A Vision Transformer classifier (torchvision's `VisionTransformer`)."""

    layers: int = 12
    """Encoder blocks."""
    hidden: int = 768
    """Model width (torchvision `hidden_dim`)."""
    heads: int = 12
    """Attention heads."""
    ffn: int = 3072
    """MLP inner width (torchvision `mlp_dim`)."""
    patch: int = 16
    """Patch side in pixels (the stride and kernel of `conv_proj`)."""
    image_size: int = 224
    """Input image side in pixels (square images, as torchvision asserts)."""
    num_classes: int = 1000
    """Classifier outputs."""
    representation_size: int = 0
    """Width of the `pre_logits` linear + tanh before the head (the JFT/ImageNet-21k
    pre-training head of Dosovitskiy et al.); 0 for none (torchvision's ImageNet models)."""
    norm_eps: float = 1e-6
    """LayerNorm epsilon (torchvision uses 1e-6)."""

    @property
    def patches(self) -> int:
        """Patches per image: (image_size / patch)^2."""
        return (self.image_size // self.patch) ** 2

    @property
    def seq(self) -> int:
        """Tokens per image: the patches plus the class token."""
        return self.patches + 1

    def validate(self) -> None:
        """Raise ValueError naming the field that breaks a shape rule."""
        for name in ("layers", "hidden", "heads", "ffn", "patch", "image_size", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"vit: {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"vit: hidden ({self.hidden}) must be divisible by heads "
                             f"({self.heads})")
        if self.image_size % self.patch:
            raise ValueError(f"vit: image_size ({self.image_size}) must be divisible by patch "
                             f"({self.patch})")
        if self.representation_size < 0:
            raise ValueError(f"vit: representation_size must be >= 0 (0 = none), got "
                             f"{self.representation_size}")
        if self.norm_eps <= 0:
            raise ValueError(f"vit: norm_eps must be > 0, got {self.norm_eps}")


class Encoder(nn.Module):
    """Position embedding, `layers` pre-norm blocks, final LayerNorm (torchvision `Encoder`)."""

    def __init__(self, cfg: ViTConfig, blocks: list[nn.Module]):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, cfg.seq, cfg.hidden).normal_(std=0.02))
        self.layers = nn.ModuleList(blocks)
        self.ln = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, S, D)
        x = x + self.pos_embedding
        for layer in self.layers:
            x = layer(x)
        return self.ln(x)


class VisionTransformer(nn.Module):
    """Images (B, 3, H, W) -> logits (B, num_classes).

    Subclasses may override `make_mlp(cfg, i)` to put another feed-forward layer (an MoE)
    in block i.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.conv_proj = nn.Conv2d(3, cfg.hidden, kernel_size=cfg.patch, stride=cfg.patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden))
        blocks = [Block(cfg.hidden, cfg.heads, cfg.ffn, causal=False, eps=cfg.norm_eps,
                        mlp=self.make_mlp(cfg, i)) for i in range(cfg.layers)]
        self.encoder = Encoder(cfg, blocks)
        heads: dict[str, nn.Module] = {}
        if cfg.representation_size:
            heads["pre_logits"] = nn.Linear(cfg.hidden, cfg.representation_size)
            heads["act"] = nn.Tanh()
        heads["head"] = nn.Linear(cfg.representation_size or cfg.hidden, cfg.num_classes)
        self.heads = nn.ModuleDict(heads)
        self._init_weights()

    def make_mlp(self, cfg: ViTConfig, index: int) -> nn.Module | None:
        """The feed-forward layer of block `index`; None keeps the dense GELU MLP."""
        return None

    def _init_weights(self) -> None:
        """torchvision's initialisation (conv_proj and pre_logits truncated normal with
        std sqrt(1/fan_in), MLP xavier-uniform with 1e-6 biases, head zero)."""
        fan_in = 3 * self.cfg.patch * self.cfg.patch
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)
        for block in self.encoder.layers:
            for fc in (getattr(block.mlp, "fc1", None), getattr(block.mlp, "fc2", None)):
                if isinstance(fc, nn.Linear):
                    nn.init.xavier_uniform_(fc.weight)
                    nn.init.normal_(fc.bias, std=1e-6)
        if "pre_logits" in self.heads:
            pre = self.heads["pre_logits"]
            nn.init.trunc_normal_(pre.weight, std=math.sqrt(1 / pre.in_features))
            nn.init.zeros_(pre.bias)
        nn.init.zeros_(self.heads["head"].weight)
        nn.init.zeros_(self.heads["head"].bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        if (h, w) != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"vit: expected {self.cfg.image_size}x{self.cfg.image_size} "
                             f"images, got {h}x{w}")
        x = self.conv_proj(images)                          # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)                     # (B, P, D)
        x = torch.cat([self.class_token.expand(b, -1, -1), x], dim=1)  # (B, S, D)
        x = self.encoder(x)[:, 0]                            # class token (B, D)
        for layer in self.heads.values():
            x = layer(x)
        return x



register_family("vit", ViTConfig, VisionTransformer,
                lambda cfg, batch, device: inputs.images(batch, cfg.image_size, device),
                "Vision Transformer (torchvision layout): patch conv, class token, pre-norm blocks")

_TV = ("Dosovitskiy et al. 2021 (arXiv 2010.11929) Table 1; torchvision "
       "models/vision_transformer.py `{}` (num_params {})")
register_flavour("vit-b16", "vit", ViTConfig(), _TV.format("vit_b_16", "86,567,656"))
register_flavour("vit-l16", "vit", ViTConfig(layers=24, hidden=1024, heads=16, ffn=4096),
                 _TV.format("vit_l_16", "304,326,632"))
register_flavour("vit-h14", "vit", ViTConfig(layers=32, hidden=1280, heads=16, ffn=5120,
                                             patch=14),
                 _TV.format("vit_h_14", "632,045,800 at 224x224"))
register_flavour("vit-tiny", "vit", ViTConfig(layers=2, hidden=64, heads=4, ffn=128, patch=8,
                                              image_size=32, num_classes=10),
                 "tiny CPU flavour of this project")
