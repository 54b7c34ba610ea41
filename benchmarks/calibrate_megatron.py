"""Predicted versus published: the Megatron-LM 2021 GPT table on DGX A100 (Narayanan et al.).

Run: .venv/bin/python benchmarks/calibrate_megatron.py [--csv PATH]

Each row of shared/data/megatron2021_table1.csv (copied to workbench/data) is a GPT model with
its tensor- and pipeline-parallel sizes, GPU count and global batch; the microbatch size and
the number of model chunks per stage are not published, so the search picks the fastest
(as the authors tuned theirs). Fixed from the paper: fp16, full recomputation, interleaved
schedule (vpp > 1 where the layers allow, otherwise 1F1B), no data-parallel overlap, unfused
attention (2021, before FlashAttention) and the scatter/gather pipeline optimisation.
Prints achieved TFLOP/s per GPU (recomputation counted, the paper's Eq. 3) beside the
published figure, with the error per row, the mean absolute error and the worst row.
"""
from __future__ import annotations

import argparse
import csv
from importlib import resources

from workbench import costmodel, hardware
from workbench.costmodel import CostOptions

OPTIONS = CostOptions(attention="unfused", overlap_dp=False, pp_scatter_gather=True)


def rows(path=None):
    """The table's rows (comment lines skipped)."""
    text = (open(path).read() if path else
            resources.files("workbench").joinpath("data/megatron2021_table1.csv").read_text())
    lines = [l for l in text.splitlines() if l and not l.startswith("#")]
    return list(csv.DictReader(lines))


def predict(row: dict) -> dict:
    """Best predicted plan for one published row."""
    layers, hidden, heads = int(row["layers"]), int(row["hidden_size"]), int(row["attention_heads"])
    tp, pp, gpus = int(row["tensor_parallel"]), int(row["pipeline_parallel"]), int(row["gpus"])
    gbs = int(row["global_batch"])
    g = costmodel.graph("gpt", layers=layers, hidden=hidden, heads=heads, seq=2048, vocab=51200,
                        dropout=0.1)  # Megatron-LM's default hidden and attention dropout
    cluster = hardware.cluster("dgx-a100", gpus)
    fixed = {"tp": tp, "pp": pp, "cp": 1, "fsdp": 1, "zero": 0, "sp": False,
             "recompute": "full"}
    result = costmodel.search(g, cluster, gpus, gbs, options=OPTIONS, dtype="fp16",
                              microbatch_sizes=(1, 2, 4, 8), fixed=fixed)
    best = result.top(1)[0]
    i = int(result.ranking[0])
    return {"plan": best["plan"], "tflops": float(result.metrics["hardware_tflops_per_chip"][i]),
            "fits": bool(result.metrics["fits"][i])}


def main() -> None:
    """Print the table and the error summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", help="another copy of the table")
    args = parser.parse_args()
    errors = []
    print(f"{'params':>8} {'gpus':>5} {'tp':>3} {'pp':>3}  {'published':>9} {'predicted':>9} "
          f"{'error':>7}  best plan")
    for row in rows(args.csv):
        p = predict(row)
        published = float(row["achieved_tflops_per_gpu"])
        err = (p["tflops"] - published) / published
        errors.append(err)
        print(f"{row['params_billion']:>8} {row['gpus']:>5} {row['tensor_parallel']:>3} "
              f"{row['pipeline_parallel']:>3}  {published:9.1f} {p['tflops']:9.1f} "
              f"{100 * err:+6.1f}%  {p['plan']}")
    mae = sum(abs(e) for e in errors) / len(errors)
    worst = max(errors, key=abs)
    print(f"\nmean absolute error {100 * mae:.1f}% (target < 5%), worst row {100 * worst:+.1f}% "
          f"(target within 10%)")


if __name__ == "__main__":
    main()
