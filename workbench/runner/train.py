"""One rank's job: build the model, apply the plan, feed its data, train and measure.

Runs inside a process that already joined the process group (spawned by `launch.py` or by
torchrun). Everything a rank measures comes back as a plain dict; rank 0's parent combines
them into a `Measurement`.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from .. import costmodel, models
from ..plan import Plan
from . import families, host_probe
from .comm_counter import CommCounter
from .parallelize import build_mesh, parallelize, sync_expert_grads


@dataclass
class RunSpec:
    """What to run (picklable: it crosses process boundaries)."""

    model: str
    """Flavour name."""
    plan: str
    """Compact plan."""
    overrides: dict = field(default_factory=dict)
    """Model config overrides."""
    steps: int = 5
    """Timed steps (at least; see `min_timed_s`)."""
    min_timed_s: float = 0.0
    """Time at least this many seconds: more timed steps than `steps` when the last warm-up
    step says `steps` would be shorter (every rank runs the largest count any rank asks)."""
    warmup: int = 2
    """Untimed steps first (DDP rebuilds its buckets on its second step)."""
    device: str = "cpu"
    """`cpu` (gloo) or `cuda` (nccl)."""
    seed: int = 0
    """Weights and data seed."""
    compile: bool = False
    """torch.compile each unit."""
    grads: bool = False
    """Return the first step's loss and full gradients (for equivalence tests)."""
    lr: float = 1e-4
    """AdamW learning rate of the timed steps (Adam: the cost model's default optimizer)."""
    cp_impl: str = "ring"
    """Context-parallel attention: `ring` (ours, any device) or `torch` (PyTorch's
    `context_parallel`, CUDA only; contiguous shards like ours, so the two agree)."""
    probe: bool = False
    """Time `host_probe.HostProbe` after every timed step (outside its timer) on every rank:
    how fast the host ran while the run did."""


def _slice_batch(inputs, target, plan: Plan, coords: dict, seq_model: bool):
    """This rank's share: its DP slice of the global batch, its CP slice of the sequence."""
    dp_index = coords["dp_replicate"] * plan.dp_shard + coords["dp_shard"]
    local = plan.global_batch_size // plan.dp_degree
    rows = slice(dp_index * local, (dp_index + 1) * local)
    inputs = tuple(x[rows] for x in inputs)
    target = None if target is None else target[rows]
    if plan.cp > 1 and inputs[0].is_floating_point():
        return inputs, target  # images: the model keeps its token shard (see apply_cp)
    if plan.cp > 1:
        if not seq_model:
            raise ValueError("context parallel needs a sequence model")
        s = inputs[0].shape[1] // plan.cp
        cols = slice(coords["cp"] * s, (coords["cp"] + 1) * s)
        inputs = tuple(x[:, cols] for x in inputs)
        target = None if target is None else target[:, cols]
    return inputs, target


