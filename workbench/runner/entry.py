"""torchrun entry point for real (multi-node) jobs.

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m workbench.runner.entry --model llama3-8b --plan "fsdp=16,gbs=64" --device cuda

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous; every rank trains its part,
rank 0 gathers the results, prints the measurement beside the prediction as JSON and stores
both (unless --no-store).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

from .. import costmodel, models
from ..cli import parse_set
from ..plan import Plan
from . import finish, prediction_cluster
from .train import RunSpec, run_rank


def main(argv=None) -> int:
    """Run one rank of a torchrun job (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m workbench.runner.entry")
    p.add_argument("--model", required=True)
    p.add_argument("--plan", required=True)
    p.add_argument("--set")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--min-timed-s", type=float, default=0.0,
                   help="time at least this many seconds (more steps than --steps if needed)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--timeout", type=float, default=600.0, help="collective timeout, seconds")
    p.add_argument("--store")
    p.add_argument("--no-store", action="store_true")
    p.add_argument("--cp-impl", choices=("ring", "torch"), default="ring")
    args = p.parse_args(argv)
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=args.timeout))
    spec = RunSpec(args.model, args.plan, overrides=parse_set(args.set), steps=args.steps,
                   min_timed_s=args.min_timed_s, device=args.device, cp_impl=args.cp_impl)
    result = run_rank(spec)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        plan = Plan.parse(args.plan)
        cfg = models.get(args.model, **spec.overrides)
        graph = costmodel.graph(cfg)
        name = "cpu"
        if args.device == "cuda":
            from ..profiler import nvml
            name = nvml.device_name(0)
        cluster = prediction_cluster(args.device, len(gathered), name)
        out = finish(gathered, spec, plan, graph, cluster,
                     costmodel.estimate(graph, plan, cluster), name)
        samples = out.pop("samples")
        if not args.no_store:
            from ..store import Store
            out["measurement_id"] = Store(args.store).save(
                "measurement", model=args.model, plan=plan.compact(), cluster=cluster.name,
                n_chips=len(gathered), payload=out, family=models.family_of(cfg).name,
                device=name, samples=samples)
        print(json.dumps({k: v for k, v in out.items() if k != "comm_per_rank"}, default=str))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skips interpreter teardown, which aborts now and then with gloo threads
