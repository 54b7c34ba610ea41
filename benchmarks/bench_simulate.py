"""Simulator scale: one step of Llama 3 405B on 16,384 H100s (target: under 2 s of wall time).

Run: .venv/bin/python benchmarks/bench_simulate.py
Plan: TP 8, PP 16, DP 128, sequence 8,192, sequence parallel, full recomputation, 16
microbatches per pipeline (global batch 2,048 sequences, ~16.8M tokens, as Llama 3). Symmetric
mode: one representative rank per pipeline stage. Prints the events processed, events per
second, the wall time against the 2 s target, and the simulated step beside the cost model's.
"""
import time

from workbench import costmodel, hardware
from workbench.simulator import simulate

TARGET_S = 2.0
PLAN = "dp=128,tp=8,pp=16,gbs=2048,sp=true,recompute=full"

graph = costmodel.graph("llama3-405b")
cluster = hardware.cluster("dgx-h100", 16384)
runs = []
for record in (False, True):
    start = time.perf_counter()
    result = simulate(graph, PLAN, cluster, record=record)
    runs.append((record, time.perf_counter() - start, result))
for record, wall, r in runs:
    print(f"{'with' if record else 'without'} timeline: {r.events:,} events in {wall:.3f} s "
          f"({r.events / r.wall_s:,.0f} events/s), {wall / TARGET_S:.3f} of the {TARGET_S:.0f} s "
          f"target")
r = runs[-1][2]
print(f"simulated step {r.step_time_s:.2f} s, cost model {r.predicted_step_time_s:.2f} s, "
      f"MFU {100 * r.mfu:.1f}%, {len(r.timeline):,} timeline intervals")
