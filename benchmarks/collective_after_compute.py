"""What a small collective costs after compute, on this host's shared cores.

Run: .venv/bin/python benchmarks/collective_after_compute.py [--world 2,4] [--samples 7]

Every rank of a gloo world runs `k` chained 192^2 fp32 matmuls, then all-reduces 64 floats;
the same compute alone is timed back to back, and the difference (median over samples) is
what the all-reduce cost after that much compute. Printed for k = 0, 1, 3, 10 and 30, on the
default process group and on a `new_group` of the same ranks (the runner's plans use groups
of a device mesh). The calibration prices a collective from tight loops (k = 0) and puts what
real models pay on top into per-call framework figures measured with fixed amounts of
compute; this table shows how far a call's cost moves with the compute before it (README,
"What is still missing").
"""
import argparse

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workbench.calibrate_collectives import _timed
from workbench.calibrate_framework import _paired
from workbench.runner.launch import free_port, rank_environment

MATMULS = (0, 1, 3, 10, 30)


def _rank(rank: int, world: int, port: int, samples: int, results) -> None:
    """One rank: the table's rows (matmuls, group, all-reduce ms, compute ms); rank 0 reports."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    groups = {"default": None, "new_group": dist.new_group(list(range(world)))}
    start, factor, payload = torch.randn(192, 192), torch.randn(192, 192) / 14, torch.randn(64)
    rows = []
    for k in MATMULS:
        def compute():
            h = start
            for _ in range(k):
                h = h @ factor
        for name, group in groups.items():
            def both():
                compute()
                dist.all_reduce(payload, group=group)
            calls = 40 if k < 10 else 15  # the calibration's paired timing: drifts cancel
            rows.append((k, name, _paired(both, compute, "cpu", calls, samples) * 1e3,
                         _timed(compute, "cpu", calls, 1) * 1e3))
    if rank == 0:
        results.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def measure(world: int, samples: int) -> list[tuple]:
    """The table's rows for a world of `world` ranks (spawned processes)."""
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    with rank_environment("cpu"):
        procs = [ctx.Process(target=_rank, args=(r, world, port, samples, results))
                 for r in range(world)]
        for p in procs:
            p.start()
    rows = results.get()
    for p in procs:
        p.join()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", default="2,4", help="world sizes, comma-separated")
    parser.add_argument("--samples", type=int, default=7, help="samples per figure (median)")
    args = parser.parse_args()
    print(f"{'world':>5} {'matmuls':>7} {'compute':>9} {'group':>10} {'all-reduce after it':>20}")
    for world in (int(w) for w in args.world.split(",")):
        for k, group, extra_ms, compute_ms in measure(world, args.samples):
            print(f"{world:>5} {k:>7} {compute_ms:>7.2f}ms {group:>10} {extra_ms:>18.2f}ms")


if __name__ == "__main__":
    main()
