"""V-MoE: a Vision Transformer with sparse mixture-of-experts MLPs (Riquelme et al. 2021,
"Scaling Vision with Sparse Mixture of Experts", arXiv 2106.05974).

The ViT of `workbench.models.vit` where the MLP of every `moe_every`-th block (the odd-indexed
blocks 1, 3, 5, ... for the paper's "Every-2" main models) is the shared
`workbench.models.moe.MoE`: a bias-free router (`gate`), top-k routing (k=2) with a fixed
expert capacity (capacity factor 1.05), and GELU expert MLPs with biases. The values are those
of the reference configs, google-research/vmoe `vmoe/configs/vmoe_paper/common.py`
(`moe.layers = range(where_num - 1, num_layers, where_num)`, `num_selected_experts = K`,
`capacity_factor = 1.05`).

Parameters (V-MoE-B/16, E=32, 1000 classes): ViT-B/16's 86,567,656 plus, in each of the 6 MoE
blocks, 31 more expert MLPs (768 x 3072 + 3072 + 3072 x 768 + 768 = 4,722,432 each) and the
router (768 x 32 = 24,576): 86,567,656 + 6 x (31 x 4,722,432 + 24,576) = 965,087,464. With the
paper's JFT-300M head (18,291 classes and a 768-wide pre-logits layer) the same arithmetic gives
978,974,835, the paper's 979.0M (its ViT-B/16 is 100,455,027 = 100.5M the same way).

NB: the reference routes tokens in groups of 8 images (`group_size`) with a capacity per
group; the shared MoE layer routes all tokens of a call as one group, so capacities agree
when the batch is 8 images (and up to rounding of the ceiling otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .moe import MoE
from . import inputs
from .registry import register_family, register_flavour
from .vit import ViTConfig, VisionTransformer


@dataclass(frozen=True)
class ViTMoEConfig(ViTConfig):
    """A V-MoE: `ViTConfig` plus where and how the MoE layers route."""

    experts: int = 32
    """Experts per MoE layer (E; 32 for the paper's main models)."""
    top_k: int = 2
    """Experts each token is routed to (k)."""
    capacity_factor: float = 1.05
    """Expert capacity over the mean load (C; vmoe `capacity_factor`)."""
    moe_every: int = 2
    """An MoE MLP in blocks moe_every-1, 2*moe_every-1, ... ("Every-2": the odd blocks)."""

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the blocks whose MLP is an MoE layer (vmoe's `moe.layers`)."""
        return tuple(range(self.moe_every - 1, self.layers, self.moe_every))

    def validate(self) -> None:
        """Raise ValueError naming the field that breaks a shape rule."""
        super().validate()
        if self.experts < 1:
            raise ValueError(f"vit-moe: experts must be >= 1, got {self.experts}")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"vit-moe: top_k ({self.top_k}) must be in 1..experts "
                             f"({self.experts})")
        if self.capacity_factor <= 0:
            raise ValueError(f"vit-moe: capacity_factor must be > 0, got {self.capacity_factor}")
        if not 1 <= self.moe_every <= self.layers:
            raise ValueError(f"vit-moe: moe_every ({self.moe_every}) must be in 1..layers "
                             f"({self.layers})")


class VisionMoE(VisionTransformer):
    """Images (B, 3, H, W) -> logits; the MLP of the blocks in `cfg.moe_layers` is an MoE."""

    def make_mlp(self, cfg: ViTMoEConfig, index: int) -> nn.Module | None:
        """An MoE (GELU experts with biases) in the MoE blocks, the dense MLP elsewhere."""
        if index not in cfg.moe_layers:
            return None
        return MoE(cfg.hidden, cfg.ffn, cfg.experts, cfg.top_k, cfg.capacity_factor,
                   gated=False, bias=True)


register_family("vit-moe", ViTMoEConfig, VisionMoE,
                lambda cfg, batch, device: inputs.images(batch, cfg.image_size, device),
                "V-MoE: Vision Transformer with top-k sparse MoE MLPs in every other block")

register_flavour("vit-moe-b16", "vit-moe", ViTMoEConfig(),
                 "V-MoE-B/16 Every-2, E=32, k=2 (Riquelme et al. 2021, arXiv 2106.05974); "
                 "C=1.05 from google-research/vmoe vmoe/configs/vmoe_paper/common.py; "
                 "ViT-B/16 body as torchvision vit_b_16 with a 1000-class head")
register_flavour("vit-moe-tiny", "vit-moe",
                 ViTMoEConfig(layers=2, hidden=64, heads=4, ffn=128, patch=8, image_size=32,
                              num_classes=10, experts=4),
                 "tiny CPU flavour of this project")