def run_rank(spec: RunSpec) -> dict:
    """Train `spec.steps` timed steps (after the warm-up and one untimed step that counts the collectives) on this rank; return its measurements."""
    plan = Plan.parse(spec.plan)
    cfg = models.get(spec.model, **spec.overrides)
    graph = costmodel.graph(cfg)
    plan.validate(dist.get_world_size(), graph)
    device = torch.device(spec.device, torch.cuda.current_device()) if spec.device == "cuda" \
        else torch.device("cpu")
    mesh = build_mesh(plan, spec.device)
    coords = {name: mesh[name].get_local_rank() for name in mesh.mesh_dim_names}
    torch.manual_seed(spec.seed)
    with torch.device(device):
        model = models.build(cfg)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(plan.dtype)
    if dtype is None:
        raise ValueError(f"the runner trains in fp32, bf16 or fp16, not dtype={plan.dtype}")
    model.to(dtype)  # the whole model in the plan's dtype (the cost model's element size)
    model.train()
    named = {n: m for n, m in model.named_modules()}
    param_names = [n for n, _ in model.named_parameters()]
    counter = CommCounter()
    for name in ("tp", "cp", "pp", "dp_replicate", "dp_shard", "dp_shard_cp", "dp_cp"):
        group = mesh[name].get_group()
        counter.group_labels.setdefault(group.group_name, name)  # the first name of a group
    par = parallelize(model, plan, mesh, device, compile=spec.compile, counter=counter,
                      cp_impl=spec.cp_impl)
    inputs, target = families.batch(cfg, plan.global_batch_size, spec.seed)
    inputs, target = _slice_batch(inputs, target, plan, coords, graph.seq is not None)
    inputs = tuple(x.to(device, dtype) if x.is_floating_point() else x.to(device) for x in inputs)
    target = None if target is None else target.to(device)
    params = [p for m in par.modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=spec.lr, foreach=False)  # per-parameter temporaries
    out = {"rank": dist.get_rank(), "coords": coords}
    if spec.grads:
        loss = torch.tensor(_step(par, plan, inputs, target, opt, update=False),
                            dtype=torch.float64)
        if par.last_stage:  # the global loss: the mean over the data-parallel ranks
            dist.all_reduce(loss, group=mesh["dp_cp"].get_group())
            out["loss"] = float(loss) / (plan.dp_degree * plan.cp)
        out["grads"] = _full_grads(model, named, param_names, par)
        if plan.ep > 1:  # expert weights are this rank's slice of the experts
            shard = dist.get_process_group_ranks(mesh["dp_shard_cp"].get_group())
            ep_rank = shard.index(dist.get_rank()) % plan.ep
            per = cfg.experts // plan.ep
            experts = {id(p) for p in par.expert_params}
            out["grad_slices"] = {n: [ep_rank * per, (ep_rank + 1) * per]
                                  for n in out["grads"]
                                  if id(_param(named, n)) in experts}
        opt.zero_grad(set_to_none=True)
    warm_s = None
    for _ in range(spec.warmup):
        start = time.perf_counter()
        _step(par, plan, inputs, target, opt)
        _sync(device)
        warm_s = time.perf_counter() - start
    with counter:  # one untimed step counts the collectives (the counting slows it down)
        start = time.perf_counter()
        _step(par, plan, inputs, target, opt)
        _sync(device)
        warm_s = warm_s or time.perf_counter() - start
    steps = timed_steps(spec.steps, spec.min_timed_s, warm_s, device)
    times = []
    sampler = None
    if dist.get_rank() == 0:
        from ..profiler import make_sampler
        sampler, out["sampler_message"] = make_sampler(spec.device)
        sampler.start()
    probe = host_probe.HostProbe() if spec.probe else None
    probes = []
    for i in range(steps):
        if sampler is not None:
            sampler.mark_step(i)
        _sync(device)
        dist.barrier()
        start = time.perf_counter()
        _step(par, plan, inputs, target, opt)
        _sync(device)
        times.append(time.perf_counter() - start)
        if probe is not None:  # every rank at once: the same sharing of cores in any plan
            dist.barrier()
            probes.append(probe())
    if sampler is not None:
        out["samples"] = [tuple(r) for r in sampler.stop().to_rows()]
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step ends when its slowest rank ends
    out["step_times_s"] = t.tolist()
    if probe is not None:
        out["probe_samples_s"] = probes
    out["comm"] = counter.summary()
    out["memory_peak_bytes"] = _peak_memory(par, plan, inputs, target, opt, device)
    return out


MAX_TIMED_STEPS = 1000
"""Most timed steps `min_timed_s` may ask for."""


def steps_for(steps: int, min_timed_s: float, warm_step_s: float) -> int:
    """Timed steps: `steps`, or enough steps of `warm_step_s` to last `min_timed_s`, at most
    `MAX_TIMED_STEPS`."""
    if min_timed_s <= 0:
        return steps
    return max(steps, min(MAX_TIMED_STEPS, math.ceil(min_timed_s / max(warm_step_s, 1e-6))))


def timed_steps(steps: int, min_timed_s: float, warm_step_s: float,
                device: torch.device = torch.device("cpu")) -> int:
    """`steps_for` on this rank, then the largest count over the ranks (one all-reduce), so
    that every rank runs the same steps."""
    count = torch.tensor([steps_for(steps, min_timed_s, warm_step_s)], dtype=torch.int64,
                         device=device)  # nccl: on the GPU
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(par, plan: Plan, inputs, target, opt, update: bool = True) -> float:
    """One optimizer step: all microbatches forward and backward, then the update."""
    # DDP's gradients are views into its buckets: zero them in place rather than dropping
    # them, or the next backward allocates a second copy beside the buckets.
    opt.zero_grad(set_to_none=par.ddp is None)
    with contextlib.ExitStack() as stack:
        if plan.tp > 1:  # vocabulary-parallel cross-entropy over the sharded logits
            from torch.distributed.tensor.parallel import loss_parallel
            stack.enter_context(loss_parallel())
        if par.torch_cp is not None:  # PyTorch's CP patches SDPA inside this context
            stack.enter_context(par.torch_cp())
        loss = _microbatches(par, plan, inputs, target)
    sync_expert_grads(par)
    if update:
        opt.step()
    return loss


