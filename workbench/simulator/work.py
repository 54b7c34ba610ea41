"""The work of each virtual pipeline stage, from the cost model: seconds and collectives.

Per virtual stage v and microbatch: forward and backward compute seconds (roofline per op,
`costmodel.engine.op_times`; recomputation added to the backward; times the chip's
`pp_compute_factor` in a pipeline, as the engine does), the TP/CP/EP collectives
of its ops aggregated per family (total bytes and number of calls, so one simulated call
costs exactly the calls' summed latency and bandwidth time), its parameters per rank, and
its units (FSDP gathers them one at a time).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..costmodel.efficiency import efficiency_for, in_pipeline_factor
from ..costmodel.engine import op_times
from ..costmodel.plans import CostOptions, PlanArrays
from ..costmodel.profile import GraphProfile
from ..costmodel.volumes import RECOMPUTE_FULL, RECOMPUTE_SELECTIVE, layer_collectives, rank_params
from ..hardware import Cluster
from ..stages import virtual_stage_units


@dataclass
class CollectiveWork:
    """An aggregated collective family of one op."""

    name: str
    kind: str
    group: str
    bytes: float
    calls: int


@dataclass
class StageWork:
    """One virtual stage's work per microbatch on one rank."""

    fwd_s: float
    """Forward compute seconds."""
    bwd_s: float
    """Backward compute seconds, recomputation included."""
    fwd_comm: list[CollectiveWork]
    """Collectives of the forward."""
    bwd_comm: list[CollectiveWork]
    """Collectives of the backward."""
    params: float
    """Parameters per rank (before ZeRO/FSDP sharding)."""
    units: int
    """Repeated units in this chunk (at least 1)."""
    root_params: float = 0.0
    """Parameters of its pre/post layers (embeddings, head): FSDP's root, gathered once per
    microbatch."""


def virtual_counts(prof: GraphProfile, pp: int, vpp: int) -> np.ndarray:
    """V x S layer counts per virtual stage (pre rows on the first, post on the last)."""
    v_total = pp * vpp
    rows = np.zeros((v_total, prof.counts.shape[0]))
    for v, units in enumerate(virtual_stage_units(prof.units, pp, vpp)):
        rows[v, np.asarray(units, dtype=int) + 1] = 1
    rows[0, 0] = 1
    rows[-1, -1] = 1
    return rows


def stage_work(prof: GraphProfile, plans: PlanArrays, cluster: Cluster,
               opt: CostOptions) -> list[StageWork]:
    """Work of every virtual stage of the single plan in `plans`."""
    if len(plans) != 1:
        raise ValueError("stage_work takes exactly one plan")
    pp, vpp = int(plans.pp[0]), int(plans.vpp[0])
    t_f, t_b, _ = op_times(prof, plans, cluster, opt)
    t_f, t_b = t_f[:, 0], t_b[:, 0]
    rec = int(plans.recompute[0])
    attention = prof.kind == "attention"
    rec_sig = t_f if rec == RECOMPUTE_FULL else (t_f * attention if rec == RECOMPUTE_SELECTIVE else 0 * t_f)
    rows = virtual_counts(prof, pp, vpp)
    counts = rows @ prof.counts                       # V x S
    units = rows @ prof.unit_counts
    families = layer_collectives(prof, plans, opt)
    p_sig = rank_params(prof, plans)[:, 0]
    params = counts @ p_sig
    pre, post = prof.counts[0] @ p_sig, prof.counts[-1] @ p_sig
    in_pipe = in_pipeline_factor(efficiency_for(cluster.chip), pp)
    out = []
    for v in range(pp * vpp):
        def comm(direction):
            work = []
            for fam in families:
                calls = getattr(fam, f"{direction}_calls")[:, 0] * counts[v]
                if calls.sum() > 0:
                    work.append(CollectiveWork(fam.name, fam.kind, fam.group,
                                               float(calls @ fam.bytes[:, 0]), int(calls.sum())))
            return work
        unit_rows = int(rows[v, 1:-1].sum())
        out.append(StageWork(fwd_s=float(counts[v] @ t_f) * in_pipe,
                             bwd_s=float(counts[v] @ t_b + units[v] @ rec_sig) * in_pipe,
                             fwd_comm=comm("fwd"), bwd_comm=comm("bwd"),
                             params=float(params[v]), units=max(unit_rows, 1),
                             root_params=float(rows[v, 0] * pre + rows[v, -1] * post)))
    return out
