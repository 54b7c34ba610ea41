"""`workbench calibrate --fit-on STUDY`: the level of the framework figures, from real models.

The calibration prices DDP, FSDP, tensor, context and pipeline parallelism with tiny
synthetic models (`calibrate_framework.py`, `calibrate_collectives.py`): stacks of Linear
layers whose ranks do little but communicate. Their fits tell how a framework's cost splits
(per call, per tensor, per byte, per microbatch), but on a host whose ranks share cores the
level is off for real models: with 4 ranks on the 2-core development host the shipped
profile over-predicted FSDP, TP and CP at world 4 in every validation of 2026-12-05 (median
of nine sets of runs: FSDP +8%, TP +16%, CP +17%), and no setting of the synthetic models
(process group, compute between calls) priced both worlds.

So this step trains the points of a *calibration study* for real (`runner.run`, as the
validation does) and fits, per world, one scale per group of framework figures
(`DEFAULT_FIT_GROUPS`; with `--fit-compute-level`, one on the compute level too:
`COMPUTE_LEVEL`), so that the cost model's step times match the measured ones: least
squares on the relative error, with a weak prior that pulls every scale toward 1 (a group
no run exercises keeps its synthetic level) and bounds `SCALE_BOUNDS`. The scaled figures
replace the synthetic ones in the profile; the synthetic ones (`unscaled`), the scales, the
runs and the relative errors before and after are kept in `measurement.framework_fit`, and
a profile fitted again starts from its unscaled figures.

The calibration study must be held apart from what is validated: `studies/cpu-calibration.toml`
uses other shapes than `studies/cpu-validation.toml` and 6 of its 16 model families, so 10
families of the validation are never seen by the fit (`benchmarks/cpu_validation.py`
reports them apart). Its models' whole microbatches must be measured too (`--ops-for` it
as well as the validated study), or the fit absorbs the compute's own error.
"""
from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .calibrate_drift import spread_line

FIT_GROUPS = {
    "compute": ("model_passes_s",),
    "ddp": ("ddp_microbatch_s", "ddp_tensor_s", "ddp_byte_s", "ddp_step_s"),
    "fsdp_call": ("fsdp_gather_s", "fsdp_reduce_s", "fsdp_microbatch_s", "fsdp_step_s"),
    "per_tensor": ("fsdp_tensor_s", "optimizer_dtensor_s"),
    "tp_collective": ("tp_collective_s",),
    "tp_op": ("tp_op_fwd_s", "tp_op_bwd_s"),
    "cp_step": ("cp_step_s",),
    "pp_action": ("pp_action_s",),
    "pp_compute": ("pp_compute_factor",),
}
"""Groups of figures (`ChipEfficiency` fields) that share one scale: the host's compute
level (`compute`: every whole-microbatch time of `model_passes_s`, a table; see
`COMPUTE_LEVEL`); DDP's costs;
FSDP's costs per call (gathers, reductions: they come in a fixed ratio per unit, so one
scale), per microbatch and step; the cost per distributed-tensor parameter (FSDP's gathered
tensors and the optimizer's step on distributed tensors: FSDP and TP both); TP's cost per
collective call and per op on distributed-tensor weights; ring attention's cost per block
step; the pipeline's cost per action, and its stages' compute inside the schedule over
alone (`pp_compute_factor`, 1 before any fit). FSDP's cost per byte, the collectives' fit,
the kernels and the overlap keep their synthetic values."""

COMPUTE_LEVEL = """The compute level is fitted with the framework figures because the two are
measured minutes apart on a host whose speed moves: on 2026-12-08 the calibration timed the
models' microbatches at world 2 while the host read 64.5 GFLOP/s (its check at the start; 90
at the end), and the same microbatches timed again 40 minutes later ran a median 1.31x
faster (1.10-1.53x over the 27 models). The fit's runs, trained after the op timings, then
scaled every framework group of world 2 down (DDP x0.58, per tensor x0.56, ring attention
x0.41) to make up for compute priced slow: framework figures bent to carry the compute's
level. One scale on the microbatch times, fitted to the same runs, carries that level where
it belongs: compute x0.59, DDP x1.10 (with `pp_compute` beside it)."""
"""Why `compute` is a fit group (see the string), and `DEFAULT_FIT_GROUPS` why it is not one
by default."""

