"""Framework costs measured by `workbench calibrate` on a world of ranks.

Each from several sizes of a tiny synthetic model, so that fixed start-up costs cancel, and
beyond the same model unsplit and the modelled collectives: DDP per microbatch, parameter
tensor and step; FSDP2 per unit all-gather and reduction; tensor parallelism per op on
distributed-tensor weights and per collective; pipeline-schedule actions; ring-attention steps;
AdamW on distributed-tensor parameters. Every rank runs them at once
(`calibrate_collectives.measure_rank`).
"""
from __future__ import annotations

import math

from .calibrate import Settings, chain_times, nnls, optimizer_tensor_s
from .calibrate_collectives import _timed, rank_contention


def _paired(a, b, device: str, inner: int, repeats: int) -> float:
    """Median over `repeats` samples of (seconds per call of `a` - of `b`), the two timed back
    to back in each sample (`_timed`, `inner` calls each), so that the host's drifts cancel
    in the difference instead of adding to it."""
    import statistics
    return statistics.median(_timed(a, device, inner, 1) - _timed(b, device, inner, 1)
                             for _ in range(repeats))


def _dp_extra_s(units: int, micro: int, mode: str, settings: Settings,
                layers: int = 1, width: int = 0) -> float:
    """Seconds a step of `mode` takes beyond the same step `plain` (`_paired`)."""
    step, plain = (_dp_step(units, micro, m, settings, layers, width)
                   for m in (mode, "plain"))
    return _paired(step, plain, settings.device, 3 if settings.quick else 8,
                   max(5, settings.repeats))


def _dp_step(units: int, micro: int, mode: str, settings: Settings, layers: int = 1,
             width: int = 0):
    """A step: forward + backward of `micro` microbatches through `units` units of `layers`
    Linear(width, width) each (0: `UNIT_WIDTH`) and a `compute_pad`, plus a root Linear,
    then a longer pad: `plain`, `fsdp` (FSDP2 per unit and root, gradients reduced on the
    last microbatch only, as the runner does) or `ddp` (DDP with bucket-view gradients,
    no_sync but on the last microbatch, as the runner does)."""
    import contextlib
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    dev, d = settings.device, width or UNIT_WIDTH
    torch.manual_seed(0)
    padded = not settings.quick and rank_contention(dist.get_world_size(), dev) == 1.0
    unit_pad = UNIT_PAD_MATMULS if padded else 0
    model = torch.nn.Sequential(torch.nn.Linear(d, d, device=dev), *[
        torch.nn.Sequential(*[torch.nn.Linear(d, d, device=dev) for _ in range(layers)],
                            compute_pad(unit_pad, dev))
        for _ in range(units)])
    pad = compute_pad(PAD_MATMULS if padded else 0, dev)
    run = model
    if mode == "fsdp":
        mesh = init_device_mesh(dev, (dist.get_world_size(),))
        for unit in model[1:]:
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif mode == "ddp":
        from .runner.parallelize import wrap_ddp
        run = wrap_ddp(model)  # the default group: the calibration's 1-D world
    x = torch.randn(2, d, device=dev)

    def step():
        for i in range(micro):
            last = i == micro - 1
            if mode == "fsdp":
                model.set_requires_gradient_sync(last)
            ctx = run.no_sync() if mode == "ddp" and not last else contextlib.nullcontext()
            with ctx:
                pad(run(x)).sum().backward()
    return step


UNIT_WIDTH = 16
"""Features of the Linear layers of `_dp_step`'s units."""

PAD_MATMULS = 15
"""Matmuls (192^2) of the `ComputePad` after the model, per microbatch: about 5 ms forward
and backward per rank at world 2 on the 2-core host, a microbatch of the study models'
order."""

UNIT_PAD_MATMULS = 2
"""Matmuls of the `ComputePad` closing each unit: the compute a block of the study models
does between two of FSDP's gathers (about 0.6 ms at world 2)."""


def compute_pad(matmuls: int, device: str):
    """A parameter-free module that adds zero times a chain of `matmuls` 192^2 matmuls from
    a leaf tensor that needs its gradient, so that forward and backward both compute (0: the
    identity). DDP and FSDP do not see it and the plain twin has the same, so it cancels in
    `_paired`; what it adds is the time a real model computes between collectives. On a
    shared CPU host a collective after a few ms of compute costs more than one in a tight
    loop (the communication threads have gone to sleep): DDP's step measured 1.2-1.5 ms
    dearer at world 2 after 2-30 ms of compute than after none, and FSDP's gathers dearer
    between real blocks than between empty ones; a model's step always pays that.

    `_dp_step` pads only where every rank has its own core (or GPU): with more ranks than
    cores the pads time-share the cores, the threads never idle, and the padded fit
    over-predicted DP, FSDP and PP at world 4 on this host by 17-29% in median."""
    import torch

    class ComputePad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            gen = torch.Generator().manual_seed(1)
            self.leaf = torch.randn(192, 192, generator=gen).to(device).requires_grad_(True)
            self.factor = (torch.randn(192, 192, generator=gen) / 14).to(device)

        def forward(self, out):
            h = self.leaf
            for _ in range(matmuls):
                h = h @ self.factor
            return out + 0.0 * h.sum()
    return ComputePad() if matmuls else torch.nn.Identity()


