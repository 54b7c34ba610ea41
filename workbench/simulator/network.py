"""The cluster as SimPy objects: links shared by flows, laid out like the hardware hierarchy.

Flow-level (fluid) model, not packets: a `Link` has a capacity in bytes/s; every flow crossing
it gets an equal share, and a flow runs at the smallest share along its path (bottleneck
fair sharing). Whenever a flow starts or ends, the `Network` recomputes every active flow's
rate and re-schedules the next completion, so contention is exact for the fluid model.

Links mirror `hardware.Cluster`: each chip has an NVLink port (level 0) and a NIC (level 1,
one per GPU, rail-optimised), each direction a separate link; above that, every unit of level
L-1 has an uplink and a downlink to level L with the capacity of its chips' share
(`size x achieved bandwidth`, which carries the level's oversubscription). A flow between two
chips crosses the ports of the lowest level holding both, and the uplinks of every level
above the NIC it climbs. Latency is the level's per-hop latency, paid once per flow.

In symmetric mode a simulated rank stands for every rank doing the same work at the same
time, so its uplinks carry only its own fair share: the per-chip achieved bandwidth.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import simpy

from ..hardware import Cluster


@dataclass
class Link:
    """One direction of one physical link."""

    name: str
    """E.g. `nic_out[17]`, `rack_up[2]`."""
    capacity_Bps: float
    """Bytes per second."""
    level: str
    """Hierarchy level it belongs to."""
    flows: set = field(default_factory=set)
    """Active flows."""
    bytes_carried: float = 0.0
    """Bytes that have crossed it so far."""


@dataclass(eq=False)
class Flow:
    """Bytes moving along a path of links."""

    links: tuple[Link, ...]
    remaining: float
    done: simpy.Event
    rate: float = 0.0


class Network:
    """Fluid bandwidth sharing over `Link`s, driven by one SimPy process."""

    def __init__(self, env: simpy.Environment):
        self.env = env
        self.flows: set[Flow] = set()
        self._last = 0.0
        self._wakeup = env.event()
        self.events = 0
        env.process(self._run())

    def transfer(self, links: tuple[Link, ...], nbytes: float) -> simpy.Event:
        """An event that fires when `nbytes` have crossed `links` (immediately for 0 bytes)."""
        done = self.env.event()
        if nbytes <= 0 or not links:
            done.succeed()
            return done
        self._advance()
        flow = Flow(links, float(nbytes), done)
        self.flows.add(flow)
        for link in links:
            link.flows.add(flow)
        self._rebalance()
        return done

    def _advance(self) -> None:
        """Move every flow forward to now at its current rate."""
        dt = self.env.now - self._last
        if dt > 0:
            for f in self.flows:
                moved = f.rate * dt
                f.remaining -= moved
                for link in f.links:
                    link.bytes_carried += moved
        self._last = self.env.now

    def _rebalance(self) -> None:
        for f in self.flows:
            f.rate = min(link.capacity_Bps / len(link.flows) for link in f.links)
        if not self._wakeup.triggered:
            self._wakeup.succeed()

    def _run(self):
        while True:
            if not self.flows:
                self._wakeup = self.env.event()
                yield self._wakeup
                continue
            nxt = min(f.remaining / f.rate for f in self.flows)
            self._wakeup = self.env.event()
            yield self.env.timeout(max(nxt, 0.0)) | self._wakeup
            self._advance()
            self.events += 1
            finished = [f for f in self.flows if f.remaining <= 1e-9 * max(1.0, f.rate)]
            for f in finished:
                self.flows.discard(f)
                for link in f.links:
                    link.flows.discard(f)
                f.done.succeed()
            if finished:
                self._rebalance()


class Topology:
    """The links of a cluster and the path between two chips."""

    def __init__(self, cluster: Cluster, symmetric: bool):
        self.cluster, self.symmetric = cluster, symmetric
        self.levels = cluster.levels
        self.links: dict[tuple, Link] = {}

    def _link(self, key: tuple, capacity: float, level: str) -> Link:
        link = self.links.get(key)
        if link is None:
            link = self.links[key] = Link(f"{key[0]}[{key[1]}]", capacity, level)
        return link

    def span(self, a: int, b: int) -> int:
        """Index of the lowest level whose unit holds both chips."""
        for i, lv in enumerate(self.levels):
            if a // lv.size == b // lv.size:
                return i
        return len(self.levels) - 1

    def path(self, a: int, b: int, level: int | None = None) -> tuple[Link, ...]:
        """Links a flow from chip a to chip b crosses (symmetric mode: b may equal a, and
        `level` says which level the partner is across)."""
        lv = self.span(a, b) if level is None else level
        levels = self.levels
        if lv == 0:
            bw = levels[0].achieved_bandwidth_Bps
            return (self._link(("nvlink_out", a), bw, levels[0].name),
                    self._link(("nvlink_in", b), bw, levels[0].name))
        nic = levels[min(1, len(levels) - 1)].achieved_bandwidth_Bps
        path = [self._link(("nic_out", a), nic, levels[1].name),
                self._link(("nic_in", b), nic, levels[1].name)]
        for up in range(2, lv + 1):
            below, here = levels[up - 1], levels[up]
            share = here.achieved_bandwidth_Bps * (1 if self.symmetric else below.size)
            ua, ub = (a, b) if self.symmetric else (a // below.size, b // below.size)
            path += [self._link((f"{below.name}_up", ua), share, here.name),
                     self._link((f"{below.name}_down", ub), share, here.name)]
        return tuple(path)

    def latency_s(self, level: int) -> float:
        """Per-hop latency of a level."""
        return self.levels[level].latency_s

    def utilisation(self, seconds: float) -> list[dict]:
        """Per link: bytes carried and the busy fraction of its capacity over `seconds`."""
        rows = [{"link": l.name, "level": l.level, "bytes": l.bytes_carried,
                 "utilisation": l.bytes_carried / (l.capacity_Bps * seconds) if seconds else 0.0}
                for l in self.links.values()]
        return sorted(rows, key=lambda r: -r["utilisation"])
