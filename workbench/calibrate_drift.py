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

The same figures tell whether a profile belongs to the host it predicts: the shipped profile,
calibrated on a 2-core EPYC at 86-103 GFLOP/s and 28-31 GB/s, under-predicted every point of
the validation set by 43-64% on a 2-core EPYC at 54-66 GFLOP/s and 10-17 GB/s (2026-12-07).
`host_mismatch_warning` compares this host's figures with the ones a profile recorded.

A host can also be steady in the mean and noisy from one run to the next: `run_spread_rel`
and `spread_line` say how far repeated runs of a point differ (the validation benchmark and
`calibrate --fit-repeat` print it), the floor under any prediction's error on that host.
And its level can move by the minute: `host_level` reads it from reference runs of other
models taken among the runs it pins (`benchmarks/cpu_validation.py --pin-level`).
"""
from __future__ import annotations

import statistics

ERROR_TARGET_REL = 0.15
"""The calibrated CPU profile's every-point target: each predicted step time within 15% of the
measured one (`benchmarks/cpu_validation.py`'s `TARGET_MAX`); `spread_line` counts the points
whose own runs differ by more, which no prediction can meet."""

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


def _moved(drift: dict, limits: dict[str, float] | None) -> str | None:
    """The figures of `drift` whose `change` exceeds its limit (`DRIFT_LIMITS`) in size, in
    words, or None."""
    limits = DRIFT_LIMITS if limits is None else limits
    moved = {k: v for k, v in drift["change"].items() if abs(v) > limits[k]}
    if not moved:
        return None
    return ", ".join(f"{k} {v:+.0%} (limit {limits[k]:.0%})" for k, v in moved.items())


def drift_warning(drift: dict, limits: dict[str, float] | None = None) -> str | None:
    """A warning naming every reference figure whose `change` exceeds its limit
    (`DRIFT_LIMITS`) in size, or None when the host held still."""
    parts = _moved(drift, limits)
    if parts is None:
        return None
    return (f"warning: the host changed speed during this calibration ({parts}, from the "
            f"start to the end): its figures mix two speeds. Calibrate again on a quieter "
            f"host, or pool calibrations of different hours with --merge.")


def profile_host_figures(measurement: dict) -> dict[str, float] | None:
    """The reference figures of the host a profile was calibrated on, from its `measurement`:
    per figure, the median of every host check it holds (its own start and end; a merged
    profile's, those of the calibrations it pools, `merged_from`). None when it holds none
    (calibrations from before the host check)."""
    checks = [measurement.get("host_check")]
    checks += [m.get("host_check") for m in measurement.get("merged_from") or []]
    samples = [c[end] for c in checks if c for end in ("start", "end")]
    if not samples:
        return None
    return {k: float(statistics.median(s[k] for s in samples)) for k in samples[0]}


def host_mismatch_warning(profile_figures: dict[str, float] | None, now: dict[str, float],
                          limits: dict[str, float] | None = None) -> str | None:
    """A warning when this host's reference figures (`now`, `measure_host`) differ from the
    profile's (`profile_host_figures`) by more than `DRIFT_LIMITS`, or when the profile
    records none; None when they agree. The change is now / profile - 1 (positive: this host
    is faster than the profile's)."""
    if profile_figures is None:
        return ("warning: the profile records no host check, so nothing tells whether this "
                "host runs at the speed it was calibrated at.")
    parts = _moved(host_drift(profile_figures, now), limits)
    if parts is None:
        return None
    return (f"warning: this host is not at the speed the profile was calibrated at ({parts}, "
            f"this host against the profile's host checks): predictions will be off by about "
            f"as much. Calibrate this host (workbench calibrate --device cpu --world 2,4) and "
            f"predict with that profile.")


def run_spread_rel(times_s: list[float]) -> float | None:
    """How far repeated runs of one point differ: the slowest run's step time over the
    fastest one's, minus 1 (None for fewer than 2 runs). No prediction can be closer than
    this to all of a point's runs: on the 2-core development host it is the floor under the
    validation's error."""
    return max(times_s) / min(times_s) - 1 if len(times_s) > 1 else None


def spread_line(runs_s: list[list[float]], what: str,
                limit: float = ERROR_TARGET_REL) -> str | None:
    """One line on the run-to-run spread (`run_spread_rel`) of the `what` (points, runs)
    measured more than once, each an entry of `runs_s`: its median and largest, and how many
    of them differ by more than `limit` (a fraction); None when none was measured twice."""
    spreads = [s for s in map(run_spread_rel, runs_s) if s is not None]
    if not spreads:
        return None
    return (f"run-to-run spread of the {len(spreads)} {what} run more than once: median "
            f"{100 * statistics.median(spreads):.1f}%, largest {100 * max(spreads):.1f}%, "
            f"{sum(s > limit for s in spreads)} whose own runs differ by more than "
            f"{100 * limit:.0f}%")


PIN_NEIGHBOURS = 6
"""How many reference runs of a world, the nearest in time, `host_level` takes the median
over: on the 2-core host of 2026-12-07 the level read from 6 or 10 of them left the same
error on the runs between them (median 8.4%), while one run alone moves by 5-8%."""


def host_level(t_s: float, world: int, references: list[dict],
               neighbours: int = PIN_NEIGHBOURS, probe_s: float | None = None) -> float | None:
    """How slow the host ran at time `t_s` for `world` ranks against the profile's
    predictions: the median of measured / predicted step time over the `neighbours` reference
    runs of that world nearest to `t_s` (each `{t_s, world, measured_s, predicted_s}`); None
    when there is none. Reference runs are of other models than the ones pinned to them (the
    calibration study's), measured among them, so that a slow spell of the shared host moves
    both alike: on the 2-core host of 2026-12-07, 32 calibration runs interleaved with 37
    validation runs were under-predicted alike (median -24% and -22%), and that level moved
    between -19% and -28% from one 3-minute stretch to the next.

    With `probe_s` (the run's own `runner.host_probe` index) and references that carry theirs
    (`probe_s`), the level is per unit of probe time, times the run's: the median over those
    references of measured / predicted / their probe, x `probe_s`. That follows a host whose
    speed moves by the second and from one process to the next, which neighbours minutes
    apart cannot."""
    same = sorted((r for r in references if r["world"] == world),
                  key=lambda r: abs(r["t_s"] - t_s))[:neighbours]
    if not same:
        return None
    if probe_s is None:
        return float(statistics.median(r["measured_s"] / r["predicted_s"] for r in same))
    if not all(r.get("probe_s") for r in same):
        raise ValueError("host_level: probe_s given, but a reference run has no probe_s "
                         "(measured without --probe)")
    return float(probe_s * statistics.median(r["measured_s"] / r["predicted_s"] / r["probe_s"]
                                             for r in same))