FSDP_WIDE = 256
"""Features of the wide units `measure_fsdp` adds (Linear(256, 256): 257 KB a layer), so
that a cost per gathered byte stands out: at world 2 FSDP's extra time grew from 70 ms with
1 KB units to 80-91 ms with 257 KB units (8 units, 2 microbatches), where the collectives
fitted in a tight loop add 1.6 ms."""


def measure_fsdp(settings: Settings) -> dict:
    """FSDP2's seconds beyond the unsharded model over 2 and 8 units of 1 and 4 Linear(16,
    16) layers and 2 and 8 units of one Linear(`FSDP_WIDE`, `FSDP_WIDE`), at 1 and 2
    microbatches: each row's counts in the engine's terms (`rows`: all-gathers, 2 per unit
    and microbatch and 1 for the root; parameter tensors gathered; gradient reductions, 1
    per unit and the root, per step; microbatches; 1), its bytes (`layer_bytes` of a layer,
    `layers` per unit) and its `extra_s`. `fsdp_fit` fits them once the collectives are
    known."""
    rows, extras, layer_bytes, layer_counts = [], [], [], []
    shapes = [(UNIT_WIDTH, units, layers) for units in (2, 8) for layers in (1, 4)]
    shapes += [(FSDP_WIDE, units, 1) for units in (2, 8)]
    for micro in (1, 2):
        for width, units, layers in shapes:
            extras.append(_dp_extra_s(units, micro, "fsdp", settings, layers, width))
            tensors = 2 * micro * (2 * units * layers + 1)  # weight + bias per layer
            rows.append([micro * (2 * units + 1), tensors, units + 1, micro, 1.0])
            layer_bytes.append((width * width + width) * 4)
            layer_counts.append(layers)
    return {"rows": rows, "extra_s": extras, "layer_bytes": layer_bytes,
            "layers": layer_counts}


def fsdp_fit(raw: dict, t) -> dict:
    """`measure_fsdp`'s rows fitted (>= 0) beyond the modelled collectives `t(kind, bytes)`
    (each gather whole, each reduction's bandwidth part: the engine counts one reduction
    latency itself): seconds per all-gather (`gather_s`), per parameter tensor gathered
    (`tensor_s`), per reduction (`reduce_s`, its latency included), per microbatch
    (`microbatch_s`), per step (`step_s`) and per byte gathered (`byte_s`)."""
    a, y = [], []
    for row, extra, b, layers in zip(raw["rows"], raw["extra_s"], raw["layer_bytes"],
                                     raw["layers"]):
        _, _, reduces, micro, _ = row
        units = reduces - 1
        unit = layers * b
        modelled = (micro * (t("all_gather", b) + 2 * units * t("all_gather", unit))
                    + units * (t("reduce_scatter", unit) - t("reduce_scatter", 0.0))
                    + t("reduce_scatter", b) - t("reduce_scatter", 0.0))
        a.append(list(row) + [micro * (1 + 2 * units * layers) * b])
        y.append(extra - modelled)
    gather, tensor, reduce, micro_s, step_s, byte_s = nnls(a, y)
    return {"gather_s": float(gather), "tensor_s": float(tensor), "reduce_s": float(reduce),
            "microbatch_s": float(micro_s), "step_s": float(step_s), "byte_s": float(byte_s)}


DDP_SHAPES = ((1, 1, UNIT_WIDTH), (8, 1, UNIT_WIDTH), (4, 4, UNIT_WIDTH), (8, 8, UNIT_WIDTH),
              (16, 8, UNIT_WIDTH), (2, 1, FSDP_WIDE), (8, 1, FSDP_WIDE))
