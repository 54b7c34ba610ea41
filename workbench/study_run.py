"""Run a study: evaluate its points (local processes or Ray), store each point as it ends,
resume where an earlier run stopped.

A point's results (prediction, simulation, measurement) are stored together in one
transaction (`Store.save_point`), so an interrupted study keeps every finished point whole
and a second run skips exactly those. Predict/simulate points run in parallel (a process pool,
or Ray tasks); `run` points train for real with their own ranks, one point at a time (ranks of
two runs would share the cores and spoil both timings).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from .study import KIND_OF_STAGE, Point, Study


@dataclass
class StudySummary:
    """What one `run_study` call did."""

    total: int
    """Points in the study."""
    skipped: int
    """Points already stored by an earlier run (not repeated)."""
    stored: int
    """Points evaluated and stored by this run."""
    failed: int
    """Of `stored`, points whose results are failures (no plan fits, a run that crashed)."""
    seconds: float
    """Wall time of this run."""


# -- one point -----------------------------------------------------------------------------

def point_cluster(point: Point):
    """The cluster a point is predicted and simulated on."""
    return cluster_for(point.cluster, point.chips)


def cluster_for(name: str, chips: int):
    """A study's cluster (`cpu`: this host as the runner predicts it; a preset; a file)."""
    from . import hardware
    if name == "cpu":
        from .runner import prediction_cluster
        return prediction_cluster("cpu", chips)
    return hardware.resolve_cluster(name, chips)


def evaluate_point(study: Study, point: Point) -> list[dict]:
    """Predict / simulate / run one point; the results as `Store.save_point` entries.

    Never raises for a point that cannot be done (no plan fits, a run that fails): the
    failure is a result with `status = failed` and the error, stored like any other.
    """
    from . import costmodel, models
    from .costmodel import CostOptions

    cfg = models.get(point.model, **point.overrides)
    family = models.family_of(cfg).name
    common = {"model": point.model, "cluster": _cluster_label(point), "n_chips": point.chips,
              "family": family}
    kinds = [KIND_OF_STAGE[s] for s in study.stages]
    try:
        graph = costmodel.graph(cfg)
        cluster = point_cluster(point)
        options = CostOptions(**point.options)
        plan, extra = point.plan, {}
        if plan is None:  # search the best plan at this point
            s = study.search
            found = costmodel.search(graph, cluster, point.chips, point.global_batch,
                                     options=options, dtype=s.dtype, fixed=s.fix or None,
                                     recompute=s.recompute, max_tp=s.max_tp)
            top = found.top(s.top)
            extra["search"] = {"evaluated": found.evaluated, "seconds": found.seconds,
                               "top": top}
            if not top:
                raise _NoPlan(f"no plan fits memory ({found.evaluated} plans evaluated)")
            plan = top[0]["plan"]
        resolved = dataclasses.replace(point, plan=plan)
        tag = {"study_point": resolved.to_json(), **extra}
        out = []
        estimate = costmodel.estimate(graph, plan, cluster, options)
        if "prediction" in kinds:
            out.append({"kind": "prediction", "plan": plan, **common,
                        "payload": {**estimate.to_json(), **tag}})
        if "simulation" in kinds:
            from . import simulator
            sim = simulator.simulate(graph, plan, cluster, options)
            out.append({"kind": "simulation", "plan": plan, **common,
                        "payload": {**sim.to_json(), **tag}})
        if "measurement" in kinds:
            out.append(_measure(study, resolved, plan, common, tag))
        return out
    except Exception as exc:  # noqa: BLE001 - a failed point is a stored answer
        error = str(exc) if isinstance(exc, _NoPlan) else \
            f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
        tag = {"study_point": point.to_json()}
        return [{"kind": k, "plan": point.plan or "search", **common, "payload": tag,
                 "status": "failed", "error": error[:4000]} for k in kinds]


class _NoPlan(Exception):
    """No plan of the search fits memory."""


def _cluster_label(point: Point) -> str:
    return os.path.basename(point.cluster) if point.cluster.endswith((".toml", ".json")) \
        else point.cluster


def _measure(study: Study, point: Point, plan: str, common: dict, tag: dict) -> dict:
    """Train the point for real (its own ranks) and return the measurement entry."""
    from .runner import RunError, run
    from .runner import measurement_samples

    r = study.run
    try:
        out = run(point.model, plan, point.chips, overrides=point.overrides, steps=r.steps,
                  min_timed_s=r.min_timed_s, warmup=r.warmup, device=r.device, timeout_s=r.timeout_s)
    except RunError as exc:
        return {"kind": "measurement", "plan": plan, **common, "payload": tag,
                "status": "failed", "error": str(exc)[:4000], "device": r.device}
    samples = measurement_samples(out)
    out.pop("comm_per_rank", None)
    return {"kind": "measurement", "plan": plan, **common, "device": out.get("device"),
            "payload": {**out, **tag}, "samples": samples}


# -- the study -----------------------------------------------------------------------------

def pending_points(study: Study, store) -> list[Point]:
    """The points of `study` not yet stored (a point is stored whole or not at all)."""
    done = store.study_points(study.name)
    return [p for p in study.points if not study.kinds <= done.get(p.key, set())]