def _microbatches(par, plan: Plan, inputs, target) -> float:
    """Forward and backward of every microbatch (the schedule's, with PP); the mean loss."""
    if par.schedule is not None:
        losses = []
        kwargs = {"target": target, "losses": losses} if par.last_stage else {}
        args = inputs if par.first_stage else ()
        par.schedule.step(*args, **kwargs)
        loss = float(torch.stack(losses).detach().mean()) if losses else 0.0
    else:
        m = plan.microbatches
        module = par.ddp or par.model
        chunks = [torch.chunk(x, m) for x in inputs]
        tchunks = torch.chunk(target, m) if target is not None else [None] * m
        loss = 0.0
        for i in range(m):
            last = i == m - 1
            _gradient_sync(par, last)
            ctx = par.ddp.no_sync() if par.ddp is not None and not last else _nullcontext()
            with ctx:
                out = module(*[c[i] for c in chunks])
                value = families.loss(out, tchunks[i]) * par.loss_scale / m
                value.backward()
            loss += float(value.detach())
    return loss


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _gradient_sync(par, last: bool) -> None:
    """FSDP reduces gradients once per step, on the last microbatch (as the cost model)."""
    for m in par.modules:
        if hasattr(m, "set_requires_gradient_sync"):
            m.set_requires_gradient_sync(last)


def _param(named, name):
    path, _, leaf = name.rpartition(".")
    return getattr(named[path], leaf)


def _full_grads(model, named, param_names, par) -> dict:
    """Full gradient (a numpy array) of every parameter this rank trains, by original name."""
    from torch.distributed.tensor import DTensor
    owned = {id(p) for m in par.modules for p in m.parameters()}
    grads = {}
    for name in param_names:
        path, _, leaf = name.rpartition(".")
        p = getattr(named[path], leaf)
        if id(p) not in owned or p.grad is None:
            continue
        g = p.grad
        full = (g.full_tensor() if isinstance(g, DTensor) else g).detach().cpu()
        grads[name] = full.float().numpy().copy()  # numpy: pickled by value across processes
    return grads


def _peak_memory(par, plan, inputs, target, opt, device) -> float:
    """Peak bytes of tensor memory during one step (CUDA allocator, or StorageTracker)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        _step(par, plan, inputs, target, opt)
        return float(torch.cuda.max_memory_allocated(device))
    from .memory import StorageTracker
    tracker = StorageTracker(*par.modules, opt)
    with tracker:
        _step(par, plan, inputs, target, opt)
    return float(tracker.peak)


def summarise(rank_results: list[dict], spec: RunSpec) -> dict:
    """Median / p10 / p90 step time and the per-kind bytes of the busiest rank."""
    times = rank_results[0]["step_times_s"]
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else [times[0]] * 9
    comm: dict[str, dict] = {}
    for r in rank_results:  # the rank that moved the most bytes of each kind
        for kind, v in r["comm"].items():
            if v["bytes"] > comm.get(kind, {"bytes": -1})["bytes"]:
                comm[kind] = v
    return {"step_time_s": statistics.median(times), "step_time_p10_s": q[0],
            "step_time_p90_s": q[-1], "step_times_s": times, "comm": comm,
            "comm_per_rank": [r["comm"] for r in rank_results],
            "memory_peak_bytes": max(r["memory_peak_bytes"] for r in rank_results),
            "memory_per_rank_bytes": [r["memory_peak_bytes"] for r in rank_results],
            "samples": rank_results[0].get("samples", []),
            "sampler_message": rank_results[0].get("sampler_message", ""),
            "spec": asdict(spec),
            **({"host_probe": host_probe.summarise([r["probe_samples_s"] for r in rank_results])}
               if spec.probe else {})}