"""(units, layers per unit, features) of `measure_ddp`'s models: 4, 18, 34, 130 and 258
parameter tensors of 1 KB layers, and 6 and 18 tensors of 257 KB layers (0.8 and 2.4 MB of
gradients), so that a cost per tensor and one per gradient byte both stand out. Per tensor:
over 6, 12 and 18 tensors (the fit up to 2026-12-04) the same host fitted 0, 22, 66 and 76 us
per tensor in four calibrations; over this spread, slopes of 5.7-8.1 us at world 2 and 19-21
us at world 4, the same at 1 and 2 microbatches (so the cost is per step, on the microbatch
that synchronises, not per microbatch). Per byte: with 1 KB layers only (up to 2026-12-05)
the fit had no bytes to see, and Llama-MoE-tiny's DDP step (1.6 MB of gradients) cost 7.7
ms beyond its compute at world 2 against 4.1 ms predicted; 2.4 MB of synthetic gradients
cost DDP 3.5 ms more than 10 KB, where the collectives fitted in a tight loop add 0.7 ms."""


DDP_MICRO = (1, 2, 4)
"""Microbatches per step `measure_ddp` fits over. At 1 and 2 only, the split between the cost
per microbatch and per step moved between calibrations of one host (world 2: 0.25 / 2.3,
0.54 / 1.8 and 1.18 / 0.77 ms), and LSTM-tiny's DP step (1.7 ms of compute) was
over-predicted by 26-39%: measured at 1 and 2 microbatches, its extra microbatch cost DDP well
under 1.2 ms. Four microbatches give the slope a longer lever."""


def measure_ddp(settings: Settings) -> dict:
    """DDP's seconds beyond the plain model, fitted (>= 0) over `DDP_SHAPES` at `DDP_MICRO`
    microbatches: per microbatch (`microbatch_s`), per parameter tensor and step (`tensor_s`,
    the gradient-ready hooks and bucket work of the microbatch that synchronises), per
    gradient byte all-reduced (`byte_s`, the modelled all-reduce's bandwidth term in it) and
    per step (`step_s`, the all-reduce's fixed part in it)."""
    rows, ys = [], []
    for micro in DDP_MICRO:
        for units, layers, width in DDP_SHAPES:
            extra = _dp_extra_s(units, micro, "ddp", settings, layers, width)
            linears = units * layers + 1
            # weight + bias per Linear; fp32 gradients, one bucket all-reduced per step
            rows.append([micro, 2 * linears, 1.0, 4.0 * linears * (width * width + width)])
            ys.append(extra)
    micro_s, tensor_s, step_s, byte_s = nnls(rows, ys)
    return {"microbatch_s": float(micro_s), "tensor_s": float(tensor_s), "step_s": float(step_s),
            "byte_s": float(byte_s)}


TP_INPUT = (2, 4, 16)
"""Input of `measure_tp`'s blocks: (batch, sequence, features), as the TP models' (B, S, D)
activations; a Linear on a 3-D DTensor input dispatches its flatten and unflatten views on
distributed tensors too."""


