"""One training step as SimPy processes: ranks run their schedule's ops over the network.

Each simulated rank is a process that walks its pipeline stage's op order (`schedules.py`):
an op waits for its input (the previous virtual stage's activation, or the next one's
gradient, delivered by a send over the network), computes, and runs its TP/CP/EP collectives
on the critical path. With FSDP each unit's weights are all-gathered before use, the next
unit's gather prefetched during the current unit's compute. Gradients are reduced in buckets
on a separate DP stream as the last microbatch's backward produces them, then the optimizer
steps (and ZeRO-1/2 all-gathers the updated weights).

Modes: `symmetric` simulates one representative rank per pipeline stage (every TP/CP/DP
replica does the same work at the same time on identical links, so its flows stand for
theirs: they carry the per-chip fair share of shared uplinks); `full` simulates every rank
(up to 64) with real group barriers and shared links. Both agree on symmetric plans.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import simpy

from ..costmodel.engine import optimizer_s
from ..costmodel.plans import CostOptions
from ..costmodel.volumes import group_of, p2p_bytes, p2p_tensors
from ..plan import Plan
from .collectives import Collectives
from .network import Network, Topology
from .schedules import stage_order, virtual_stage
from .trace import TimelineEvent
from .work import StageWork

FULL_MODE_MAX_CHIPS = 64
"""Largest world the full-detail mode simulates rank by rank."""


@dataclass
class RankStats:
    """Where one simulated rank's time went."""

    compute_s: float = 0.0
    comm_s: dict = field(default_factory=dict)      # level -> blocking seconds
    wait_s: float = 0.0                            # waiting for pipeline inputs (bubble)
    fsdp_wait_s: float = 0.0                       # waiting for FSDP gathers
    dp_tail_s: float = 0.0                         # waiting for the last gradient buckets
    optimizer_s: float = 0.0
    end_s: float = 0.0


