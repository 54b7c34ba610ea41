"""A pipeline step on ranks that share cores: the schedule run as a fluid model.

On a GPU every pipeline rank has its own chip, and the step is the slowest stage's
microbatches plus the bubble (`engine.pipeline_bubble_s`, Narayanan et al. 2021). On a host
with fewer cores than ranks (`rank_contention` c > 1 ranks per core) a stage's time depends
on how many other ranks are busy at that moment: its per-microbatch times are measured with
every rank busy, so alone on a core it runs c times faster. Stages of unequal size leave
the largest one running alone much of the step (an FCN's first stage holds half its
time), which no closed form over the bottleneck stage and the others' sum captures.

`shared_core_pipeline_s` runs the schedule's exact order of forwards and backwards per
stage (`simulator.schedules`, the one schedule definition) with processor sharing: the
busy ranks of a pipeline share its pp / c cores equally, none faster than one core, and an
op starts once the ops it depends on have finished. A rank waiting on a receive uses no
core (measured: one rank computing while 3 wait in a gloo receive or barrier ran at its
alone speed, 20.5 ms against 20.7 ms alone and 46 ms with all 4 computing, 2 cores). The
sends and receives are work of the ranks at both ends (gloo over loopback copies through
the kernel), as in the closed form. Replicas of the pipeline (DP, FSDP, TP, CP ranks) run
the same schedule at the same time, so each pipeline has pp / c of the host's cores.
"""
from __future__ import annotations

import math

import numpy as np

from ..plan import SCHEDULES


def shared_core_pipeline_s(fwd_s, bwd_s, m: int, vpp: int, schedule: str,
                           rank_contention: float) -> float:
    """Seconds from the first forward to the last backward of one step's pipeline.

    `fwd_s[s]`, `bwd_s[s]`: seconds of one microbatch's forward and backward through all of
    stage s's model chunks with every rank busy, its sends and receives included (each
    chunk takes 1 / vpp of them); `rank_contention`: ranks per core (c). A rank alone on a
    core runs c times faster than with every rank busy; a rank that waits uses no core."""
    # imported here: the simulator package imports the cost model
    from ..simulator.schedules import dependencies, stage_order
    pp = len(fwd_s)
    if len(bwd_s) != pp:
        raise ValueError(f"bwd_s has {len(bwd_s)} stages, fwd_s {pp}")
    if rank_contention < 1:
        raise ValueError(f"rank_contention must be >= 1, got {rank_contention}")
    cores = pp / rank_contention
    orders = [stage_order(schedule, s, pp, vpp, m) for s in range(pp)]
    work = [{"F": f / vpp / rank_contention, "B": b / vpp / rank_contention}
            for f, b in zip(fwd_s, bwd_s)]  # alone-on-a-core seconds per op
    done: dict[tuple, float] = {}  # (stage, op) -> when it finished
    nxt = [0] * pp                      # index of each stage's next op
    left = [math.nan] * pp              # alone seconds left of the running op (nan: idle)
    now = 0.0
    while True:
        for s in range(pp):             # start every op whose inputs have arrived
            if not math.isnan(left[s]) or nxt[s] == len(orders[s]):
                continue
            op = orders[s][nxt[s]]
            deps = dependencies(op, s, pp, vpp)
            if any(d not in done for d in deps):
                continue
            left[s] = work[s][op.kind]
        busy = [s for s in range(pp) if not math.isnan(left[s])]
        if not busy:
            break
        rate = min(1.0, cores / len(busy))
        dt = min(left[s] for s in busy) / rate
        now += dt
        for s in busy:
            left[s] -= dt * rate
            if left[s] <= 1e-15:
                done[(s, orders[s][nxt[s]])] = now
                nxt[s] += 1
                left[s] = math.nan
    if any(n != len(o) for n, o in zip(nxt, orders)):
        raise RuntimeError("pipeline schedule deadlocked")  # a bug in the schedule tables
    return now


