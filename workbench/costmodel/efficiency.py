"""Achieved fractions of peak: how fast a chip really runs an op of a given size.

Compute roofline per op: time = max(FLOPs / (peak x e(FLOPs)), bytes / (bandwidth x m)) +
launch overhead, with a saturating efficiency curve per op kind

    e(F) = e_max x F / (F + F_half)

(small ops cannot fill the machine; large ones approach `e_max`). `m` is the achieved
fraction of memory bandwidth. Figures are per chip, chosen from published measurements and
never fitted per model; `workbench calibrate` (a later issue) measures them for a local device.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class Curve:
    """e(F) = e_max x F / (F + half_flops)."""

    e_max: float
    """Fraction of dense peak that very large ops of this kind reach."""
    half_flops: float
    """Op size (FLOPs) at which the fraction is half of `e_max`."""

    def __call__(self, flops):
        f = np.asarray(flops, dtype=float)
        return self.e_max * f / (f + self.half_flops)


@dataclass(frozen=True)
class ChipEfficiency:
    """Achieved fractions for one chip."""

    matmul: Curve
    """GEMMs (linear layers, batched expert matmuls)."""
    attention: Curve
    """Attention kernels (flash-style fused, or the batched matmuls of unfused attention)."""
    conv: Curve
    """Convolutions (cuDNN implicit GEMM)."""
    lstm: Curve
    """Recurrent cells (small per-step GEMMs)."""
    memory: float
    """Achieved fraction of memory bandwidth for streaming (elementwise, norms, optimizer)."""
    op_overhead_s: float
    """Fixed cost per op launch (kernel launch, framework dispatch)."""
    source: str
    """Where the figures come from."""

    def curve(self, kind: str) -> Curve:
        """The curve for an op kind of the layer graph."""
        return {"linear": self.matmul, "batched_matmul": self.matmul,
                "attention": self.attention, "conv": self.conv, "lstm": self.lstm}[kind]


# A100 SXM: cuBLAS reaches about 85% of the 312 TFLOP/s dense fp16/bf16 peak on large square
# GEMMs at boost clock (NVIDIA, "Matrix Multiplication Background User's Guide",
# DU-09799-001, Figs. 2-3); sustained training at the 400 W limit holds the SM clock below
# the 1410 MHz boost (NVIDIA A100 datasheet: boost clock; power-capped operation), so e_max
# 0.75 for GEMMs in a training loop. A 1024^3 GEMM (2.1 GFLOP) runs in ~17 us, half of that:
# half_flops 2 GFLOP. FlashAttention-2 reaches 50-70% of peak forward and less backward on
# A100 (Dao 2023, arXiv 2307.08691, Fig. 4-6): e_max 0.55 for attention. cuDNN convolutions
# of ResNet-50 run at 50-70% (NVIDIA DL performance docs): e_max 0.65. STREAM-like copies
# reach ~1.7-1.8 of 2.04 TB/s: memory 0.85. Kernel launch ~5 us.
_A100 = ChipEfficiency(
    matmul=Curve(0.75, 2e9), attention=Curve(0.55, 4e9), conv=Curve(0.65, 2e9),
    lstm=Curve(0.35, 2e9), memory=0.85, op_overhead_s=5e-6,
    source="cuBLAS/cuDNN/FlashAttention-2 published A100 measurements (see efficiency.py)")

# H100 SXM: large bf16 GEMMs reach 650-750 TFLOP/s of 989 (~0.7, cuBLASLt measurements in
# NVIDIA's H100 material and Transformer Engine GEMM benchmarks), FlashAttention-2 ~35-50%
# of peak on H100 (Dao 2023; FlashAttention-3 paper, arXiv 2407.08608, Fig. 1), bigger
# GEMMs needed to saturate a 3x faster chip: half_flops 6 GFLOP. HBM3 copies ~0.85.
_H100 = ChipEfficiency(
    matmul=Curve(0.70, 6e9), attention=Curve(0.45, 12e9), conv=Curve(0.55, 6e9),
    lstm=Curve(0.25, 6e9), memory=0.85, op_overhead_s=5e-6,
    source="cuBLASLt / FlashAttention-2/3 published H100 figures (see efficiency.py)")

# B200: no independent measurements yet; assumed like H100 with twice the saturation size.
_B200 = replace(_H100, matmul=Curve(0.70, 12e9), attention=Curve(0.45, 24e9),
                conv=Curve(0.55, 12e9), lstm=Curve(0.25, 12e9),
                source="ASSUMED: H100 fractions, saturation size scaled with peak")

# The cpu chip's peak is itself a measured large-GEMM rate (workbench/data/cpu.json), so
# e_max is 1 there; small ops pay PyTorch's per-op dispatch (~10 us) and fill one core late.
_CPU = ChipEfficiency(
    matmul=Curve(1.0, 2e7), attention=Curve(0.6, 2e7), conv=Curve(0.6, 2e7),
    lstm=Curve(0.5, 2e7), memory=0.8, op_overhead_s=1e-5,
    source="relative to the measured cpu peak; curve shape assumed until `workbench calibrate`")

EFFICIENCY: dict[str, ChipEfficiency] = {
    "a100-sxm-40gb": _A100, "a100-sxm-80gb": _A100, "h100-sxm": _H100,
    "h200-sxm": replace(_H100, memory=0.85), "b200": _B200, "cpu": _CPU,
}


def efficiency_for(chip_name: str) -> ChipEfficiency:
    """The efficiency figures of a chip preset (unknown chips get the H100 figures, labelled)."""
    if chip_name in EFFICIENCY:
        return EFFICIENCY[chip_name]
    return replace(_H100, source=f"ASSUMED for unknown chip {chip_name!r}: H100 figures")
