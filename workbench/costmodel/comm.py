"""The one communication formula, shared by the cost model and the simulator (DESIGN.md).

    time = latency x hops + wire_factor x bytes / achieved bandwidth

per collective and algorithm, on the hierarchy level a group spans. Everything here is
vectorised: sizes, group sizes and strides may be numpy arrays (one entry per plan).

Conventions for `size_bytes`: the all-reduce buffer; the all-gather *output* (all shards);
the reduce-scatter *input*; each rank's all-to-all buffer (it keeps 1/n, sends the rest);
the message of a send/recv; the broadcast buffer.

Algorithms (Thakur, Rabenseifner, Gropp 2005; NCCL):
- ring: n-1 steps per phase, each rank sends (n-1)/n of the buffer per phase; bandwidth
  optimal, latency linear in n. Across nodes the per-chip NIC is the bottleneck.
- tree (all-reduce only; NCCL's double binary tree): 2 ceil(log2 n) latency hops, and every
  byte goes up and down once (wire factor 2): latency logarithmic, bandwidth never better.
- hierarchical: reduce-scatter inside each node, the collective on 1/k of the data across
  nodes (k = the group's ranks per node, one cross-node ring per local rank), all-gather
  inside the node. Reduces to ring when the group does not leave a node or has one rank
  per node.
"""
from __future__ import annotations

import numpy as np

from ..hardware import Cluster

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv",
               "broadcast")
ALGORITHMS = ("ring", "tree", "hierarchical")


def hops(kind: str, n: np.ndarray) -> np.ndarray:
    """Latency hops of the ring (or direct) algorithm."""
    if kind == "all_reduce":
        return 2 * (n - 1)
    if kind in ("all_gather", "reduce_scatter", "broadcast"):
        return n - 1
    return np.ones_like(n)  # all_to_all posts every send at once; send_recv is one hop


def wire_factor(kind: str, n: np.ndarray) -> np.ndarray:
    """Bytes each rank sends per byte of `size_bytes` (ring algorithms)."""
    n = np.asarray(n, dtype=float)
    if kind == "all_reduce":
        return 2 * (n - 1) / n
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    return np.ones_like(n)


def _level_arrays(cluster: Cluster):
    sizes = np.array([lv.size for lv in cluster.levels])
    bw = np.array([lv.achieved_bandwidth_Bps for lv in cluster.levels])
    lat = np.array([lv.latency_s for lv in cluster.levels])
    return sizes, bw, lat


def ranks_per_node(cluster: Cluster, n: np.ndarray, stride: np.ndarray) -> np.ndarray:
    """How many members of a group of n ranks at `stride` share one node (>= 1)."""
    node = cluster.node_size
    return np.where(stride >= node, 1, np.minimum(n, np.maximum(1, node // np.maximum(stride, 1))))


def span_level(cluster: Cluster, n, stride) -> np.ndarray:
    """Index of the hierarchy level a group crosses (0 = inside a node)."""
    n, stride = np.broadcast_arrays(np.asarray(n), np.asarray(stride))
    return cluster.span_level_indices(np.maximum(n, 2), stride)


def _flat(kind, size, n, level, cluster):
    _, bw, lat = _level_arrays(cluster)
    return hops(kind, n) * lat[level] + wire_factor(kind, n) * size / bw[level]


def collective_time_s(kind: str, size_bytes, n, stride, cluster: Cluster,
                      algorithm: str = "ring") -> np.ndarray:
    """Seconds one collective takes on an otherwise idle network (0 for groups of 1).

    `n` ranks spaced `stride` apart in the rank order (the mesh order of the plan).
    """
    if kind not in COLLECTIVES:
        raise ValueError(f"collective {kind!r} is not one of {COLLECTIVES}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm!r} is not one of {ALGORITHMS}")
    size = np.asarray(size_bytes, dtype=float)
    n, stride = np.asarray(n), np.asarray(stride)
    size, n, stride = np.broadcast_arrays(size, n, stride)
    level = span_level(cluster, n, stride)
    if algorithm == "tree" and kind == "all_reduce":
        _, bw, lat = _level_arrays(cluster)
        hops = 2 * np.ceil(np.log2(np.maximum(n, 2)))
        t = hops * lat[level] + 2 * size / bw[level]
    elif algorithm == "hierarchical" and kind in ("all_reduce", "all_gather", "reduce_scatter"):
        t = _hierarchical(kind, size, n, stride, level, cluster)
    elif kind == "all_to_all":
        t = _all_to_all(size, n, stride, level, cluster)
    else:
        t = _flat(kind, size, n, level, cluster)
    return np.where(n > 1, t, 0.0)


def _hierarchical(kind, size, n, stride, level, cluster):
    k = ranks_per_node(cluster, n, stride)
    nodes = np.maximum(n // k, 1)
    inside = np.zeros_like(level)
    flat = _flat(kind, size, n, level, cluster)
    if kind == "all_reduce":
        t = (_flat("reduce_scatter", size, k, inside, cluster)
             + _flat("all_reduce", size / k, nodes, level, cluster)
             + _flat("all_gather", size, k, inside, cluster))
    else:  # all_gather / reduce_scatter: the cross-node part moves 1/k of the buffer
        t = _flat(kind, size / k, nodes, level, cluster) + _flat(kind, size, k, inside, cluster)
    return np.where((level > 0) & (k > 1) & (nodes > 1), t, flat)


def _all_to_all(size, n, stride, level, cluster):
    """Local share over NVLink and remote share over the spanned level, concurrently."""
    _, bw, lat = _level_arrays(cluster)
    k = ranks_per_node(cluster, n, stride)
    local = size * (k - 1) / n / bw[0]
    remote = size * (n - k) / n / bw[level]
    return lat[level] + np.maximum(local, remote)


def bus_bandwidth_Bps(kind: str, size_bytes, seconds, n):
    """nccl-tests' bus bandwidth of a measured collective: size / time x wire factor."""
    return np.asarray(size_bytes) / np.asarray(seconds) * wire_factor(kind, n)