DEFAULT_FIT_GROUPS = tuple(g for g in FIT_GROUPS if g != "compute")
"""The groups a fit scales unless told otherwise (`--fit-compute-level` adds `compute`).
Pinned to the host's speed by the probe (`benchmarks/cpu_validation.py --pin-level --probe`),
two validation sets of 2026-12-08 (222 runs each) were closer without the compute scale:
median 6.2% and 4.9%, 92 and 95 of 111 within 15%, against 7.0% and 7.5%, 88 and 88 with it
(the same calibration's runs fitted both ways). One compute scale fitted to the calibration
study's runs, whose step times are mostly framework (GPT, Llama, LSTM: a few ms of compute),
moved every model's microbatch alike (x0.59 at world 2), and the compute-bound points paid:
of DP at world 2 and 4 of UNet, C3D, FCN and VGG in the two sets, 15 of 16 were beyond 15%
with it (-9% to -32%), 15 of 16 within without (-11% to +25%). The level the compute scale
was to carry is the pinning's to take out."""

SCALE_BOUNDS = (0.25, 4.0)
"""The range a scale may take: a fit that wants more than 4x off the synthetic level says
the model is missing something, not that the level is off."""

PRIOR_WEIGHT = 0.07
"""Weight of the prior pulling each scale toward 1, in units of relative error per unit of
log scale: a scale of 1.5 (log 0.41) costs as much as one run 2.8% off; a group the runs
barely see stays near 1."""


def _world_chips(profile: dict) -> list[tuple[int, dict]]:
    """(ranks, chip table) of every world of a profile, the top-level chip (the
    one-rank-per-core world) as its host's world."""
    return ([(w["ranks"], w["chip"]) for w in profile.get("worlds", [])]
            + [(profile["host_level"]["size"], profile["chip"])])


def scaled_profile(profile: dict, scales: dict[int, dict[str, float]],
                   unscaled: dict[int, dict[str, float]]) -> dict:
    """A copy of `profile` whose world `w` figures are `unscaled[w][figure] x scales[w][group]`
    (the top-level chip, the one-rank-per-core world, with its world's)."""
    out = copy.deepcopy(profile)
    for ranks, chip in _world_chips(out):
        if ranks not in scales:
            continue
        eff = chip["efficiency"]
        for group, figures in FIT_GROUPS.items():
            for fig in figures:
                if fig in unscaled[ranks]:
                    eff[fig] = _scaled(unscaled[ranks][fig], scales[ranks].get(group, 1.0))
    return out


def _scaled(figure, scale: float):
    """A figure times `scale`: a number, or a table of (forward, backward) seconds
    (`model_passes_s`) whose every entry is."""
    if isinstance(figure, dict):
        return {k: [float(x) * scale for x in v] for k, v in figure.items()}
    return float(figure) * scale


def _is_zero(figure) -> bool:
    """A figure no scale moves: 0 s, or an empty table."""
    return not figure if isinstance(figure, dict) else float(figure) == 0.0


def unscaled_figures(profile: dict) -> dict[int, dict[str, float]]:
    """Per world, the synthetic figures of `FIT_GROUPS`: the profile's own, or those kept by
    an earlier fit (`measurement.framework_fit.unscaled`), so that fits do not compound."""
    kept = (profile.get("measurement") or {}).get("framework_fit", {}).get("unscaled") or {}
    out = {}
    for w in profile.get("worlds", []):
        eff, old = w["chip"]["efficiency"], kept.get(str(w["ranks"]), {})
        # a figure an earlier fit did not scale (a group added since) is the chip's own
        out[w["ranks"]] = {f: copy.deepcopy(old[f]) if f in old else _own(eff, f)
                           for figs in FIT_GROUPS.values() for f in figs}
    return out