def measure_tp(settings: Settings) -> dict:
    """Tensor parallelism's extra seconds against the same blocks unsplit, split into a cost
    per op on distributed-tensor weights and a cost per TP collective, as the runner's plans
    pay them: a block takes a replicated input (`PrepareModuleInput`, whose backward
    all-reduces the input gradient once), runs `fan` column-parallel Linear(16, 32) whose
    outputs add, then one row-parallel Linear(32, 16) (its output all-reduced). Blocks of one
    column op (GPT and ViT: qkv, fc1) and of three (Llama: wq, wk, wv) both hold one
    collective each way, so their difference prices the ops and the rest the collectives.
    Each from the slope between 1 and 5 blocks, split and unsplit timed in pairs."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                                   RowwiseParallel, parallelize_module)
    dev, world = settings.device, dist.get_world_size()
    mesh = init_device_mesh(dev, (world,))

    class Block(torch.nn.Module):
        def __init__(self, fan: int):
            super().__init__()
            self.cols = torch.nn.ModuleList(torch.nn.Linear(16, 32, device=dev)
                                            for _ in range(fan))
            self.row = torch.nn.Linear(32, 16, device=dev)

        def forward(self, x):
            return self.row(sum(col(x) for col in self.cols))

    def make(split: bool, fan: int, length: int):
        torch.manual_seed(0)
        blocks = torch.nn.Sequential(*[Block(fan) for _ in range(length)])
        if split:
            plan = {}
            for i in range(length):
                plan[str(i)] = PrepareModuleInput(input_layouts=(Replicate(),),
                                                  desired_input_layouts=(Replicate(),))
                plan.update({f"{i}.cols.{j}": ColwiseParallel() for j in range(fan)})
                plan[f"{i}.row"] = RowwiseParallel()
            parallelize_module(blocks, mesh, plan)
        x = torch.randn(*TP_INPUT, device=dev)
        return lambda: blocks(x)
    lengths, inner = (1, 5), 5 if settings.quick else 12
    reps = 3 if settings.quick else max(5, 2 * settings.repeats)
    per_block = {}  # fan -> (forward, forward + backward) seconds per block beyond unsplit
    for fan in (1, 3):
        fwd, both = [], []
        for length in lengths:
            split, plain = make(True, fan, length), make(False, fan, length)
            fwd.append(_paired(split, plain, dev, inner, reps))
            both.append(_paired(lambda: split().sum().backward(),
                                lambda: plain().sum().backward(), dev, inner, reps))
        blocks = lengths[1] - lengths[0]
        per_block[fan] = ((fwd[1] - fwd[0]) / blocks, (both[1] - both[0]) / blocks)
    (f1, b1), (f3, b3) = per_block[1], per_block[3]
    op_f, op_both = (f3 - f1) / 2, (b3 - b1) / 2  # two more ops, as many collectives
    # a block of one column op: 2 ops, and 2 collectives (one each way) over a whole step
    return {"fwd_s": op_f, "bwd_s": op_both - op_f, "collective_s": (b1 - 2 * op_both) / 2,
            "allreduce_bytes": math.prod(TP_INPUT) * 4}


def measure_pp(settings: Settings) -> dict:
    """Per-microbatch seconds of a 1F1B pipeline (the runner's default schedule) over all
    ranks, one Linear(16, 16) stage each, microbatches of 2 rows: the least-squares slope over
    5 microbatch counts from the world size up (1F1B needs at least as many microbatches as
    stages), beside one stage's own forward + backward (`stage_s`) and the message bytes.
    Measured on the schedule the runner runs: GPipe's stream of unpaired asynchronous sends
    cost 1.0-1.2 ms per microbatch at world 2 on the 2-core host against 0.3-0.8 ms for
    1F1B, whose sends pair with receives, and the 2-to-6 GPipe slope the calibration took
    before 2026-12-04 gave 0.19-0.52 ms per action in six calibrations where the study's
    1F1B pipelines of 2 stages wanted about 0.1 ms."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B
    from .calibrate import _linear
    dev, world, rank = settings.device, dist.get_world_size(), dist.get_rank()
    counts = [world + 2 * i for i in range(5)]
    inner, reps = (2, 3) if settings.quick else (8, max(3, settings.repeats))
    times = []
    for micro in counts:
        torch.manual_seed(0)
        stage = PipelineStage(torch.nn.Linear(16, 16, device=dev), rank, world,
                              torch.device(dev))
        sched = Schedule1F1B(stage, n_microbatches=micro,
                             loss_fn=lambda out, target: out.pow(2).mean())
        x = torch.randn(2 * micro, 16, device=dev)
        target = torch.zeros(2 * micro, 16, device=dev)

        def step():
            if rank == 0:
                sched.step(x)
            elif rank == world - 1:
                sched.step(target=target, losses=[])
            else:
                sched.step()
        times.append(_timed(step, dev, inner, reps))
    f, b = chain_times(_linear((2, 16), dev)[0], settings)
    return {"per_microbatch_s": float(np.polyfit(counts, times, 1)[0]), "stage_s": f + b,
            "message_bytes": 2 * 16 * 4}


def measure_cp(settings: Settings) -> dict:
    """Extra seconds of ring attention (forward + backward, causal, over all ranks) against
    the same local attention alone, and the K/V bytes of the whole sequence."""
    import torch
    import torch.nn.functional as F
    import torch.distributed as dist
    from .runner.ring_attention import ring_attention
    dev, world = settings.device, dist.get_world_size()
    shape = (1, 2, 8, 8)  # batch, heads, local sequence, head dim
    q, k, v = (torch.randn(*shape, device=dev, requires_grad=True) for _ in range(3))

    def ring():
        ring_attention(q, k, v, None, causal=True).sum().backward()

    def local():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    reps, inner = max(3, settings.repeats), 5 if settings.quick else 12
    extra = _paired(ring, local, dev, inner, reps)
    return {"extra_s": extra, "kv_bytes": 2 * 2 * 8 * world * 8 * 4}


def measure_dtensor_optimizer(settings: Settings) -> float:
    """`optimizer_tensor_s` of 32 sharded distributed tensors (64 elements per rank)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh(settings.device, (dist.get_world_size(),))
    params = []
    for _ in range(32):
        full = torch.randn(64 * dist.get_world_size(), device=settings.device)
        p = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
        p.grad = distribute_tensor(torch.randn_like(full), mesh, [Shard(0)])
        params.append(p)
    return optimizer_tensor_s(params, settings)
