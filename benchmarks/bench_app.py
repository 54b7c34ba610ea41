"""Plan explorer speed: one update for Llama 3 405B on 16,384 H100s (target: under 300 ms) and
its simulated timeline (target: under 2 s).

Run: .venv/bin/python benchmarks/bench_app.py
Plan: Llama 3 405B's pre-training layout (Dubey et al. 2024, arXiv 2407.21783, section 3.3.2):
TP 8, PP 16, DP 128, global batch 2,048 sequences of 8,192 tokens, sequence parallel, full
recomputation. An update is `explorer_view.explore(state)` (the cost model, the headline numbers
and both figures) plus turning its figures into JSON as Dash does. It is timed cold (the first
update of the model, which builds its layer graph, after the app's start-up has loaded the model
registry) and warm (median of updates that each change the plan, so that every estimate is
computed afresh). The timeline is `explorer_view.timeline(state)`: the simulator in symmetric
mode (one representative rank per pipeline stage, 16 here) and its Gantt chart, plus the chart's
JSON. Prints times and their ratio to the targets; never fails on time.
"""
import statistics
import time

import plotly.io as pio

from workbench.app import explorer_view as view
from workbench.app.urls import ExplorerState

UPDATE_TARGET_S = 0.3
TIMELINE_TARGET_S = 2.0
PLAN = "dp=128,tp=8,pp=16,gbs=2048,sp=true,recompute=full"
VARIANTS = ("dp=128,tp=8,pp=16,gbs=2048,sp=true,recompute=selective",
            "dp=128,tp=8,pp=16,vpp=2,gbs=2048,sp=true,recompute=full",
            "dp=64,fsdp=2,tp=8,pp=16,gbs=2048,sp=true,recompute=full",
            "dp=128,tp=8,pp=16,mb=2,gbs=2048,sp=true,recompute=full",
            PLAN)


def state(plan: str) -> ExplorerState:
    """Llama 3 405B on 16,384 H100s (DGX SuperPOD preset) with `plan`."""
    return ExplorerState("llama3-405b", {}, "dgx-h100", 16384, plan)


def update_s(plan: str) -> tuple[float, float, view.ExplorerView]:
    """(seconds of the view function, seconds with its figures as JSON, the view)."""
    start = time.perf_counter()
    v = view.explore(state(plan))
    mid = time.perf_counter()
    pio.to_json(v.memory_figure), pio.to_json(v.breakdown_figure)
    return mid - start, time.perf_counter() - start, v


def main() -> None:
    """Print the update and timeline times against their targets."""
    start = time.perf_counter()  # what the server does before any update: the page's layout
    view.model_options()         # loads the model registry; one small update warms plotly
    view.explore(ExplorerState("llama-tiny", {}, "cpu", 1, "dp=1"))
    print(f"app start (model registry, first figure): {time.perf_counter() - start:.2f} s, once")
    cold_view, cold_total, v = update_s(PLAN)
    if v.estimate is None:
        raise SystemExit(f"the benchmark plan has problems: {v.reasons}")
    warm = [update_s(p)[:2] for p in VARIANTS * 3]
    warm_view = statistics.median(w[0] for w in warm)
    warm_total = statistics.median(w[1] for w in warm)
    e = v.estimate
    print(f"Llama 3 405B on 16,384 H100s, plan {e.plan}: step {e.step_time_s:.2f} s, "
          f"MFU {100 * e.mfu:.1f}%, {e.memory.peak_bytes / 1e9:.1f} GB per rank "
          f"({'fits' if e.memory.fits else 'does not fit'})")
    print(f"explorer update, cold (graph built): view {1e3 * cold_view:.1f} ms, with figure JSON "
          f"{1e3 * cold_total:.1f} ms = {cold_total / UPDATE_TARGET_S:.2f} of the "
          f"{1e3 * UPDATE_TARGET_S:.0f} ms target")
    print(f"explorer update, warm (median of {len(warm)} plan changes): view "
          f"{1e3 * warm_view:.1f} ms, with figure JSON {1e3 * warm_total:.1f} ms = "
          f"{warm_total / UPDATE_TARGET_S:.2f} of the target")
    start = time.perf_counter()
    t = view.timeline(state(PLAN))
    sim_s = time.perf_counter() - start
    pio.to_json(t.figure)
    total_s = time.perf_counter() - start
    ranks = len({tr_y for tr in t.figure.data for tr_y in tr.y})
    print(f"timeline: {t.summary}; {ranks} rows (one rank per pipeline stage)")
    print(f"timeline: simulate + Gantt {sim_s:.3f} s, with figure JSON {total_s:.3f} s = "
          f"{total_s / TIMELINE_TARGET_S:.2f} of the {TIMELINE_TARGET_S:.0f} s target")


if __name__ == "__main__":
    main()