def _own(eff: dict, figure: str):
    """A chip's own value of a fitted figure; where it has none, `ChipEfficiency`'s default
    (0 s, 1 for `pp_compute_factor`, an empty table for `model_passes_s`)."""
    if figure == "model_passes_s":
        return {k: [float(x) for x in v] for k, v in eff.get(figure, {}).items()}
    from .costmodel.efficiency import ChipEfficiency
    return float(eff.get(figure, ChipEfficiency.__dataclass_fields__[figure].default))


def _predictor(runs: list[dict]) -> Callable[[dict], np.ndarray]:
    """predict(profile) -> the cost model's step seconds of every run (graphs built once)."""
    from . import costmodel, hardware, models
    graphs = [costmodel.graph(models.get(r["model"], **r.get("overrides", {}))) for r in runs]

    def predict(profile: dict) -> np.ndarray:
        clusters = {}
        out = []
        for r, g in zip(runs, graphs):
            if r["world"] not in clusters:
                clusters[r["world"]] = hardware.cpu_cluster_from_data(profile, r["world"])
            out.append(costmodel.estimate(g, r["plan"], clusters[r["world"]]).step_time_s)
        return np.array(out)
    return predict


def _solve_log_scales(t0, jac, measured, theta0, lo, hi, iterations: int = 50):
    """Minimise |(t0 + jac (exp(theta) - exp(theta0))) / measured - 1|^2 + |PRIOR_WEIGHT
    theta|^2 over theta in [lo, hi] (Gauss-Newton with damping, on the linear model of the
    step times around theta0: pure arithmetic, no cost-model calls)."""
    s0 = np.exp(theta0)

    def parts(theta):
        r = (t0 + jac @ (np.exp(theta) - s0)) / measured - 1
        return r, float(r @ r + (PRIOR_WEIGHT * theta) @ (PRIOR_WEIGHT * theta))
    theta, damping = theta0.copy(), 1e-4
    r, cost = parts(theta)
    for _ in range(iterations):
        j = jac * np.exp(theta)[None, :] / measured[:, None]  # d r / d theta
        a = np.vstack([j, PRIOR_WEIGHT * np.eye(len(theta))])
        b = -np.concatenate([r, PRIOR_WEIGHT * theta])
        delta = np.linalg.solve(a.T @ a + damping * np.eye(len(theta)), a.T @ b)
        new = np.clip(theta + delta, lo, hi)
        r_new, cost_new = parts(new)
        if cost_new < cost:
            theta, r, cost, damping = new, r_new, cost_new, damping / 3
            if np.abs(delta).max() < 1e-5:
                break
        else:
            damping *= 10
    return theta


