"""Achieved fractions of peak: how fast a chip really runs an op of a given size.

Compute roofline per op: time = max(FLOPs / (peak x e(FLOPs)), bytes / (bandwidth x m)) +
launch overhead, with a saturating efficiency curve per op kind

    e(F) = e_max x F / (F + F_half)

(small ops cannot fill the machine; large ones approach `e_max`); on a chip with a width
term, an op whose narrowest GEMM dimension `w` is below `width_sat` streams its FLOPs at
`w / width_sat` of the rate (vector lanes and register tiles stay partly empty):
`e = e_max F / (F width_sat / w + F_half)` (`width_sat` 0 = no such effect, as for the GPU
presets).
`m` is the achieved fraction of memory bandwidth. Figures are per chip, chosen from published
measurements and never fitted per model.

A calibrated chip (`workbench calibrate`, `workbench/calibrate.py`) carries its own measured
figures in the profile file (`chip.efficiency`, read by `efficiency_from_dict`): forward and
backward curves per op kind, the framework's dispatch seconds per op kind and pass, and the
fixed framework costs the engine adds (optimizer per parameter tensor, per collective call,
per FSDP gather and reduction, per tensor-parallel op, per pipeline action, per ring-attention
step) and how much communication hides behind compute. `efficiency_for(chip)` returns those
for such a chip; the presets below leave every framework cost at 0 and overlap at 1, so GPU
predictions do not depend on them.
"""
from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import numpy as np

from ..calibrate_ops import table_from_dict
from ..calibrate_models import passes_from_dict
from ..hardware_spec import _keys