class StepSim:
    """Builds and runs the processes of one step."""

    def __init__(self, plan: Plan, cluster, prof, plans_arr, work: list[StageWork],
                 opt: CostOptions, mode: str, speed: dict[int, float], record: bool):
        self.plan, self.cluster, self.opt, self.mode = plan, cluster, opt, mode
        self.work, self.plans_arr, self.record = work, plans_arr, record
        self.env = simpy.Environment()
        self.net = Network(self.env)
        self.topo = Topology(cluster, symmetric=mode == "symmetric")
        self.coll = Collectives(self.env, self.net, self.topo)
        self.events: list[TimelineEvent] = []
        self.arrivals: dict[tuple, simpy.Event] = {}
        self.strides = plan.strides
        self.p2p = float(p2p_bytes(prof, plans_arr, opt)[0])
        self.p2p_sends = max(1, round(p2p_tensors(prof)))  # a send per tensor of the message
        self.speed = speed
        self.stats: dict[int, RankStats] = {}
        self.seq: dict[tuple, int] = {}
        self.sim_events = 0
        ranks = self._ranks()
        for rank in ranks:
            self.stats[rank] = RankStats()
            self.env.process(self._rank(rank))

    # -- layout ----------------------------------------------------------------------------
    def _coords(self, rank: int) -> dict[str, int]:
        return {d: (rank // self.strides[d]) % self.plan.degree(d) for d in self.strides}

    def _rank_of(self, coords: dict[str, int]) -> int:
        return sum(coords[d] * self.strides[d] for d in self.strides)

    def _ranks(self) -> list[int]:
        if self.mode == "symmetric":
            return [self._rank_of({**{d: 0 for d in self.strides}, "pp": s})
                    for s in range(self.plan.pp)]
        return list(range(self.plan.world_size))

    def _members(self, rank: int, dims: tuple[str, ...]) -> tuple[int, ...]:
        """Ranks sharing every coordinate of `rank` except `dims` (full mode)."""
        c = self._coords(rank)
        out = [c]
        for d in dims:
            out = [{**x, d: i} for x in out for i in range(self.plan.degree(d))]
        return tuple(sorted(self._rank_of(x) for x in out))

    def _ep_members(self, rank: int) -> tuple[int, ...]:
        shard = self._members(rank, ("cp", "fsdp"))
        ep = self.plan.ep
        i = shard.index(rank) // ep * ep
        return shard[i:i + ep]

    def _group(self, rank: int, group: str):
        if group == "ep":
            return self._ep_members(rank)
        dims = {"tp": ("tp",), "cp": ("cp",), "dp": ("dp",), "dp_all": ("cp", "fsdp", "dp"),
                "shard": ("cp", "fsdp") if self.plan.dp_shard > 1 else ("cp", "fsdp", "dp")}[group]
        return self._members(rank, dims)

    def _group_size_stride(self, group: str):
        if group == "shard":
            group = "dp_all" if self.plan.dp_shard == 1 else None
            if group is None:
                n, s = self.plans_arr.group(("cp", "fsdp"))
                return int(n[0]), int(s[0])
        n, s = group_of(self.plans_arr, group)
        return int(n[0]), int(s[0])

    # -- primitives ------------------------------------------------------------------------
    def _log(self, rank, name, category, start, level=None):
        if self.record and self.env.now > start:
            self.events.append(TimelineEvent(rank, name, category, start, self.env.now, level))

    def _collective(self, rank: int, group: str, kind: str, nbytes: float, calls: int = 1,
                    algorithm: str = "ring"):
        """Process: one (aggregated) collective of `rank`'s group."""
        n, stride = self._group_size_stride(group)
        if n <= 1 or nbytes <= 0:
            return
        self.sim_events += 2
        if self.mode == "symmetric":
            yield from self.coll.symmetric(kind, nbytes, rank, n, stride, algorithm, calls)
        else:
            members = self._group(rank, group)
            key = (group, members, kind)
            seq = self.seq[(rank, key)] = self.seq.get((rank, key), -1) + 1
            yield from self.coll.join((key, seq), rank, members, kind, nbytes, algorithm, calls)

    def _level_name(self, group: str) -> str:
        from ..costmodel import comm
        n, stride = self._group_size_stride(group)
        return self.cluster.levels[int(comm.span_level(self.cluster, max(n, 2), stride))].name

    def _compute(self, rank: int, seconds: float, name: str):
        start = self.env.now
        self.sim_events += 1
        yield self.env.timeout(seconds * self.speed.get(rank, 1.0))
        self.stats[rank].compute_s += self.env.now - start
        self._log(rank, name, "compute", start)

    def _comm_blocking(self, rank: int, work, name: str):
        for c in work:
            start = self.env.now
            yield from self._collective(rank, c.group, c.kind, c.bytes, c.calls)
            level = self._level_name(c.group)
            st = self.stats[rank]
            st.comm_s[level] = st.comm_s.get(level, 0.0) + self.env.now - start
            self._log(rank, f"{c.group.upper()} {c.kind} ({name})", "comm", start, level)

    def _arrival(self, key) -> simpy.Event:
        ev = self.arrivals.get(key)
        if ev is None:
            ev = self.arrivals[key] = self.env.event()
        return ev

    def _send(self, rank: int, dst_stage: int, key: tuple):
        """Process: send a pipeline message to the rank of `dst_stage`, then signal it."""
        coords = {**self._coords(rank), "pp": dst_stage}
        dst = self._rank_of(coords)
        self.sim_events += 2
        for _ in range(self.p2p_sends):
            yield from self.coll.send(rank, dst, self.p2p / self.p2p_sends)
        if self.opt.pp_scatter_gather and not self.plan.sequence_parallel:
            yield from self._collective(dst, "tp", "all_gather", self.p2p * self.plan.tp)
        self._arrival((dst,) + key).succeed()

    # -- the rank ----------------------------------------------------------------------------
    def _rank(self, rank: int):
        plan, st = self.plan, self.stats[rank]
        stage, pp, vpp = self._coords(rank)["pp"], plan.pp, plan.vpp
        n_virtual = pp * vpp
        order = stage_order(plan.schedule, stage, pp, vpp, plan.microbatches)
        last_b = {op.chunk: i for i, op in enumerate(order) if op.kind == "B"}
        fsdp = plan.dp_shard > 1 or plan.zero == 3
        elem = {"fp32": 4, "fp8": 1}.get(plan.dtype, 2)
        self.dp_stream = getattr(self, "dp_stream", {})
        stream = self.dp_stream[rank] = simpy.Resource(self.env, capacity=1)
        jobs = []
        for i, op in enumerate(order):
            v = virtual_stage(stage, op.chunk, pp)
            w = self.work[v]
            forward = op.kind == "F"
            need = ("F", op.microbatch, v) if forward and v > 0 else \
                   ("B", op.microbatch, v) if not forward and v < n_virtual - 1 else None
            if need:
                start = self.env.now
                yield self._arrival((rank,) + need)
                st.wait_s += self.env.now - start
                self._log(rank, "wait", "wait", start)
            seconds = w.fwd_s if forward else w.bwd_s
            final = not forward and last_b[op.chunk] == i and self.opt.overlap_dp
            grad_bytes = w.params * elem
            buckets = max(1, min(32, math.ceil(grad_bytes / self.opt.bucket_bytes))) if final else 0
            pieces = w.units if fsdp else max(buckets, 1)
            unit_bytes = (w.params - w.root_params) * elem / w.units
            if fsdp and forward and w.root_params > 0:  # the root, kept until its backward
                start = self.env.now
                yield from self._collective(rank, "shard", "all_gather", w.root_params * elem,
                                            algorithm=self.opt.dp_algorithm)
                st.fsdp_wait_s += self.env.now - start
                self._log(rank, "FSDP root all_gather", "comm", start, self._level_name("shard"))
            gather = self.env.process(self._collective(rank, "shard", "all_gather", unit_bytes,
                                                       algorithm=self.opt.dp_algorithm)) if fsdp else None
            launched = 0
            name = f"{op.kind} mb{op.microbatch} c{op.chunk}"
            for j in range(pieces):
                if gather is not None:
                    start = self.env.now
                    yield gather
                    st.fsdp_wait_s += self.env.now - start
                    self._log(rank, "FSDP all_gather", "comm", start, self._level_name("shard"))
                    gather = self.env.process(self._collective(
                        rank, "shard", "all_gather", unit_bytes,
                        algorithm=self.opt.dp_algorithm)) if j + 1 < pieces else None
                yield from self._compute(rank, seconds / pieces, name)
                while final and launched < (j + 1) * buckets // pieces:
                    jobs.append(self.env.process(self._reduce(rank, stream, grad_bytes / buckets)))
                    launched += 1
            yield from self._comm_blocking(rank, w.fwd_comm if forward else w.bwd_comm, name)
            if forward and v < n_virtual - 1:
                self.env.process(self._send(rank, (stage + 1) % pp, ("F", op.microbatch, v + 1)))
            if not forward and v > 0:
                self.env.process(self._send(rank, (stage - 1) % pp, ("B", op.microbatch, v - 1)))
        params = sum(self.work[virtual_stage(stage, c, pp)].params for c in range(vpp))
        if not self.opt.overlap_dp:  # one reduction of every gradient after the backward
            jobs.append(self.env.process(self._reduce(rank, stream, params * elem)))
        start = self.env.now
        yield simpy.AllOf(self.env, jobs)
        st.dp_tail_s = self.env.now - start
        self._log(rank, "wait for gradient buckets", "wait", start)
        n_shard = self._group_size_stride("shard")[0]
        sharded_opt = fsdp or plan.zero >= 1
        start = self.env.now
        yield self.env.timeout(float(optimizer_s(params / (n_shard if sharded_opt else 1),
                                                 self.cluster, self.opt)))
        st.optimizer_s = self.env.now - start
        self._log(rank, "optimizer", "optimizer", start)
        if plan.zero in (1, 2) and plan.dp_shard == 1:
            start = self.env.now
            yield from self._collective(rank, "dp_all", "all_gather", params * elem,
                                        algorithm=self.opt.dp_algorithm)
            self._log(rank, "ZeRO all_gather", "comm", start, self._level_name("dp_all"))
        st.end_s = self.env.now

    def _reduce(self, rank: int, stream: simpy.Resource, nbytes: float):
        """Process: one gradient bucket's reduction on the rank's DP stream (serialised)."""
        plan, alg = self.plan, self.opt.dp_algorithm
        with stream.request() as req:
            yield req
            start = self.env.now
            if plan.dp_shard == 1 and plan.zero == 0:
                yield from self._collective(rank, "dp_all", "all_reduce", nbytes, algorithm=alg)
            else:
                yield from self._collective(rank, "shard", "reduce_scatter", nbytes, algorithm=alg)
                if plan.dp_shard > 1 and plan.dp_replicate > 1:
                    n_shard = self._group_size_stride("shard")[0]
                    yield from self._collective(rank, "dp", "all_reduce", nbytes / n_shard,
                                                algorithm=alg)
            self._log(rank, "gradient bucket (DP stream)", "comm", start, self._level_name("dp_all"))

    def run(self) -> float:
        """Simulate; the step time (the last rank's end)."""
        self.env.run()
        unfinished = [r for r, s in self.stats.items() if s.end_s == 0.0]
        if unfinished:
            raise RuntimeError(f"simulation deadlocked: ranks {unfinished[:8]} never finished")
        self.sim_events += self.net.events
        return max(s.end_s for s in self.stats.values())
