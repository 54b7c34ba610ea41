"""Collectives as SimPy processes over the shared `Network`.

Full-detail mode (`members` are real ranks): ring algorithms run their 2(n-1) or n-1 steps,
every member sending a 1/n chunk to its neighbour at once, so concurrent groups that share a
link slow each other down; tree all-reduce pays its hops in latency and moves 2x the buffer
through each member's port; hierarchical runs a reduce-scatter inside every node, the
all-reduce of 1/k across nodes, an all-gather inside every node; all-to-all starts every
pairwise flow at once. A call starts when the last member arrives (a barrier).

Symmetric mode (one representative rank): the same algorithms collapse onto the
representative's own links (its neighbours do the same on theirs), as one latency wait plus
one flow of the ring's wire bytes per phase. In an uncontended network both modes equal
`costmodel.comm.collective_time_s` (the one formula) for the same sizes; tests check it.
"""
from __future__ import annotations

import math

import simpy

from ..costmodel import comm
from .network import Network, Topology


class Collectives:
    """Runs collectives for the ranks of one simulation."""

    def __init__(self, env: simpy.Environment, net: Network, topo: Topology):
        self.env, self.net, self.topo = env, net, topo
        self._calls: dict[tuple, dict] = {}

    # -- symmetric mode ---------------------------------------------------------------
    def symmetric(self, kind: str, nbytes: float, rep: int, n: int, stride: int,
                  algorithm: str = "ring", calls: int = 1):
        """Process: `calls` collectives of `nbytes` in total over a group of n ranks at
        `stride`, seen from representative rank `rep`."""
        if n <= 1 or nbytes <= 0:
            return
        cl = self.topo.cluster
        level = int(comm.span_level(cl, n, stride))
        k = int(comm.ranks_per_node(cl, n, stride))
        if algorithm == "hierarchical" and kind in ("all_reduce", "all_gather",
                                                    "reduce_scatter") and level > 0 and 1 < k < n:
            if kind in ("all_reduce", "reduce_scatter"):
                yield from self._sym_flat("reduce_scatter", nbytes, rep, k, 0, calls)
            yield from self._sym_flat(kind, nbytes / k, rep, n // k, level, calls)
            if kind in ("all_reduce", "all_gather"):
                yield from self._sym_flat("all_gather", nbytes, rep, k, 0, calls)
            return
        if algorithm == "tree" and kind == "all_reduce":
            yield self.env.timeout(2 * math.ceil(math.log2(n)) * self.topo.latency_s(level) * calls)
            yield self.net.transfer(self.topo.path(rep, rep, level), 2 * nbytes)
            return
        if kind == "all_to_all":
            yield self.env.timeout(self.topo.latency_s(level) * calls)
            local = self.net.transfer(self.topo.path(rep, rep, 0), nbytes * (k - 1) / n)
            remote = self.net.transfer(self.topo.path(rep, rep, level), nbytes * (n - k) / n)
            yield local & remote
            return
        yield from self._sym_flat(kind, nbytes, rep, n, level, calls)

    def _sym_flat(self, kind, nbytes, rep, n, level, calls):
        if n <= 1:
            return
        hops = float(comm.hops(kind, n))
        yield self.env.timeout(hops * self.topo.latency_s(level) * calls)
        yield self.net.transfer(self.topo.path(rep, rep, level),
                                float(comm.wire_factor(kind, n)) * nbytes)

    # -- full-detail mode ---------------------------------------------------------------
    def join(self, key: tuple, member: int, members: tuple[int, ...], kind: str, nbytes: float,
             algorithm: str = "ring", calls: int = 1):
        """Process: member `member` takes part in call `key` of a group; it returns when the
        whole group's collective has finished (the last arrival starts it)."""
        if len(members) <= 1 or nbytes <= 0:
            return
        call = self._calls.setdefault(key, {"arrived": 0, "done": self.env.event()})
        call["arrived"] += 1
        if call["arrived"] == len(members):
            self.env.process(self._run_full(call["done"], members, kind, nbytes, algorithm, calls))
            del self._calls[key]
        yield call["done"]

    def _run_full(self, done, members, kind, nbytes, algorithm, calls):
        n = len(members)
        if algorithm == "hierarchical" and kind in ("all_reduce", "all_gather", "reduce_scatter"):
            nodes: dict[int, list[int]] = {}
            for r in members:
                nodes.setdefault(r // self.topo.cluster.node_size, []).append(r)
            local = list(nodes.values())
            k = len(local[0])
            if 1 < k < n and all(len(g) == k for g in local):
                across = [tuple(g[i] for g in local) for i in range(k)]
                if kind in ("all_reduce", "reduce_scatter"):
                    yield from self._parallel("reduce_scatter", nbytes, local, calls)
                yield from self._parallel(kind, nbytes / k, across, calls)
                if kind in ("all_reduce", "all_gather"):
                    yield from self._parallel("all_gather", nbytes, local, calls)
                done.succeed()
                return
        if algorithm == "tree" and kind == "all_reduce":
            lat = max(self.topo.latency_s(self.topo.span(a, b)) for a, b in _ring(members))
            yield self.env.timeout(2 * math.ceil(math.log2(n)) * lat * calls)
            yield simpy.AllOf(self.env, [self.net.transfer(self.topo.path(a, b), 2 * nbytes)
                                         for a, b in _ring(members)])
        elif kind == "all_to_all":
            lat = max(self.topo.latency_s(self.topo.span(a, b))
                      for a in members for b in members if a != b)
            yield self.env.timeout(lat * calls)
            yield simpy.AllOf(self.env, [self.net.transfer(self.topo.path(a, b), nbytes / n)
                                         for a in members for b in members if a != b])
        else:
            yield from self._ring_steps(kind, nbytes, members, calls)
        done.succeed()

    def _parallel(self, kind, nbytes, groups, calls):
        procs = [self.env.process(self._ring_steps(kind, nbytes, g, calls)) for g in groups]
        yield simpy.AllOf(self.env, procs)

    def _ring_steps(self, kind, nbytes, members, calls):
        """Ring algorithm: each step every member sends nbytes/n to its neighbour."""
        n = len(members)
        if n <= 1:
            return
        pairs = _ring(members)
        lat = max(self.topo.latency_s(self.topo.span(a, b)) for a, b in pairs)
        steps = int(comm.hops(kind, n)) if kind != "send_recv" else 1
        chunk = nbytes / n if kind != "send_recv" else nbytes
        for _ in range(steps):
            yield self.env.timeout(lat * calls)
            yield simpy.AllOf(self.env, [self.net.transfer(self.topo.path(a, b), chunk)
                                         for a, b in pairs])

    def send(self, src: int, dst: int, nbytes: float, level: int | None = None):
        """Process: one point-to-point message (symmetric mode: pass `level`, dst = src)."""
        if nbytes <= 0:
            return
        lv = self.topo.span(src, dst) if level is None else level
        yield self.env.timeout(self.topo.latency_s(lv))
        yield self.net.transfer(self.topo.path(src, dst, level), nbytes)


def _ring(members) -> list[tuple[int, int]]:
    """(sender, receiver) pairs of a ring over the members in order."""
    return [(members[i], members[(i + 1) % len(members)]) for i in range(len(members))]
