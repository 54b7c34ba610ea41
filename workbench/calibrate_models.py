"""One microbatch of each study model, timed whole on one rank: `calibrate --ops-for STUDY`.

The op-level figures (curves, per-kind dispatch, kernels at exact shapes) price what the layer
graph lists. Model code runs more than that: RMSNorm as five tensor ops, rotary embeddings as
slices and concatenations, MoE routing as top-k, sort and index ops, Python between modules.
On a CPU with one thread per rank that host-side work is a third or more of a tiny model's
time (Llama-tiny: 341 forward / 606 backward ATen calls per microbatch against ~200 / ~500
for the same ops written as the reference blocks), and it is not in any op of the graph.

So `--ops-for` also builds every model of the study as the runner does (`models.build`,
fp32, train mode) and times the forward (with the runner's loss) and the backward of one
microbatch at the study's microbatch size, unsplit, on every rank of the world at once
(`model_passes_s`, keyed by `model_key`). The engine compares that with its own op-level
prediction of the same unsplit microbatch and spreads the difference over the ops
(`engine.op_times`): time it under-predicts goes to the ops' dispatch (host work, which
tensor and context parallelism do not divide), time it over-predicts comes off their
kernels (which they do). Everything a plan adds (communication, DDP, FSDP, distributed
tensors, the pipeline, the optimizer) is still predicted. This is the one-device profile
that profile-driven simulators start from; a model with no entry keeps the op-level figures.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

MEASURED_DTYPE = "fp32"
"""The dtype the models are timed in (the runner's CPU dtype)."""


def model_key(graph, microbatch: int, dtype: str = MEASURED_DTYPE) -> str:
    """The table key of one microbatch of a model: dtype, the graph's model name, the
    microbatch size, and (so that overrides tell apart) its training FLOPs per sample,
    parameters and layer count."""
    return (f"{dtype}:{graph.model}:{int(microbatch)}:{int(graph.model_flops)}:"
            f"{int(graph.params)}:{len(graph.layers)}")


MAX_MODEL_BYTES = 2 * 2**30
"""Largest model timed whole: fp32 weights and gradients plus the activations one
microbatch saves (a study of a 70B model keeps the op-level figures instead)."""


def model_bytes(graph, microbatch: int) -> int:
    """Bytes of one fp32 microbatch of the model: weights, gradients, saved activations."""
    return 8 * graph.params + 2 * graph.saved_bytes * microbatch  # graph bytes: 2-byte elements


def study_models(paths, log: Callable[[str], None] = print) -> dict[str, tuple[str, dict, int]]:
    """key -> (model name, overrides, microbatch size) of every model of the studies at
    `paths`, at each microbatch size its points use (split plans too: the measurement is of
    the model unsplit; points that search their plan have no microbatch size and are left
    out). Models over `MAX_MODEL_BYTES` are left out, and said so."""
    from . import costmodel, models
    from .plan import Plan
    from .study import load
    out: dict[str, tuple[str, dict, int]] = {}
    skipped = set()
    for path in paths:
        for point in load(path).points:
            if point.plan is None:  # "search the best plan": no microbatch size to time
                continue
            mb = Plan.parse(point.plan).microbatch_size
            graph = costmodel.graph(models.get(point.model, **point.overrides))
            if model_bytes(graph, mb) > MAX_MODEL_BYTES:
                skipped.add(f"{point.model} mb={mb}")
                continue
            out.setdefault(model_key(graph, mb), (point.model, dict(point.overrides), mb))
    if skipped:
        log(f"  not timed whole (over {MAX_MODEL_BYTES / 2**30:.0f} GiB in fp32): "
            f"{', '.join(sorted(skipped))}")
    return out


def model_passes(name: str, overrides: dict, microbatch: int, device: str
                 ) -> Callable[[], tuple[float, float]]:
    """A callable that trains one microbatch of the model as the runner does (built by
    `models.build` with seed 0, fp32, train mode, the runner's inputs and loss from
    `runner.families`) and returns its (forward, backward) seconds. Gradients accumulate
    over calls, as over microbatches."""
    import torch
    from . import models
    from .calibrate import _sync
    from .runner import families
    cfg = models.get(name, **overrides)
    torch.manual_seed(0)
    with torch.device(device):
        model = models.build(cfg)
    model.to(torch.float32).train()
    inputs, target = families.batch(cfg, microbatch)
    inputs = tuple(x.to(device) for x in inputs)
    target = target.to(device)

    def passes() -> tuple[float, float]:
        start = time.perf_counter()
        loss = families.loss(model(*inputs), target)
        _sync(device)
        mid = time.perf_counter()
        loss.backward()
        _sync(device)
        return mid - start, time.perf_counter() - mid
    return passes


def time_passes(passes: Callable[[], tuple[float, float]], duration_s: float,
                min_calls: int = 10) -> tuple[float, float]:
    """Forward and backward seconds of one `passes()` call as a rate: the wall time of the
    calls made in `duration_s` (and at least `min_calls` of them, after two warm-up calls)
    over their number, split between forward and backward as their summed times.

    A rate, not the median of single calls: where ranks share cores, a pass shorter than the
    scheduler's time slice mostly runs without a break and the rank's wait for its core lands
    in a few calls, which a median leaves out (measured, 4 ranks on 2 cores: AlexNet-tiny's
    median 1.7 ms against 3.3-3.6 ms per call over the window, its rate with 2 ranks 1.7 ms);
    a longer pass is cut at random and its median lands anywhere in between (ResNet-tiny:
    median 9.1-12.3 ms, rate 8.7-9.2 ms). A fixed duration keeps every rank of a world busy
    for the same time, so ranks that share cores are measured sharing them."""
    passes(), passes()
    fwd_s = bwd_s = 0.0
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < duration_s:
        fwd, bwd = passes()
        fwd_s, bwd_s, calls = fwd_s + fwd, bwd_s + bwd, calls + 1
    per_call = (time.perf_counter() - start) / calls
    fwd_part = fwd_s / (fwd_s + bwd_s) if fwd_s + bwd_s > 0 else 0.5
    return per_call * fwd_part, per_call * (1 - fwd_part)


ROUNDS = 3
"""Rounds over all the models (`measure_models`): a slow spell of a shared host lands on one
round of a few models, and the median over rounds leaves it out."""


def measure_models(table: dict[str, tuple[str, dict, int]], settings, sync: Callable[[], None],
                   log: Callable[[str], None] = print) -> dict[str, list[float]]:
    """key -> [forward, backward] seconds of one microbatch of every model of `table`: the
    median over `ROUNDS` rounds over all the models of `time_passes` rates over 0.2 s
    (0.05 s and one round with `settings.quick`). Every rank times the same models in the
    same order."""
    rounds = 1 if settings.quick else ROUNDS
    keys = sorted(table)
    times: dict[str, list[tuple[float, float]]] = {key: [] for key in keys}
    for r in range(rounds):
        for key in keys:  # built afresh each round: one model in memory at a time
            passes = model_passes(*table[key], settings.device)
            sync()
            times[key].append(time_passes(passes, 0.05 if settings.quick else 0.2))
        log(f"    round {r + 1} / {rounds} over {len(keys)} models")
    out = {}
    for i, key in enumerate(keys):
        fwd = statistics.median(t[0] for t in times[key])
        bwd = statistics.median(t[1] for t in times[key])
        out[key] = [fwd, bwd]
        name, _, mb = table[key]
        log(f"    {i + 1} / {len(keys)} models: {name} mb={mb} "
            f"{fwd * 1e3:.2f} + {bwd * 1e3:.2f} ms")
    return out


def passes_from_dict(d, where: str) -> dict[str, tuple[float, float]]:
    """A profile's `model_passes_s` table, checked (`calibrate_ops.seconds_table`): keys
    `model_key` strings."""
    from .calibrate_ops import seconds_table

    def key_ok(key: str) -> bool:
        parts = key.split(":")
        return len(parts) == 6 and all(p.isdigit() for p in parts[2:])
    return seconds_table(d, where, key_ok, "dtype:model:microbatch:flops:params:layers")
