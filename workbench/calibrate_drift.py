"""Did the host change speed while `workbench calibrate` measured it?

A calibration takes 20-25 minutes on the 2-core development host, and a shared host's speed
moves within that: one calibration (2026-12-05 09:41-10:05) measured the models' microbatches
7-14% slower and the memory copy at 17 GB/s against 29 GB/s in the three before it, and
over-predicted world 2 by 12-21% on runs taken right after it. A profile measured in such a
spell prices every prediction wrong, and nothing in it shows it.

So `calibrate` times the same small reference work (a matmul and a large copy, one thread, in
the parent process while no rank runs) before the first world and after the last, keeps both
in `measurement.host_check`, and warns when they differ by more than `DRIFT_LIMITS`. It cannot
see a slow spell that covers the whole calibration; pooling calibrations taken at different
hours (`--merge`) is the remedy for that.
"""
from __future__ import annotations

DRIFT_LIMITS = {"matmul_flops_per_s": 0.08, "copy_Bps": 0.25}
"""Relative change of each reference figure between the start and the end of a calibration
beyond which `calibrate` warns: about twice the spread of six back-to-back checks on the
quiet 2-core host (matmul 3.2%, copy 13.8%: the copy, like the memory bandwidth it is,
moves a lot with the host's neighbours)."""


def measure_host(settings) -> dict[str, float]:
    """The reference figures, one torch thread, measured as the calibration measures the
    chip (`calibrate.measure_peak`'s fp32 matmul, always at 2048, and no bf16, which takes
    minutes on a host without bf16 instructions; `measure_memory_bandwidth`'s copy), each
    the median of 9 samples of 0.1 s (3 of 2 ms with --quick): `matmul_flops_per_s`,
    `copy_Bps`."""
    import dataclasses
    import math
    import torch
    from .calibrate import measure_memory_bandwidth, measure_peak
    settings = dataclasses.replace(settings, repeats=3 if settings.quick else 9,
                                   min_sample_s=0.002 if settings.quick else 0.1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {"matmul_flops_per_s": float(measure_peak(settings, ("fp32",), math.inf)["fp32"]),
                "copy_Bps": float(measure_memory_bandwidth(settings))}
    finally:
        torch.set_num_threads(threads)


def host_drift(start: dict[str, float], end: dict[str, float]) -> dict:
    """`{start, end, change}`: `change` is end / start - 1 for every figure of `start`
    (positive: the host got faster)."""
    return {"start": dict(start), "end": dict(end),
            "change": {k: end[k] / start[k] - 1.0 for k in start}}


def drift_warning(drift: dict, limits: dict[str, float] | None = None) -> str | None:
    """A warning naming every reference figure whose `change` exceeds its limit
    (`DRIFT_LIMITS`) in size, or None when the host held still."""
    limits = DRIFT_LIMITS if limits is None else limits
    moved = {k: v for k, v in drift["change"].items() if abs(v) > limits[k]}
    if not moved:
        return None
    parts = ", ".join(f"{k} {v:+.0%} (limit {limits[k]:.0%})" for k, v in moved.items())
    return (f"warning: the host changed speed during this calibration ({parts}, from the "
            f"start to the end): its figures mix two speeds. Calibrate again on a quieter "
            f"host, or pool calibrations of different hours with --merge.")
