"""The CPU validation set: every point trained for real, beside its calibrated prediction.

Run: .venv/bin/python benchmarks/cpu_validation.py [--world 2,4] [--only SUBSTRING]
     [--steps 8] [--min-timed-s 1] [--warmup 2] [--repeat 3] [--json FILE]
     [--profile FILE] [--calibrate-each-round DIR | --pin-level [--probe]]
     [--repredict ROWS [--profiles DIR] [--no-probe]]

Each point (a model flavour with its overrides, a plan, a world size) runs with
`workbench.runner.run` (gloo, one torch thread per rank; after `warmup` steps, `steps` timed
steps or as many more as last `min-timed-s` seconds; the median step time). With
`--repeat N` every point runs N times in fresh processes, in N rounds over the whole set (so
that a slow spell of the shared host lands on one run of many points, not on every run of
a few), and the median of its runs is kept. Each point is predicted by the cost model with
the calibrated `cpu` profile
(`workbench/data/cpu.json`, `workbench calibrate`; `run` returns the prediction). The table
gives measured and predicted step times and the error (predicted / measured - 1), then the
largest and the median absolute error against the targets (15% and 8%). Failed points are
listed and left out of the summary. Timings are noisy on a shared 2-core machine: rerun on a
quiet one for the figures that count. With `--repeat` of 2 or more the table also gives the
run-to-run spread (a point's slowest run over its fastest, minus 1), the floor under any
prediction's error: on the 2-core EPYC of 2026-12-07, two fresh runs of every point within
40 minutes differed by a median of 15.3% and up to 107%, 56 of 111 by more than 15%
(`benchmarks/results-cpu-validation-2026-12-07b.txt`).

Before it runs anything it times the host's reference figures (`calibrate_drift.measure_host`,
about 8 s) and warns when they differ from those the profile was calibrated at: a profile
holds for the host it measured. `--profile FILE` predicts with FILE (a calibration of this
host) instead of the shipped profile.

`--calibrate-each-round DIR` calibrates the host (`workbench calibrate --world 2,4 --ops-for`
the study, about 17-20 minutes) into DIR/round-N.json before each round and predicts that round's
runs with it; a point's prediction is then the median of its rounds' predictions. The speed of
a shared host drifts over tens of minutes (the matmul peak read 61 to 92 GFLOP/s on one night),
so a calibration taken an hour before a run predicts the host of an hour before.

`--pin-level` pins each run to the host's level at the minute it ran: every round runs the
calibration study's 32 points (`studies/cpu-calibration.toml`, other shapes than the
validated ones) spread evenly among the set's, and each validation run's prediction is
scaled by the median of measured / predicted over the 6 reference runs of its world nearest
to it in time (`calibrate_drift.host_level`). On a host whose speed moves by 10-20% within
minutes and by more over hours, this leaves the error the profile's shape makes; the table
gives the unpinned errors beside (the profile's own level). One level per stretch of minutes
from other models: nothing is fitted to the validated points.

`--probe` (with `--pin-level`) follows the host by the second instead: every rank of every
run, validated or reference, times a fixed probe after each timed step
(`runner.host_probe`: 10 small matmuls and 100 tiny adds, outside the step's timer), and a
run's level is the references' measured / predicted per unit of probe time, times its own
probe. On the 2-core EPYC of 2026-12-08, two sets of 222 runs pinned by time gave medians of
9.6% and 9.3% (77 and 80 of 111 within 15%), by the probe 7.0% and 7.5% (88 within each);
the probe took the run-to-run spread from 14.5% to 8.3% and from 10.4% to 6.6%
(`benchmarks/results-cpu-validation-2026-12-08b-host-probe.txt`, `-08c-...-barrier.txt`).
`--repredict ROWS --no-probe` pins such rows by time alone.

`--repredict ROWS` runs nothing: it predicts the measured rows of an earlier `--json` file
again with the current profile (after a new calibration, the same measured runs against the
new predictions; the measurements do not depend on the profile); with `--profiles DIR` (the
DIR of the `--calibrate-each-round` run that measured them) each run with its round's
profile, as the run itself predicted it.

The set is `studies/cpu-validation.toml` (111 points): every model family under DP and FSDP;
TP for the transformer families; PP for the families the runner splits; CP for Llama, GPT
and ViT; at world 2 and 4 (4 ranks share the 2 cores). `workbench study run` on the same file
stores the same runs beside their predictions and simulations.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench import costmodel, models  # noqa: E402
from workbench.calibrate_drift import (ERROR_TARGET_REL, PIN_NEIGHBOURS,  # noqa: E402
                                       host_level, run_spread_rel, spread_line)
from workbench.plan import Plan  # noqa: E402

TARGET_MAX, TARGET_MEDIAN = ERROR_TARGET_REL, 0.08
"""Largest and median absolute error the calibrated CPU profile is to reach."""

STUDY = Path(__file__).resolve().parents[1] / "studies" / "cpu-validation.toml"
"""The validation set: the points of this study (its header says how they were chosen)."""

FIT_STUDY = STUDY.with_name("cpu-calibration.toml")
"""The calibration's real-model runs (`workbench calibrate --fit-on`): other shapes of 6 of
the validation's 16 model families; the other 10 are reported apart, never seen by the fit."""