def fit_scales(profile: dict, runs: list[dict], passes: int = 2,
               groups: tuple[str, ...] | None = None) -> dict:
    """Fit one scale per group (`groups` of `FIT_GROUPS`, default `DEFAULT_FIT_GROUPS`) and
    world to measured `runs` ({model, overrides, plan, world, step_time_s}); the others keep
    scale 1. Per world: the cost model's step times and their slopes in
    every group's scale (a step of 5%) give a linear model, solved for the log scales that
    minimise the relative errors (prediction / measured - 1) plus the prior `PRIOR_WEIGHT` x
    log(scale), within `SCALE_BOUNDS`; `passes` times, each linearised at the last answer
    (the step time is linear in most figures: the overlap and the shared-core pipeline bend
    it a little). Returns {scales, unscaled, error_before, error_after, unfitted} (per
    world; `unfitted`: the groups kept at 1 and why, `UNFITTED_WORDS`'s keys; errors
    per run, in run order, from the cost model itself)."""
    if not runs:
        raise ValueError("--fit-on: the study has no runs to fit the framework figures to")
    unscaled = unscaled_figures(profile)
    worlds = sorted({r["world"] for r in runs})
    missing = [w for w in worlds if w not in unscaled]
    if missing:
        raise ValueError(f"--fit-on: world {missing[0]} has runs but the profile has no "
                         f"figures for it (worlds: {sorted(unscaled)}); calibrate it first")
    groups = list(DEFAULT_FIT_GROUPS if groups is None else groups)
    unknown = [g for g in groups if g not in FIT_GROUPS]
    if unknown:
        raise ValueError(f"fit groups: {unknown[0]!r} is not one of {sorted(FIT_GROUPS)}")
    lo, hi = np.log(SCALE_BOUNDS[0]), np.log(SCALE_BOUNDS[1])
    scales = {w: {g: 1.0 for g in groups} for w in unscaled}
    before, after, unfitted = {}, {}, {}
    for w in worlds:
        sub = [r for r in runs if r["world"] == w]
        measured = np.array([r["step_time_s"] for r in sub], dtype=float)
        predict = _predictor(sub)

        def times(theta):
            trial = {**scales, w: dict(zip(groups, np.exp(theta)))}
            return predict(scaled_profile(profile, trial, unscaled))

        theta = np.zeros(len(groups))
        t0 = times(theta)
        before[w] = (t0 / measured - 1).tolist()
        for _ in range(passes):
            jac = np.zeros((len(sub), len(groups)))
            for j in range(len(groups)):
                step = theta.copy()
                step[j] = np.log(np.exp(theta[j]) * 1.05)
                jac[:, j] = (times(step) - t0) / (0.05 * np.exp(theta[j]))  # d t / d scale
            active = np.abs(jac).max(axis=0) > 0  # groups no run exercises stay at 1
            theta_new = theta.copy()
            if active.any():
                theta_new[active] = _solve_log_scales(t0, jac[:, active], measured,
                                                      theta[active], lo, hi)
            theta, t0 = theta_new, times(theta_new)
        scales[w] = dict(zip(groups, np.exp(theta).round(4).tolist()))
        after[w] = (t0 / measured - 1).tolist()
        unfitted[w] = {g: ("zero" if all(_is_zero(unscaled[w].get(f, 0.0)) for f in FIT_GROUPS[g])
                           else "unused") for g, on in zip(groups, active) if not on}
    return {"scales": {w: scales[w] for w in worlds}, "unscaled": unscaled,
            "error_before": before, "error_after": after, "unfitted": unfitted}


UNFITTED_WORDS = {"zero": "not fitted: its synthetic figures are 0 s, which no scale moves",
                  "unused": "not fitted: no run exercises it"}
"""Why a group kept scale 1 (`fit_scales`' `unfitted`): at world 2 the pipeline's synthetic
cost per action beyond its sends is 0 s on the 2-core host (`pp_action_s`: the 1F1B
microbatch of a 16 x 16 Linear cost no more than its two send/recv calls), so the fit cannot
price the pipeline there, whatever the runs say."""


def scale_words(scales: dict[str, float], unfitted: dict[str, str] | None = None) -> str:
    """A world's scales in words: `group xS`, or `group not fitted: why` for the groups the
    fit could not move (`UNFITTED_WORDS`)."""
    unfitted = unfitted or {}
    return ", ".join(f"{g} ({UNFITTED_WORDS[unfitted[g]]})" if g in unfitted else f"{g} x{v:.2f}"
                     for g, v in scales.items())


def apply_fit(profile: dict, runs: list[dict], study: str = "",
              groups: tuple[str, ...] | None = None) -> dict:
    """`profile` with its framework figures scaled to `runs` (`fit_scales` of `groups`), the
    fit kept in `measurement.framework_fit` (with the groups it fitted) and named in every
    scaled chip's efficiency source."""
    groups = DEFAULT_FIT_GROUPS if groups is None else tuple(groups)
    fit = fit_scales(profile, runs, groups=groups)
    out = scaled_profile(profile, fit["scales"], fit["unscaled"])
    from .calibrate_collectives import utc_stamp
    stamp = utc_stamp()
    out["measurement"]["framework_fit"] = {
        "study": study, "fitted_at": stamp, "groups": {g: list(FIT_GROUPS[g]) for g in groups},
        "scales": {str(w): s for w, s in fit["scales"].items()},
        "unscaled": {str(w): v for w, v in fit["unscaled"].items()},
        "error_before": {str(w): e for w, e in fit["error_before"].items()},
        "error_after": {str(w): e for w, e in fit["error_after"].items()},
        "unfitted": {str(w): u for w, u in fit["unfitted"].items()},
        "runs": runs}
    for ranks, chip in _world_chips(out):
        if ranks in fit["scales"]:
            s = fit["scales"][ranks]
            note = (f" Framework figures scaled to {sum(r['world'] == ranks for r in runs)} real "
                    f"runs of {Path(study).name or 'a calibration study'} ({stamp}, "
                    f"workbench calibrate --fit-on): "
                    + scale_words(s, fit["unfitted"].get(ranks)) + ".")
            src = chip["efficiency"].get("source", "")
            chip["efficiency"]["source"] = src.split(" Framework figures scaled")[0] + note
    return out