@dataclass(frozen=True)
class Curve:
    """e(F, w) = e_max x F / (F / fill + half_flops), fill = min(1, w / width_sat): the
    time F / (peak e_max fill) + half_flops / (peak e_max) is a fixed part and a streaming part
    that narrow ops run at the fraction `fill` of."""

    e_max: float
    """Fraction of dense peak that very large ops of this kind reach."""
    half_flops: float
    """Op size (FLOPs) at which the fraction is half of `e_max`."""
    width_sat: float = 0.0
    """Narrowest GEMM dimension (elements) from which the op fills the vector units; narrower
    ops reach `w / width_sat` of the curve. 0: no width effect."""

    def __call__(self, flops, width=None):
        f = np.asarray(flops, dtype=float)
        if self.width_sat > 0 and width is not None:  # narrow ops stream at w / width_sat
            fill = np.minimum(1.0, np.asarray(width, dtype=float) / self.width_sat)
            return self.e_max * f / (f / np.maximum(fill, 1e-12) + self.half_flops)
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
    curves_fwd: Mapping[str, Curve] = field(default_factory=dict)
    """Per op kind, a measured forward curve that replaces the one above (calibrated chips)."""
    curves_bwd: Mapping[str, Curve] = field(default_factory=dict)
    """Per op kind, a measured backward curve (default: the forward one)."""
    dispatch_fwd_s: Mapping[str, float] = field(default_factory=dict)
    """Per op kind, fixed seconds of a forward op (framework dispatch); default
    `op_overhead_s`."""
    dispatch_bwd_s: Mapping[str, float] = field(default_factory=dict)
    """Per op kind, fixed seconds of its backward; default `op_overhead_s`."""
    optimizer_tensor_s: float = 0.0
    """Fixed seconds of the optimizer update per parameter tensor (per-tensor kernels of
    AdamW foreach=False; 0 for fused/foreach optimizers on GPUs)."""
    optimizer_dtensor_s: float = 0.0
    """The same for a distributed-tensor parameter (FSDP shards, TP weights)."""
    optimizer_bytes_per_param: float = 0.0
    """Bytes the optimizer update moves per parameter, when measured (an unfused update
    reads and writes each state several times); 0: the engine's `OPTIMIZER_STEP_BYTES`."""
    collective_call_s: float = 0.0
    """Fixed seconds per collective call on top of the link latency (framework, work
    object, wait)."""
    ddp_microbatch_s: float = 0.0
    """Fixed seconds of DDP per microbatch (forward hooks, backward preparation)."""
    ddp_tensor_s: float = 0.0
    """DDP seconds per parameter tensor and step (gradient-ready hooks and bucket work of the
    microbatch that synchronises; measured the same at 1 and 2 microbatches)."""
    ddp_step_s: float = 0.0
    """Fixed seconds of DDP per step beyond its modelled bucket all-reduces."""
    ddp_byte_s: float = 0.0
    """DDP seconds per gradient byte it all-reduces, beyond the modelled all-reduce (bucket
    copies and the reduction running on the cores the ranks compute on: at world 2 on the
    2-core host, 2.4 MB of gradients cost DDP about 3.5 ms more than 10 KB, where the
    collectives fitted in a tight loop add 0.7 ms)."""
    fsdp_gather_s: float = 0.0
    """Fixed seconds per FSDP unit all-gather beyond the collective (copy-in, copy-out,
    hooks)."""
    fsdp_reduce_s: float = 0.0
    """Fixed seconds per FSDP unit gradient reduction beyond the collective."""
    fsdp_tensor_s: float = 0.0
    """Seconds per parameter tensor of each FSDP all-gather (per-parameter views, copies and
    bookkeeping), beyond `fsdp_gather_s`."""
    fsdp_microbatch_s: float = 0.0
    """Fixed seconds of FSDP per microbatch beyond its gathers (the root's hooks, the
    backward's final callback)."""
    fsdp_step_s: float = 0.0
    """Fixed seconds of FSDP per step beyond its gathers and reductions."""
    fsdp_byte_s: float = 0.0
    """FSDP seconds per byte a unit gathers, beyond the modelled all-gather (gathers of
    hundreds of KB after compute, measured slower than the collectives in a tight loop)."""
    tp_op_fwd_s: float = 0.0
    """Extra forward seconds of an op on tensor-parallel (distributed tensor) weights."""
    tp_op_bwd_s: float = 0.0
    """Extra backward seconds of such an op."""
    tp_collective_s: float = 0.0
    """Fixed seconds of each TP collective call (forward or backward) beyond the link model
    and `collective_call_s`: the distributed tensor's redistribution, and on a host whose
    ranks share cores the ranks meeting after their compute."""
    pp_action_s: float = 0.0
    """Fixed seconds per pipeline-schedule action (one forward or backward of a microbatch
    on a stage: stage bookkeeping, buffers, send/recv posting)."""
    cp_step_s: float = 0.0
    """Fixed seconds per ring-attention step (one K/V block exchange and merge) per pass."""
    pp_compute_factor: float = 1.0
    """A pipeline stage's compute (forward, backward, recomputation of its layers) inside the
    schedule over the same layers' time outside it (1: the same; GPU presets 1). On the 2-core
    CPU host a stage computes slower between its sends and receives than alone (Linear(512)
    x 4 stages: 3-5 ms more per microbatch at 1F1B), a cost that grows with the stage's work,
    not with its actions; `workbench calibrate --fit-on` fits it (`calibrate_fit`)."""
    op_kernels_s: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    """Kernel seconds (forward, backward) measured at exact op shapes, by
    `calibrate_ops.op_key`; the engine uses them instead of the curves where the key of an
    op it times matches (`workbench calibrate --ops-for`)."""
    model_passes_s: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    """Seconds (forward, backward) of one unsplit microbatch of whole models, by
    `calibrate_models.model_key`; the engine spreads the difference from its op-level
    prediction over the model's ops (`workbench calibrate --ops-for`)."""
    rank_contention: float = 1.0
    """Ranks per core when the figures were measured with every rank busy (ranks / cores of
    the host, 1 when each rank has cores of its own). A rank that runs while others wait
    (a pipeline's fill and drain) gets up to this many times the measured speed."""
    comm_overlap: float = 1.0
    """Fraction of a collective that can hide behind concurrent compute (1: separate
    communication engines, as GPUs; less when ranks compute and communicate on the same
    cores)."""

    def curve(self, kind: str, backward: bool = False) -> Curve:
        """The curve for an op kind of the layer graph (forward, or backward)."""
        if backward and kind in self.curves_bwd:
            return self.curves_bwd[kind]
        if kind in self.curves_fwd:
            return self.curves_fwd[kind]
        return {"linear": self.matmul, "batched_matmul": self.matmul,
                "attention": self.attention, "conv": self.conv, "lstm": self.lstm}[kind]

    def dispatch_s(self, kind: str, backward: bool = False) -> float:
        """Fixed seconds of one op of `kind` in a pass."""
        table = self.dispatch_bwd_s if backward else self.dispatch_fwd_s
        return table.get(kind, self.op_overhead_s)


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