def points(worlds=(2, 4), study: Path = STUDY) -> list[dict]:
    """Every point of `study` (default `studies/cpu-validation.toml`; `FIT_STUDY`: the
    reference runs of `--pin-level`) at the given world sizes: {model, overrides, plan,
    world}."""
    from workbench.study import load
    return [{"model": p.model, "overrides": p.overrides, "plan": p.plan, "world": p.chips}
            for p in load(study).points if p.chips in worlds]


def interleave(n_points: int, n_references: int) -> list[tuple[str, int]]:
    """The order of one round of `--pin-level`: ("point", i) and ("reference", j), the
    references spread evenly among the points (item k of n sits at (k + 0.5) / n; a point
    first where they tie), so that every stretch of the round has reference runs in it."""
    items = [((i + 0.5) / n_points, 0, "point", i) for i in range(n_points)]
    items += [((j + 0.5) / n_references, 1, "reference", j) for j in range(n_references)]
    return [(kind, k) for _, _, kind, k in sorted(items)]


def pin(points: list[dict], runs: list[list[dict]], references: list[dict]) -> None:
    """Scale the prediction of every run of `points[i]` (`runs[i]`, each with its end time
    `t_s`) by the host's level at the time it ran (`host_level` from `references`, each
    `{t_s, world, measured_s, predicted_s}`), in place: `level`, `raw_predicted_s` (the
    profile's own prediction) and `predicted_s` (raw x level). Again on the same runs, from
    their raw predictions (the level may move as references arrive)."""
    for point, point_runs in zip(points, runs):
        for r in point_runs:
            if "error" in r or "t_s" not in r:
                continue
            raw = r.setdefault("raw_predicted_s", r["predicted_s"])
            level = host_level(r["t_s"], point["world"], references, probe_s=r.get("probe_s"))
            if level is not None:
                r["level"], r["predicted_s"] = level, raw * level


def check(point: dict) -> str | None:
    """Why a point is impossible (the plan's rules), or None."""
    try:
        cfg = models.get(point["model"], **point["overrides"])
        Plan.parse(point["plan"]).validate(point["world"], costmodel.graph(cfg))
    except ValueError as e:
        return str(e).splitlines()[0]
    return None


def run_once(point: dict, steps: int, warmup: int, min_timed_s: float,
             probe: bool = False) -> dict:
    """One run of a point in fresh processes: its median step time and the prediction (with
    `probe`, the host probe's index as `probe_s`), or the reason it failed (an impossible
    plan, a failed rank)."""
    from workbench.runner import run
    why = check(point)
    if why:
        return {"error": why}
    try:
        out = run(point["model"], point["plan"], point["world"], overrides=point["overrides"],
                  steps=steps, warmup=warmup, min_timed_s=min_timed_s, timeout_s=300,
                  probe=probe)
    except Exception as e:  # a failed run is reported, not fatal
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return {"step_time_s": out["step_time_s"], "steps": len(out["step_times_s"]),
            "predicted_s": out["predicted"]["step_time_s"],
            "breakdown_s": out["predicted"]["breakdown_s"],
            **({"probe_s": out["host_probe"]["index_s"],
                "probe_parts_s": [out["host_probe"][k] for k in ("matmul_s", "small_ops_s")]}
               if probe else {})}