def measure_runs(study_path: str, log: Callable[[str], None] = print,
                 repeat: int = 1) -> list[dict]:
    """Train every point of a study for real (`runner.run`, the study's `[run]` settings), in
    fresh processes, one after the other, `repeat` times in rounds over the whole study (a
    slow spell of the host lands on one run of many points): [{model, overrides, plan, world,
    step_time_s (the median of its runs), run_step_times_s, steps (timed, over its runs)}].
    On the 2-core host two runs of a point at world 4 differ by a median of 11.5% (up to 39%),
    so one run per point fits part of that noise; with `repeat=3` (2026-12-07c) a point's
    three runs differed by a median of 30.8% (up to 80%; `fit_summary` prints it). A point
    that fails is a ValueError naming it: a fit on part of the study would be a fit of
    another study."""
    from .runner import run
    from .study import load
    if repeat < 1:
        raise ValueError(f"--fit-repeat must be >= 1, got {repeat}")
    study = load(study_path)
    cfg = study.run
    times: list[list[float]] = [[] for _ in study.points]
    steps = [0] * len(study.points)
    start, total = time.perf_counter(), repeat * len(study.points)
    for round_ in range(repeat):
        for i, p in enumerate(study.points):
            try:
                res = run(p.model, p.plan, p.chips, overrides=p.overrides,
                          steps=cfg.steps, warmup=cfg.warmup, min_timed_s=cfg.min_timed_s,
                          timeout_s=300)
            except Exception as e:
                raise ValueError(f"--fit-on {study_path}: {p.model} {p.plan} at {p.chips} ranks "
                                 f"failed: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200]}") from e
            times[i].append(res["step_time_s"])
            steps[i] += len(res["step_times_s"])
            done = round_ * len(study.points) + i + 1
            eta = (time.perf_counter() - start) / done * (total - done)
            log(f"  fit run {done}/{total}: {p.model} {p.plan} x{p.chips}: "
                f"{res['step_time_s'] * 1e3:.1f} ms (eta {eta:.0f} s)")
    return [{"model": p.model, "overrides": dict(p.overrides), "plan": p.plan,
             "world": p.chips, "step_time_s": statistics.median(t), "run_step_times_s": t,
             "steps": n} for p, t, n in zip(study.points, times, steps)]


def fit_summary(fit: dict) -> str:
    """Lines saying each world's scales and the runs' median |error| before and after, from a
    profile's `measurement.framework_fit`; with `--fit-repeat` above 1, also how far each
    point's own runs differ (`calibrate_drift.spread_line`): the part of the error no fit can
    remove, and how much the points' medians can be trusted."""
    lines = []
    for w, s in fit["scales"].items():
        b = statistics.median(abs(x) for x in fit["error_before"][w])
        a = statistics.median(abs(x) for x in fit["error_after"][w])
        lines.append(f"world {w}: " + scale_words(s, fit.get("unfitted", {}).get(w))
                     + f"; median |error| of its runs {b:.1%} -> {a:.1%}")
    spread = spread_line([r.get("run_step_times_s") or [] for r in fit.get("runs", [])],
                         "fit points")
    return "\n".join(lines + ([spread] if spread else []))


