"""Plan-search speed: plans evaluated per second on one core (target: at least 50,000).

Run: .venv/bin/python benchmarks/bench_search.py
The space: a 1T-parameter GPT (Narayanan et al. 2021's 1008B row) on 3,072 A100s (dgx-a100)
with a global batch of 3,072: every valid combination of DP/FSDP/TP/PP/VPP/CP, microbatch
size, recomputation, schedule, ZeRO stage and sequence parallelism. Times generation and
evaluation together, best of 3, and prints the rate and its ratio to the target.
"""
import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"  # one core, as the target says

from workbench import costmodel, hardware  # noqa: E402

TARGET_PLANS_PER_S = 50_000

graph = costmodel.graph("gpt-1t")
cluster = hardware.cluster("dgx-a100", 3072)
best = None
for _ in range(3):
    result = costmodel.search(graph, cluster, 3072, 3072)
    best = result if best is None or result.seconds < best.seconds else best
rate = best.evaluated / best.seconds
print(f"{best.evaluated:,} valid plans in {best.seconds:.2f} s: {rate:,.0f} plans/s "
      f"({rate / TARGET_PLANS_PER_S:.2f}x the {TARGET_PLANS_PER_S:,} plans/s target); "
      f"{len(best.ranking):,} fit in 80 GB")
top = best.top(1)[0]
print(f"best: {top['plan']}  step {top['step_time_s']:.1f} s  MFU {100 * top['mfu']:.1f}%")