def combine(point: dict, runs: list[dict]) -> dict:
    """A point's row from its runs: the median of the runs' median step times beside the
    prediction (or the first failure)."""
    failed = [r["error"] for r in runs if "error" in r]
    if failed:
        return {**point, "error": failed[0]}
    measured = statistics.median(r["step_time_s"] for r in runs)
    # one profile: all equal; --calibrate-each-round: one per round
    predicted = statistics.median(r["predicted_s"] for r in runs)
    return {**point, "measured_s": measured, "predicted_s": predicted,
            "error_rel": predicted / measured - 1,
            "run_medians_s": [r["step_time_s"] for r in runs],
            "run_predictions_s": [r["predicted_s"] for r in runs],
            "timed_steps": [r["steps"] for r in runs],
            "breakdown_s": runs[0]["breakdown_s"],
            **({"run_levels": [r["level"] for r in runs],
                "run_t_s": [r["t_s"] for r in runs],
                **({"run_probes_s": [r["probe_s"] for r in runs], "pinned_by": "probe",
                    "run_probe_parts_s": [r.get("probe_parts_s") for r in runs]}
                   if all("probe_s" in r for r in runs) else {"pinned_by": "time"}),
                "raw_predicted_s": statistics.median(r["raw_predicted_s"] for r in runs)}
               if all("level" in r for r in runs) else {})}


def predict(point: dict, profile: str | None = None) -> dict:
    """The cost model's step time and breakdown for a point, with the calibrated profile at
    `profile` (default: the shipped `workbench/data/cpu.json`, as `run` predicts)."""
    from workbench import hardware
    from workbench.runner import prediction_cluster
    graph = costmodel.graph(models.get(point["model"], **point["overrides"]))
    cluster = (hardware.load_cpu_cluster(point["world"], path=profile) if profile
               else prediction_cluster("cpu", point["world"]))
    est = costmodel.estimate(graph, point["plan"], cluster)
    return {"predicted_s": est.step_time_s, "breakdown_s": est.to_json()["breakdown_s"]}