def own_core_pipeline_s(fwd_s, bwd_s, m: int, vpp: int, schedule: str):
    """Seconds from the first forward to the last backward of one step's pipeline when every
    rank has its own core or chip, for many plans at once: `fwd_s[s]`, `bwd_s[s]` are arrays
    over the plans (one microbatch through all of stage s's chunks, sends and receives
    included; each chunk takes 1 / vpp). The schedule's exact order (`simulator.schedules`):
    an op starts once its stage is free and the ops it depends on have finished, so the
    span is the longest path through the schedule, one vector operation per op. The same
    span as `shared_core_pipeline_s` with `rank_contention` 1, for all plans of one
    (pp, vpp, m, schedule) in one pass."""
    from ..simulator.schedules import dependencies, stage_order  # the simulator imports us
    fwd, bwd = np.asarray(fwd_s, dtype=float), np.asarray(bwd_s, dtype=float)
    pp = len(fwd)
    if len(bwd) != pp:
        raise ValueError(f"bwd_s has {len(bwd)} stages, fwd_s {pp}")
    work = {"F": fwd / vpp, "B": bwd / vpp}
    orders = [stage_order(schedule, s, pp, vpp, m) for s in range(pp)]
    free = [np.zeros(fwd.shape[1:])] * pp  # when each stage finishes its last op
    done: dict[tuple, np.ndarray] = {}
    nxt = [0] * pp
    progressed = True
    while progressed:
        progressed = False
        for s in range(pp):
            while nxt[s] < len(orders[s]):
                op = orders[s][nxt[s]]
                deps = dependencies(op, s, pp, vpp)
                if any(d not in done for d in deps):
                    break
                start = free[s]
                for d in deps:
                    start = np.maximum(start, done[d])
                done[(s, op)] = free[s] = start + work[op.kind][s]
                nxt[s] += 1
                progressed = True
    if any(n != len(o) for n, o in zip(nxt, orders)):
        raise RuntimeError("pipeline schedule deadlocked")  # a bug in the schedule tables
    return np.max(free, axis=0)


REPLAY_MAX_OPS = 2048
"""Pipelines of at most this many forward and backward ops (2 x m x vpp x pp) on ranks with
their own cores replay their schedule (`replayed_spans_s`); longer ones take the engine's
closed-form bubble (`engine.pipeline_bubble_s`). The closed form charges the slowest stage
every other stage's whole forward + backward: right for balanced stages, too much where a
stage's warm-up forwards hide a light neighbour's pass (measured, 2 cores, 1 thread per
rank: unet-tiny PP 2 with m = 2, stage 0 at 11.2 + 33.4 ms per microbatch and stage 1 at
13.8 ms, stepped in 89.9 ms against its 89.3 ms of stage-0 work; the closed form gave a
13.8 ms bubble, the replay 2.6 ms). Its share of the step, (pp - 1) / m of it, is largest
where m is small. `own_core_pipeline_s` replays all plans of one (pp, vpp, m, schedule) at
once: 512 ops for 1,000 plans in about 14 ms on the 2-core host."""


def replayed_spans_s(fwd_s, bwd_s, m, schedule, vpp: int, rank_contention: float):
    """Pipeline spans of plans of one (pp, vpp): `fwd_s`, `bwd_s` (stage x plan seconds per
    microbatch, as `shared_core_pipeline_s` takes them), `m` and `schedule` (index into
    `plan.SCHEDULES`) per plan. Where ranks share cores every plan runs the fluid model;
    on own cores the plans of each (m, schedule) whose schedule has at most `REPLAY_MAX_OPS`
    ops replay in one pass, and the others are NaN (the caller keeps its closed form)."""
    fwd, bwd = np.asarray(fwd_s, dtype=float), np.asarray(bwd_s, dtype=float)
    m, schedule = np.asarray(m), np.asarray(schedule)
    if rank_contention > 1:
        return np.array([shared_core_pipeline_s(fwd[:, j], bwd[:, j], int(m[j]), vpp,
                                                SCHEDULES[int(schedule[j])], rank_contention)
                         for j in range(len(m))])
    pp = len(fwd)
    span = np.full(len(m), np.nan)
    for mb, sch in {(int(a), int(b)) for a, b in zip(m, schedule)}:
        if 2 * mb * vpp * pp <= REPLAY_MAX_OPS:
            j = np.nonzero((m == mb) & (schedule == sch))[0]
            span[j] = own_core_pipeline_s(fwd[:, j], bwd[:, j], mb, vpp, SCHEDULES[sch])
    return span
