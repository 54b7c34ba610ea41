"""How fast the analytic layer graphs of the biggest models build (target: under 1 s each).

Run: .venv/bin/python benchmarks/bench_graph_build.py
Prints, per model, the build time, the ops per second and the ratio to the 1 s target.
"""
import time

from workbench import costmodel

TARGET_S = 1.0

for name in ("llama3-405b", "gpt-1t", "mixtral-8x7b", "resnet152"):
    costmodel.graph(name)  # warm imports
    runs = 5
    start = time.perf_counter()
    for _ in range(runs):
        g = costmodel.graph(name)
    seconds = (time.perf_counter() - start) / runs
    print(f"{name:14s} {len(g.layers):6d} ops  {seconds * 1e3:8.1f} ms  "
          f"{len(g.layers) / seconds:10.0f} ops/s  {seconds / TARGET_S:.3f} of the 1 s target")
