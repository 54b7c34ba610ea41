"""Run a plan for real with torch.distributed (gloo on CPU, nccl on GPUs) and measure it.

`run(model, plan, nproc)` launches the ranks, trains, and returns the measurement beside the
cost model's prediction for the same plan (and stores both when given a `Store`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from .. import costmodel, hardware, models
from ..plan import Plan
from .launch import RunError, launch
from .train import RunSpec, summarise

__all__ = ["RunError", "RunSpec", "finish", "launch", "prediction_cluster", "run"]


def prediction_cluster(device: str, nproc: int, device_name: str | None = None):
    """The cluster the prediction uses: this host's calibrated cpu cluster with the figures
    measured for `nproc` concurrent ranks (`workbench calibrate --world ...`: ranks beyond the
    cores share them, and the calibration measured them sharing), or one node of the GPU the
    run found. A cpu world the calibration did not measure is extrapolated from the largest
    measured one by time sharing (`_shared_cores`), and says so in its source."""
    if device == "cpu":
        try:
            return hardware.load_cpu_cluster(nproc)
        except ValueError:
            return _shared_cores(nproc)
    chip = hardware.chip_for_nvml_name(device_name or "")
    preset = {"a100-sxm-80gb": "dgx-a100", "h100-sxm": "dgx-h100", "h200-sxm": "dgx-h200",
              "b200": "dgx-b200"}.get(chip.name, "dgx-h100")
    cl = hardware.cluster(preset, nproc)
    return dataclasses.replace(cl, chip=chip)


def _shared_cores(nproc: int):
    """`nproc` ranks from the largest calibrated world of `w` ranks when nproc > w: each rank
    gets w / nproc of the CPU time that world's ranks had, so rates scale by w / nproc and
    fixed seconds (dispatch, framework costs, latency) by nproc / w."""
    base = max([hardware.load_cpu_cluster()] + [hardware.load_cpu_cluster(w) for w in
                                                 hardware.calibrated_worlds()],
               key=lambda c: c.n_chips)
    if nproc <= base.n_chips:
        return base.with_n_chips(nproc)
    f = nproc / base.n_chips
    chip = hardware.chip_to_dict(base.chip)
    chip["dense_flops_per_s"] = {k: v / f for k, v in chip["dense_flops_per_s"].items()}
    chip["memory_bandwidth_Bps"] /= f
    if "efficiency" in chip:
        eff = chip["efficiency"]
        for table in ("dispatch_fwd_s", "dispatch_bwd_s"):
            eff[table] = {k: v * f for k, v in eff.get(table, {}).items()}
        for k, v in list(eff.items()):
            if k.endswith("_s") and isinstance(v, float):
                eff[k] = v * f
        eff["rank_contention"] = eff.get("rank_contention", 1.0) * f
        eff["source"] = f"EXTRAPOLATED to {nproc} ranks by time sharing: " + eff["source"]
    chip["source"] = f"EXTRAPOLATED to {nproc} ranks from {base.n_chips}: " + chip["source"]
    level = dataclasses.replace(base.levels[0], size=nproc, latency_s=base.levels[0].latency_s * f,
                                bandwidth_Bps=base.levels[0].bandwidth_Bps / f,
                                source=f"EXTRAPOLATED to {nproc} ranks by time sharing from "
                                       f"{base.n_chips}; " + base.levels[0].source)
    return dataclasses.replace(base, chip=hardware.chip_from_dict(chip, "extrapolated chip"),
                               levels=(level,), n_chips=nproc)


def measurement_samples(out: dict) -> list[tuple]:
    """A run's time series for the store (and removed from `out`): each step's time, then the
    profiler's samples, as (t_s, step, metric, value)."""
    steps = [(sum(out["step_times_s"][:i]), i, "step_time_s", t)
             for i, t in enumerate(out["step_times_s"])]
    return steps + [tuple(s) for s in out.pop("samples", [])]