def efficiency_for(chip) -> ChipEfficiency:
    """The efficiency figures of a chip: its own measured ones when it carries them (a
    calibrated `Chip`), else its preset's by name (unknown chips get the H100 figures,
    labelled). Accepts a `Chip` or a chip name."""
    table = getattr(chip, "efficiency", None)
    if table is not None:
        return _from_json(json.dumps(dict(table), sort_keys=True, default=_plain))
    chip_name = getattr(chip, "name", chip)
    if chip_name in EFFICIENCY:
        return EFFICIENCY[chip_name]
    return replace(_H100, source=f"ASSUMED for unknown chip {chip_name!r}: H100 figures")


def in_pipeline_factor(eff: ChipEfficiency, pp: int) -> float:
    """How many times its time alone a stage's compute costs in a plan of `pp` stages:
    `eff.pp_compute_factor` in a pipeline, 1 without one (the engine's and the simulator's
    stage work both use it)."""
    return eff.pp_compute_factor if pp > 1 else 1.0


# ----------------------------------------------------------------------------- profile files

_CURVE_KINDS = ("linear", "batched_matmul", "attention", "conv", "lstm")
_SCALARS = ("optimizer_tensor_s", "optimizer_dtensor_s", "optimizer_bytes_per_param",
            "collective_call_s", "ddp_microbatch_s", "ddp_tensor_s", "ddp_step_s", "ddp_byte_s",
            "fsdp_gather_s", "fsdp_reduce_s", "fsdp_tensor_s", "fsdp_microbatch_s", "fsdp_step_s",
            "fsdp_byte_s",
            "tp_op_fwd_s", "tp_op_bwd_s", "tp_collective_s", "pp_action_s", "cp_step_s")
_REQUIRED = ("source", "memory", "op_overhead_s", "curves")
_OPTIONAL = ("curves_bwd", "dispatch_fwd_s", "dispatch_bwd_s", "comm_overlap",
             "rank_contention", "pp_compute_factor", "op_kernels_s", "model_passes_s") + _SCALARS


def _plain(x):
    return dict(x) if isinstance(x, Mapping) else str(x)


def _number(value, where: str, low: float = 0.0, low_open: bool = False,
            high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high else "")
        raise ValueError(f"{where} must be {bound}, got {value!r}")
    return float(value)


def _curve_from_dict(d, where: str) -> Curve:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where} must be a table with e_max, half_flops[, width_sat]")
    unknown = [k for k in d if k not in ("e_max", "half_flops", "width_sat")]
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (allowed: e_max, half_flops, "
                         f"width_sat)")
    for k in ("e_max", "half_flops"):
        if k not in d:
            raise ValueError(f"{where}: missing key {k!r}")
    return Curve(_number(d["e_max"], f"{where}.e_max", 0.0, low_open=True, high=2.0),
                 _number(d["half_flops"], f"{where}.half_flops"),
                 _number(d.get("width_sat", 0.0), f"{where}.width_sat"))


def _kind_table(d, where: str, parse) -> dict:
    from .ops import REGISTRY
    if not isinstance(d, Mapping):
        raise ValueError(f"{where} must be a table of op kind -> value")
    for k in d:
        if k not in REGISTRY:
            raise ValueError(f"{where}: op kind {k!r} is not one of {', '.join(sorted(REGISTRY))}")
    return {k: parse(v, f"{where}.{k}") for k, v in d.items()}