def check_fit_study(path: str) -> None:
    """ValueError (naming the file) unless `path` is a study whose points all have a plan
    (no `search`) and run on the cpu cluster."""
    from .study import load
    study = load(path)
    for p in study.points:
        if p.plan is None:
            raise ValueError(f"--fit-on {path}: {p.model} searches its plan; a calibration "
                             f"study names every plan")
        if p.cluster != "cpu":
            raise ValueError(f"--fit-on {path}: {p.model} runs on cluster {p.cluster!r}; a "
                             f"calibration study runs on this host (cluster preset 'cpu')")


def fit_for_args(profile: dict, args, log: Callable[[str], None] = print) -> dict:
    """`apply_fit` of the runs of `args.fit_on` (measured now) to `profile`."""
    log(f"training {args.fit_on}'s points for the framework fit")
    runs = measure_runs(args.fit_on, log, args.fit_repeat)
    out = apply_fit(profile, runs, args.fit_on, groups_for_args(args))
    log(fit_summary(out["measurement"]["framework_fit"]))
    return out


def groups_for_args(args) -> tuple[str, ...]:
    """The groups to fit: `DEFAULT_FIT_GROUPS`, with `compute` first under
    `--fit-compute-level`."""
    if getattr(args, "fit_compute_level", False):
        return ("compute",) + DEFAULT_FIT_GROUPS
    return DEFAULT_FIT_GROUPS


def refit_kept_runs(profile: dict, where: str, log: Callable[[str], None] = print,
                    groups: tuple[str, ...] | None = None) -> dict:
    """`apply_fit` of `profile` (of `groups`) to the runs its earlier fit keeps
    (`framework_fit.runs`): the same measurements, the current fit and cost model.
    ValueError naming `where` when it keeps none."""
    kept = (profile.get("measurement") or {}).get("framework_fit") or {}
    if not kept.get("runs"):
        raise ValueError(f"--refit-kept: {where} keeps no runs of a framework fit "
                         f"(calibrate it with --fit-on STUDY first)")
    out = apply_fit(profile, kept["runs"], kept.get("study", ""), groups)
    log(fit_summary(out["measurement"]["framework_fit"]))
    return out


def cmd_refit(args) -> int:
    """`workbench calibrate --merge A.json B.json ...` or `--profile P.json`, each optionally
    with `--fit-on STUDY`: refit or load, fit to the study's runs, write `--out`."""
    import json
    from .calibrate_cli import write_profile
    from .calibrate_merge import merge_files
    try:
        if args.merge and args.profile:
            raise ValueError("--merge and --profile both name the starting profile: give one")
        refit_kept = getattr(args, "refit_kept", False)
        if refit_kept and (not args.profile or args.fit_on or args.merge):
            raise ValueError("--refit-kept fits a --profile to the runs it keeps: give "
                             "--profile, and neither --fit-on nor --merge")
        if args.profile and not args.fit_on and not refit_kept:
            raise ValueError("--profile needs --fit-on STUDY or --refit-kept (there is "
                             "nothing else to do)")
        if args.fit_on:
            check_fit_study(args.fit_on)
        if args.merge:
            profile = merge_files(args.merge)
        else:
            try:
                profile = json.loads(Path(args.profile).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"--profile {args.profile}: cannot read it as a profile "
                                 f"({e})") from e
            from .hardware import check_cpu_data
            check_cpu_data(profile, f"--profile {args.profile}")
        if args.fit_on:
            profile = fit_for_args(profile, args)
        if refit_kept:
            profile = refit_kept_runs(profile, args.profile, groups=groups_for_args(args))
        write_profile(profile, args.out)
    except (ValueError, OSError) as e:
        print(f"error: {e}")
        return 2
    what = (f"the median of {len(args.merge)} calibrations' raw figures, refitted"
            if args.merge else f"{args.profile}")
    print(f"wrote {args.out}: {what}" + (f", framework figures fitted to {args.fit_on}"
                                          if args.fit_on else "")
          + (", fitted again to the runs it keeps" if refit_kept else "")
          + f"; worlds {', '.join(str(w['ranks']) for w in profile['worlds'])}")
    return 0