def finish(results: list[dict], spec: RunSpec, plan: Plan, graph, cluster, predicted,
           device_name: str) -> dict[str, Any]:
    """Every rank's results -> the measurement: step-time statistics, rates, MFU and HFU
    against the chip's dense peak, bytes per collective, peak memory, the prediction."""
    out = summarise(results, spec)
    step = out["step_time_s"]
    nproc = len(results)
    dtype = plan.dtype if plan.dtype in cluster.chip.dense_flops_per_s else "fp32"
    peak = cluster.chip.peak_flops_per_s(dtype)
    model_flops = float(graph.model_flops) * plan.global_batch_size
    hardware_flops = (model_flops
                      + float(graph.recompute_flops(plan.recompute)) * plan.global_batch_size)
    out.update(model=spec.model, plan=plan.compact(), n_chips=nproc, device=device_name,
               samples_per_s=plan.global_batch_size / step,
               tokens_per_s=plan.global_batch_size * graph.seq / step if graph.seq else None,
               model_tflops_per_chip=model_flops / step / nproc / 1e12,
               hardware_tflops_per_chip=hardware_flops / step / nproc / 1e12,
               mfu=model_flops / (step * nproc * peak), hfu=hardware_flops / (step * nproc * peak),
               predicted=predicted.to_json())
    return out


def run(model: str, plan: str | Plan, nproc: int, *, overrides: dict | None = None,
        steps: int = 5, warmup: int = 2, min_timed_s: float = 0.0, device: str = "cpu",
        timeout_s: float = 300.0,
        store=None, compile: bool = False, seed: int = 0,
        fault: dict | None = None, cp_impl: str = "ring", probe: bool = False
        ) -> dict[str, Any]:
    """Train `steps` steps of `plan` on `nproc` local ranks; measured beside predicted.
    With `min_timed_s`, more steps when `steps` would be timed for less than that (short
    steps on a shared host: one interruption moves the median of 5 steps, not of 100).

    Keys: `step_time_s` (median; `step_time_p10_s`, `step_time_p90_s`), `samples_per_s`,
    `tokens_per_s`, `model_tflops_per_chip`, `hardware_tflops_per_chip`, `mfu`, `hfu`,
    `memory_peak_bytes`, `comm` (bytes and calls per collective kind, busiest rank),
    `predicted` (the cost model's `Estimate.to_json()` for the same plan), `device`, and the
    stored ids when `store` is given. A failed rank raises `RunError` (after storing the
    failure when a store is given). `fault` injects a failure (tests: see `launch`).
    `cp_impl` picks the context-parallel attention: `ring` (ours) or `torch` (CUDA only).
    With `probe`, every rank times `host_probe.HostProbe` after each timed step, outside the
    step's timer, and `host_probe` gives the medians (how fast the host ran meanwhile).
    """
    plan = Plan.parse(plan) if isinstance(plan, str) else plan
    overrides = dict(overrides or {})
    cfg = models.get(model, **overrides)
    graph = costmodel.graph(cfg)
    device_name = "cpu"
    if device == "cuda":
        from ..profiler import nvml
        device_name = nvml.device_name(0)
    cluster = prediction_cluster(device, nproc, device_name)
    predicted = costmodel.estimate(graph, plan, cluster)
    if isinstance(min_timed_s, bool) or not isinstance(min_timed_s, (int, float)) \
            or not min_timed_s >= 0:
        raise ValueError(f"min_timed_s must be a number of seconds >= 0, got {min_timed_s!r}")
    spec = RunSpec(model=model, plan=plan.compact(), overrides=overrides, steps=steps,
                   min_timed_s=float(min_timed_s), warmup=warmup, device=device, seed=seed, compile=compile,
                   cp_impl=cp_impl, probe=bool(probe))
    pred_id = None
    if store is not None:
        pred_id = store.save("prediction", model=model, plan=plan.compact(), cluster=cluster.name,
                             n_chips=nproc, payload=predicted.to_json(),
                             family=models.family_of(cfg).name, device=device_name)
    try:
        results = launch(spec, nproc, timeout_s=timeout_s, fault=fault)
    except RunError as exc:
        if store is not None:
            store.save("measurement", model=model, plan=plan.compact(), cluster=cluster.name,
                       n_chips=nproc, payload={"spec": dataclasses.asdict(spec)},
                       family=models.family_of(cfg).name, device=device_name, status="failed",
                       error=str(exc)[:4000], prediction_id=pred_id)
        raise
    out = finish(results, spec, plan, graph, cluster, predicted, device_name)
    if store is not None:
        samples = measurement_samples(out)
        out["measurement_id"] = store.save(
            "measurement", model=model, plan=plan.compact(), cluster=cluster.name, n_chips=nproc,
            payload=out, family=models.family_of(cfg).name, device=device_name,
            prediction_id=pred_id, samples=samples)
        out["prediction_id"] = pred_id
    return out