def efficiency_from_dict(d, where: str = "efficiency") -> ChipEfficiency:
    """A chip's measured figures from a profile file's `efficiency` table; unknown or missing
    keys and values out of range raise ValueError naming the field."""
    _keys(d, where, _REQUIRED, _OPTIONAL)
    if not isinstance(d["source"], str) or not d["source"].strip():
        raise ValueError(f"{where}.source must be a non-empty string")
    fwd = _kind_table(d["curves"], f"{where}.curves", _curve_from_dict)
    for kind in ("linear", "attention", "conv", "lstm"):
        if kind not in fwd:
            raise ValueError(f"{where}.curves: missing key {kind!r}")
    bwd = _kind_table(d.get("curves_bwd", {}), f"{where}.curves_bwd", _curve_from_dict)
    for k in list(fwd) + list(bwd):
        if k not in _CURVE_KINDS:
            raise ValueError(f"{where}: curves are for {', '.join(_CURVE_KINDS)}, not {k!r}")
    dispatch = {p: _kind_table(d.get(f"dispatch_{p}_s", {}), f"{where}.dispatch_{p}_s",
                               lambda v, w: _number(v, w)) for p in ("fwd", "bwd")}
    scalars = {k: _number(d.get(k, 0.0), f"{where}.{k}") for k in _SCALARS}
    return ChipEfficiency(
        matmul=fwd["linear"], attention=fwd["attention"], conv=fwd["conv"], lstm=fwd["lstm"],
        memory=_number(d["memory"], f"{where}.memory", 0.0, low_open=True, high=1.5),
        op_overhead_s=_number(d["op_overhead_s"], f"{where}.op_overhead_s"),
        source=d["source"], curves_fwd=MappingProxyType(fwd), curves_bwd=MappingProxyType(bwd),
        dispatch_fwd_s=MappingProxyType(dispatch["fwd"]),
        dispatch_bwd_s=MappingProxyType(dispatch["bwd"]),
        comm_overlap=_number(d.get("comm_overlap", 1.0), f"{where}.comm_overlap", high=1.0),
        rank_contention=_number(d.get("rank_contention", 1.0), f"{where}.rank_contention",
                                1.0),
        pp_compute_factor=_number(d.get("pp_compute_factor", 1.0),
                                  f"{where}.pp_compute_factor", 0.0, low_open=True, high=4.0),
        op_kernels_s=MappingProxyType(table_from_dict(d.get("op_kernels_s", {}),
                                                      f"{where}.op_kernels_s")),
        model_passes_s=MappingProxyType(passes_from_dict(d.get("model_passes_s", {}),
                                                         f"{where}.model_passes_s")),
        **scalars)


def efficiency_to_dict(e: ChipEfficiency) -> dict:
    """The table `efficiency_from_dict` reads."""
    def curve(c: Curve) -> dict:
        return {"e_max": c.e_max, "half_flops": c.half_flops, "width_sat": c.width_sat}
    fwd = {"linear": e.matmul, "attention": e.attention, "conv": e.conv, "lstm": e.lstm,
           **dict(e.curves_fwd)}
    out = {"source": e.source, "memory": e.memory, "op_overhead_s": e.op_overhead_s,
           "curves": {k: curve(c) for k, c in fwd.items()},
           "curves_bwd": {k: curve(c) for k, c in e.curves_bwd.items()},
           "dispatch_fwd_s": dict(e.dispatch_fwd_s), "dispatch_bwd_s": dict(e.dispatch_bwd_s),
           "comm_overlap": e.comm_overlap, "rank_contention": e.rank_contention,
           "pp_compute_factor": e.pp_compute_factor}
    if e.op_kernels_s:
        out["op_kernels_s"] = {k: list(v) for k, v in e.op_kernels_s.items()}
    if e.model_passes_s:
        out["model_passes_s"] = {k: list(v) for k, v in e.model_passes_s.items()}
    out.update({k: getattr(e, k) for k in _SCALARS})
    return out


@functools.lru_cache(maxsize=64)
def _from_json(text: str) -> ChipEfficiency:
    return efficiency_from_dict(json.loads(text))