def run_study(study: Study, store, *, executor: str = "local", jobs: int | None = None,
              ray_address: str | None = None, match: str | None = None,
              progress: Callable[[int, int, Point, float | None], None] | None = None,
              quiet: bool = False) -> StudySummary:
    """Evaluate every pending point of `study` and store each as it finishes.

    `executor`: `local` (a process pool of `jobs` workers, default the core count; `jobs=1`
    runs in this process) or `ray` (`ray.init(address=ray_address)`; None starts a local Ray).
    `match` keeps only points whose key contains it. `progress(done, total, point, eta_s)`
    is called after each stored point (the app's progress bar); by default a bar with an ETA
    is drawn on stderr. Ctrl-C stops after the points already stored; run again to resume.
    """
    if executor not in ("local", "ray"):
        raise ValueError(f"executor must be 'local' or 'ray', not {executor!r}")
    start = time.perf_counter()
    store.save_study(study.name, study.text)
    todo = pending_points(study, store)
    points = [p for p in study.points if match is None or match in p.key]
    todo = [p for p in todo if p in points]
    total, skipped = len(points), len(points) - len(todo)
    bar = None if quiet or progress is not None else ProgressBar(total, skipped)
    state = {"done": skipped, "stored": 0, "failed": 0}

    def finished(point: Point, results: list[dict]) -> None:
        store.save_point(study.name, point.key, results)
        state["done"] += 1
        state["stored"] += 1
        state["failed"] += any(r.get("status") == "failed" for r in results)
        eta = _eta(start, state["stored"], len(todo) - state["stored"])
        if progress is not None:
            progress(state["done"], total, point, eta)
        if bar is not None:
            bar.update(state["done"], point, eta, state["failed"])

    runs = [p for p in todo if "run" in study.stages]
    quick = [p for p in todo if "run" not in study.stages]
    try:
        if executor == "ray":
            _run_ray(study, quick + runs, finished, ray_address)
        else:
            _run_local(study, quick, finished, jobs)
            for p in runs:  # one real run at a time
                finished(p, evaluate_point(study, p))
    finally:
        if bar is not None:
            bar.close()
    return StudySummary(total, skipped, state["stored"], state["failed"],
                        time.perf_counter() - start)


def _eta(start: float, done: int, left: int) -> float | None:
    if done == 0:
        return None
    return (time.perf_counter() - start) / done * left


def _run_local(study: Study, points: list[Point], finished, jobs: int | None) -> None:
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1 or len(points) <= 1:
        for p in points:
            finished(p, evaluate_point(study, p))
        return
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pool = ProcessPoolExecutor(max_workers=min(jobs, len(points)),
                               mp_context=mp.get_context("spawn"))
    try:
        futures = {pool.submit(evaluate_point, study, p): p for p in points}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                finished(futures[f], f.result())
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _run_ray(study: Study, points: list[Point], finished, address: str | None) -> None:
    try:
        import ray
    except ImportError:
        raise ValueError("--executor ray needs Ray: pip install 'workbench[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
    remote = ray.remote(evaluate_point)
    study_ref = ray.put(study)
    refs = {remote.remote(study_ref, p): p for p in points}
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                finished(refs[ref], ray.get(ref))
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


class ProgressBar:
    """A one-line progress bar with an ETA on a terminal (a line per point otherwise)."""

    def __init__(self, total: int, done: int, stream=None, width: int = 28):
        self.total, self.stream, self.width = total, stream or sys.stderr, width
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        if done:
            self.stream.write(f"{done} of {total} points already stored: resuming\n")
        self.update(done, None, None, 0)

    def update(self, done: int, point: Point | None, eta_s: float | None, failed: int) -> None:
        """Redraw after `done` points."""
        filled = int(self.width * done / max(self.total, 1))
        bar = "#" * filled + "." * (self.width - filled)
        eta = "" if eta_s is None else f"  ETA {format_seconds(eta_s)}"
        fail = f"  {failed} failed" if failed else ""
        what = f"  {point.label}" if point is not None else ""
        line = f"[{bar}] {done}/{self.total}{eta}{fail}{what}"
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150))
        elif point is not None:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def format_seconds(s: float) -> str:
    """12.3 -> '12s', 125 -> '2m05s', 4000 -> '1h06m'."""
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def summary_rows(study: Study, store) -> list[dict[str, Any]]:
    """One row per stored point: its plan and the predicted / simulated / measured figures."""
    by_point: dict[str, dict] = {}
    for r in store.results(study=study.name):
        by_point.setdefault(r["point"], {})[r["kind"]] = r
    rows = []
    for p in study.points:
        got = by_point.get(p.key, {})
        any_result = next(iter(got.values()), None)
        row = {"point": p.label, "plan": any_result["plan"] if any_result else "-"}
        for kind, short in (("prediction", "pred"), ("simulation", "sim"),
                            ("measurement", "meas")):
            if kind in study.kinds:
                r = got.get(kind)
                row[f"{short}_step_s"] = r and r["step_time_s"]
                row[f"{short}_mfu"] = r and r["mfu"]
        row["status"] = "-" if not got else \
            ("failed" if any(r["status"] == "failed" for r in got.values()) else "ok")
        rows.append(row)
    return rows