def calibrate_now(out: Path) -> str:
    """Calibrate this host for the set (`workbench calibrate --world 2,4 --ops-for` both
    studies `--fit-on` the calibration study) into `out`; its path."""
    import subprocess
    cmd = [sys.executable, "-m", "workbench.cli", "calibrate", "--device", "cpu",
           "--world", "2,4", "--ops-for", str(STUDY), "--ops-for", str(FIT_STUDY),
           "--fit-on", str(FIT_STUDY), "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return str(out)


def repredict(rows: list[dict], profiles: str | None = None,
              profile: str | None = None, references: list[dict] | None = None,
              use_probe: bool = True) -> list[dict]:
    """Rows of an earlier `--json` with their predictions made again by the current code and
    profile (what a new calibration or cost model would have said of the same measured runs;
    failed rows kept): the profile at `profile` (default: the shipped one). With `profiles`,
    the folder of a `--calibrate-each-round` run, run i is predicted with its round's profile
    (`round-i.json`) and the row keeps the median. Rows of a `--pin-level` run need its
    `references` (the `.references.json` beside its `--json`): they are predicted with the
    same profile and every run is pinned again to the level they give: by the host probe
    when the runs carry one (`--probe`), unless `use_probe` is False (by time alone: the
    same runs pinned both ways)."""
    pinned = any("run_levels" in r for r in rows)
    if pinned and (references is None or profiles):
        raise ValueError("these rows were pinned (--pin-level): predicting them again needs "
                         "their reference runs (the .references.json beside the --json file) "
                         "and one profile (not --profiles)")
    refs, cache = [], {}
    for x in references if pinned else []:
        key = (x["model"], x["plan"], x["world"], json.dumps(x["overrides"], sort_keys=True))
        if key not in cache:
            cache[key] = predict(x, profile)["predicted_s"]
        refs.append({**x, "predicted_s": cache[key]})
    out = []
    for r in rows:
        if "measured_s" not in r:
            out.append(r)
            continue
        if profiles:
            runs = [predict(r, str(Path(profiles) / f"round-{i + 1}.json"))
                    for i in range(len(r["run_medians_s"]))]
            again = {"predicted_s": statistics.median(x["predicted_s"] for x in runs),
                     "run_predictions_s": [x["predicted_s"] for x in runs],
                     "breakdown_s": runs[0]["breakdown_s"]}
        else:
            again = predict(r, profile)
        if "run_levels" in r:
            probes = r.get("run_probes_s") if use_probe else None
            levels = [host_level(t, r["world"], refs, probe_s=probes[k] if probes else None)
                      for k, t in enumerate(r["run_t_s"])]
            each = [again["predicted_s"] * level for level in levels]
            again = {**again, "raw_predicted_s": again["predicted_s"], "run_levels": levels,
                     "pinned_by": "probe" if probes else "time",
                     "run_predictions_s": each, "predicted_s": statistics.median(each)}
        out.append({**r, **again, "error_rel": again["predicted_s"] / r["measured_s"] - 1})
    return out


def references_path(rows_json: str) -> Path:
    """Where `--pin-level` writes the reference runs of the rows at `rows_json`, and where
    `--repredict` looks for them: beside it, its stem + `.references.json`."""
    path = Path(rows_json)
    return path.with_name(path.stem + ".references.json")


def fitted_families(profile: str | None = None) -> set[str]:
    """Families whose runs the profile's framework figures were fitted to (its
    `measurement.framework_fit.runs`; empty for a profile without a fit)."""
    from workbench.hardware import _cpu_file
    fit = _cpu_file(profile)["measurement"].get("framework_fit") or {}
    return {family(r["model"]) for r in fit.get("runs", [])}


def family(model: str) -> str:
    """A flavour's model family (`gpt-tiny` -> `gpt`; a name that is no flavour, itself)."""
    flavour = models.flavours().get(model)
    return flavour.family if flavour else model


def spread_rel(row: dict) -> float | None:
    """How far a point's runs differ: its slowest run's median step time over its fastest
    one's, minus 1 (None for a failed point or one run; `calibrate_drift.run_spread_rel`)."""
    return run_spread_rel(row.get("run_medians_s") or [])


def spread_summary(rows: list[dict]) -> str | None:
    """One line on the run-to-run spread of the points measured more than once (None when
    none was): its median and largest, and how many points' own runs differ by more than
    the 15% target (`calibrate_drift.spread_line`)."""
    return spread_line([r.get("run_medians_s") or [] for r in rows], "points", TARGET_MAX)


def host_check(profile: str | None = None) -> str:
    """This host's reference figures beside the profile's (`profile`, default the shipped
    one), in words, with `calibrate_drift.host_mismatch_warning` when they differ."""
    from workbench.calibrate import Settings
    from workbench.calibrate_drift import (host_mismatch_warning, measure_host,
                                           profile_host_figures)
    from workbench.hardware import _cpu_file
    now = measure_host(Settings())
    then = profile_host_figures(_cpu_file(profile)["measurement"])
    words = lambda f: (f"matmul {f['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, copy "  # noqa: E731
                       f"{f['copy_Bps'] / 1e9:.1f} GB/s")
    line = (f"host check: this host {words(now)}; the profile's host "
            f"{words(then) if then else 'not recorded'}")
    warning = host_mismatch_warning(then, now)
    return line + (f"\n{warning}" if warning else "")


def summary(errors: list[float], label: str, failed: str = "") -> str:
    """One line: how many (`failed`: how many failed, in words), the largest and median
    |error| against the targets, how many within 15%."""
    return (f"{label}{len(errors)} points{failed}: max |error| {100 * max(errors):.1f}% (target "
            f"{100 * TARGET_MAX:.0f}%), median |error| {100 * statistics.median(errors):.1f}% "
            f"(target {100 * TARGET_MEDIAN:.0f}%), {sum(e <= TARGET_MAX for e in errors)} "
            f"within {100 * TARGET_MAX:.0f}%")


def table(rows: list[dict], seen: set[str] | None = None) -> str:
    """The printed table and summary (with `seen`, the families the framework fit saw, also
    apart: those families at other shapes, and the families it never saw)."""
    lines = [f"{'model':15s} {'plan':34s} {'world':>5s} {'measured':>10s} {'predicted':>10s} "
             f"{'error':>7s}"]
    for r in rows:
        head = f"{r['model']:15s} {r['plan']:34s} {r['world']:5d}"
        if "error" in r:
            lines.append(f"{head}  FAILED: {r['error']}")
        else:
            lines.append(f"{head} {r['measured_s'] * 1e3:8.2f}ms {r['predicted_s'] * 1e3:8.2f}ms "
                         f"{100 * r['error_rel']:+6.1f}%")
    errors = [abs(r["error_rel"]) for r in rows if "error_rel" in r]
    if errors:
        lines.append("\n" + summary(errors, "", f" ({len(rows) - len(errors)} failed)"))
    pinned = [r for r in rows if "run_levels" in r]
    if pinned:
        levels = [v for r in pinned for v in r["run_levels"]]
        how = ("per unit of host-probe time, x the run's own probe"
               if all(r.get("pinned_by") == "probe" for r in pinned) else "")
        lines.append(f"pinned: each run's prediction x the host's level at its time (measured "
                     f"/ predicted of the {PIN_NEIGHBOURS} reference runs of its world nearest "
                     f"to it{', ' + how if how else ''}), level median "
                     f"x{statistics.median(levels):.3f}, "
                     f"range x{min(levels):.3f}-x{max(levels):.3f}")
        lines.append(summary([abs(r["raw_predicted_s"] / r["measured_s"] - 1) for r in pinned],
                             "unpinned (the profile's own predictions): "))
    spread = spread_summary(rows)
    if spread:
        lines.append(spread)
    for label, keep in ((f"families the fit saw at other shapes ({', '.join(sorted(seen or ()))}): ",
                         True), ("families the fit never saw: ", False)):
        part = [abs(r["error_rel"]) for r in rows
                if "error_rel" in r and (family(r["model"]) in (seen or ())) == keep]
        if seen and part:
            lines.append(summary(part, label))
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run the set (or the points matching --only) and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default="2,4", help="world sizes, e.g. 2,4")
    ap.add_argument("--only", default="", help="only points whose 'model plan' contains this")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per point (fresh processes each, in rounds over the whole set; "
                         "the median is kept)")
    ap.add_argument("--min-timed-s", type=float, default=1.0,
                    help="time each run for at least this many seconds (default 1)")
    ap.add_argument("--profile", default=None, metavar="FILE",
                    help="predict with this calibration profile instead of the shipped one")
    ap.add_argument("--calibrate-each-round", default=None, metavar="DIR",
                    help="calibrate the host into DIR/round-N.json before each round and "
                         "predict that round's runs with it (a host whose speed drifts)")
    ap.add_argument("--pin-level", action="store_true",
                    help="run the calibration study's points among the set's in every round "
                         "and scale each run's prediction by the host's level at its time "
                         "(the reference runs nearest to it; a host whose speed moves by "
                         "the minute)")
    ap.add_argument("--probe", action="store_true",
                    help="with --pin-level: time the host probe after every step of every "
                         "run and pin each run to the level per unit of probe time of the "
                         "reference runs, times its own probe (runner.host_probe)")
    ap.add_argument("--no-probe", action="store_true",
                    help="with --repredict: pin rows measured with --probe by time alone")
    ap.add_argument("--json", default=None, help="also write every row to this file (with "
                    "--pin-level, the reference runs beside it: FILE's stem + "
                    ".references.json)")
    ap.add_argument("--repredict", default=None, metavar="ROWS",
                    help="run nothing: predict the measured rows of an earlier --json file "
                         "again with the current profile, and print that table")
    ap.add_argument("--profiles", default=None, metavar="DIR",
                    help="with --repredict: the DIR of the --calibrate-each-round run that "
                         "measured ROWS; each run is predicted with its round's profile")
    args = ap.parse_args(argv)
    if args.profiles and not args.repredict:
        ap.error("--profiles goes with --repredict")
    if args.profiles and args.profile:
        ap.error("--profile and --profiles: choose one")
    if args.profile and args.calibrate_each_round:
        ap.error("--profile and --calibrate-each-round: choose one")
    if args.pin_level and args.calibrate_each_round:
        ap.error("--pin-level and --calibrate-each-round: choose one")
    if args.probe and not args.pin_level:
        ap.error("--probe goes with --pin-level (the reference runs give the level per unit "
                 "of probe time)")
    if args.no_probe and not args.repredict:
        ap.error("--no-probe goes with --repredict")
    if args.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.repredict:
        refs = references_path(args.repredict)
        try:
            rows = repredict(json.loads(Path(args.repredict).read_text()), args.profiles,
                             args.profile,
                             json.loads(refs.read_text()) if refs.exists() else None,
                             use_probe=not args.no_probe)
        except ValueError as e:
            ap.error(str(e))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        print(table(rows, fitted_families(args.profile)))
        return 0
    if not args.calibrate_each_round:
        print(host_check(args.profile), flush=True)
    worlds = tuple(int(w) for w in args.world.split(","))
    chosen = [p for p in points(worlds)
              if not args.only or args.only in f"{p['model']} {p['plan']}"]
    runs: list[list[dict]] = [[] for _ in chosen]
    refs_chosen = points(worlds, FIT_STUDY) if args.pin_level else []
    references: list[dict] = []
    start = time.perf_counter()
    rows = []
    for round_ in range(args.repeat):  # rounds: a slow spell of the host hits one run per point
        profile = args.profile
        if args.calibrate_each_round:
            folder = Path(args.calibrate_each_round)
            folder.mkdir(parents=True, exist_ok=True)
            print(f"  [{time.perf_counter() - start:6.0f} s] round {round_ + 1}: calibrating",
                  flush=True)
            profile = calibrate_now(folder / f"round-{round_ + 1}.json")
        for kind, i in interleave(len(chosen), len(refs_chosen)):
            p = chosen[i] if kind == "point" else refs_chosen[i]
            if kind == "point" and runs[i] and "error" in runs[i][-1]:
                continue  # failed once: reported, not retried
            r = run_once(p, args.steps, args.warmup, args.min_timed_s, args.probe)
            r["t_s"] = time.time()
            if profile and "error" not in r:
                r.update(predict(p, profile))
            if kind == "reference":
                if "error" not in r:
                    references.append({**p, "t_s": r["t_s"], "measured_s": r["step_time_s"],
                                       "predicted_s": r["predicted_s"],
                                       **({"probe_s": r["probe_s"],
                                           "probe_parts_s": r["probe_parts_s"]}
                                          if args.probe else {})})
                note = r.get("error") or f"{r['step_time_s'] * 1e3:.2f} ms"
                print(f"  [{time.perf_counter() - start:6.0f} s] round {round_ + 1}/"
                      f"{args.repeat} reference {i + 1}/{len(refs_chosen)} {p['model']} "
                      f"{p['plan']} w{p['world']}: {note}", flush=True)
                continue
            runs[i].append(r)
            note = r.get("error") or (f"{r['step_time_s'] * 1e3:.2f} ms ({r['steps']} steps) "
                                      f"vs {r['predicted_s'] * 1e3:.2f} ms")
            print(f"  [{time.perf_counter() - start:6.0f} s] round {round_ + 1}/{args.repeat} "
                  f"{i + 1}/{len(chosen)} {p['model']} {p['plan']} w{p['world']}: {note}",
                  flush=True)
        if args.pin_level:
            pin(chosen, runs, references)
        rows = [combine(p, r) for p, r in zip(chosen, runs)]
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
            if args.pin_level:
                references_path(args.json).write_text(json.dumps(references, indent=1))
    print(table(rows, fitted_families(args.profile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
