"""`estimate(graph, plan, cluster)`: what one training step of a plan costs, with breakdowns."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..hardware import Cluster
from ..plan import Plan
from .engine import evaluate
from .graph import LayerGraph
from .plans import CostOptions, PlanArrays
from .profile import GraphProfile, profile

_PROFILES: dict[int, tuple[LayerGraph, GraphProfile]] = {}


def cached_profile(graph: LayerGraph) -> GraphProfile:
    """The graph's profile, built once per graph object."""
    hit = _PROFILES.get(id(graph))
    if hit is None or hit[0] is not graph:
        if len(_PROFILES) > 64:
            _PROFILES.clear()
        hit = _PROFILES[id(graph)] = (graph, profile(graph))
    return hit[1]


@dataclass
class Collective:
    """One kind of collective a step issues."""

    name: str
    """What it is for, e.g. `TP all-reduce (activations)`."""
    kind: str
    """all_reduce, all_gather, reduce_scatter, all_to_all, send_recv."""
    group: str
    """The mesh dimension(s) of its group (tp, cp, ep, pp, dp, fsdp)."""
    group_size: int
    """Ranks in the group."""
    level: str
    """The hierarchy level the group crosses (node = NVLink)."""
    bytes: float
    """Size of one call (`comm.py` conventions), the largest of the family."""
    count_per_step: int
    """Calls per step on one rank of the slowest stage."""
    seconds: float
    """Time of one call on an idle network."""
    bytes_per_step: float = 0.0
    """Bytes of all its calls in a step on one rank (`comm.py` conventions)."""


@dataclass
class Memory:
    """Peak bytes per rank (the most loaded pipeline stage) and their parts."""

    weights_bytes: float
    """Model weights held by the rank."""
    grads_bytes: float
    """Gradients."""
    optimizer_bytes: float
    """Optimizer states (fp32 master weights, moments)."""
    activations_bytes: float
    """Saved activations of the microbatches in flight."""
    fsdp_buffer_bytes: float
    """Gathered weights and unsharded gradients of the units in use (FSDP/ZeRO-3)."""
    framework_bytes: float
    """The fixed framework allowance."""
    peak_bytes: float
    """Sum of the above."""
    capacity_bytes: float
    """The chip's memory."""
    fits: bool
    """peak <= capacity."""
    stage: int
    """The pipeline stage with this peak."""

    @property
    def over_by_bytes(self) -> float:
        """How much does not fit (0 when it fits)."""
        return max(0.0, self.peak_bytes - self.capacity_bytes)


@dataclass
class Estimate:
    """The cost of one training step of a plan on a cluster."""

    model: str
    """Model name."""
    plan: str
    """The plan, compact form."""
    cluster: str
    """Cluster preset name."""
    n_chips: int
    """World size."""
    step_time_s: float
    """Predicted seconds per optimizer step."""
    breakdown_s: dict[str, float]
    """Where the step goes: compute, recompute, tp/cp/ep/pp communication, FSDP gathers,
    bubble, exposed DP reduction, ZeRO gather, optimizer (seconds, summing to the step)."""
    samples_per_s: float
    """Samples per second, whole cluster."""
    tokens_per_s: float | None
    """Tokens per second (sequence models)."""
    model_tflops_per_chip: float
    """Model FLOPs per step / step time / chips, in TFLOP/s."""
    hardware_tflops_per_chip: float
    """Same with recomputation counted."""
    mfu: float
    """Model FLOPs utilisation (DESIGN.md)."""
    hfu: float
    """Hardware FLOPs utilisation (recomputation counted)."""
    memory: Memory
    """Peak memory per rank."""
    comm: list[Collective] = field(default_factory=list)
    """Every collective kind the step issues."""
    bottleneck_stage: int = 0
    """The pipeline stage that sets the pace."""

    def to_json(self) -> dict[str, Any]:
        """Plain dict with the documented keys (`step_time_s`, `mfu`, `comm`, ...)."""
        d = asdict(self)
        d["memory_peak_bytes"] = self.memory.peak_bytes
        d["fits"] = self.memory.fits
        d["memory"]["over_by_bytes"] = self.memory.over_by_bytes
        return d


BREAKDOWN = ("compute_s", "recompute_s", "tp_comm_s", "cp_comm_s", "ep_comm_s", "pp_comm_s",
             "fsdp_exposed_s")
"""Per-microbatch parts of the slowest stage (times microbatches in the step)."""


def estimate(graph: LayerGraph, plan: Plan | str, cluster: Cluster,
             options: CostOptions = CostOptions()) -> Estimate:
    """Predict one training step of `plan` for `graph` (built at batch 1) on `cluster`.

    The plan is validated against the cluster's size and the model first; an impossible
    plan raises `PlanError` naming every broken rule.
    """
    if isinstance(plan, str):
        plan = Plan.parse(plan)
    plan.validate(cluster.n_chips, graph)
    prof = cached_profile(graph)
    out = evaluate(prof, PlanArrays.from_plans([plan]), cluster, options)
    v = {k: (float(a[0]) if isinstance(a, np.ndarray) else a) for k, a in out.items()}
    m = plan.microbatches
    breakdown = {k: v[k] * m for k in BREAKDOWN}
    breakdown.update(bubble_s=v["bubble_s"], dp_exposed_s=v["dp_exposed_s"],
                     zero_gather_s=v["zero_gather_s"], optimizer_s=v["optimizer_s"])
    memory = Memory(v["weights_bytes"], v["grads_bytes"], v["optimizer_bytes"],
                    v["activations_bytes"], v["fsdp_buffer_bytes"], v["framework_bytes"],
                    v["memory_peak_bytes"], v["memory_capacity_bytes"], bool(v["fits"]),
                    int(v["memory_stage"]))
    comm = [Collective(r["name"], r["kind"], r["group"], int(np.ravel(r["group_size"])[0]),
                       cluster.levels[int(np.ravel(r["level"])[0])].name,
                       float(np.ravel(r["bytes"])[0]), int(np.ravel(r["count_per_step"])[0]),
                       float(np.ravel(r["time_s"])[0]), float(np.ravel(r["bytes_per_step"])[0]))
            for r in out["records"]
            if np.ravel(r["count_per_step"])[0] > 0 and np.ravel(r["group_size"])[0] > 1]
    return Estimate(model=graph.model, plan=plan.compact(), cluster=cluster.name,
                    n_chips=cluster.n_chips, step_time_s=v["step_time_s"], breakdown_s=breakdown,
                    samples_per_s=v["samples_per_s"],
                    tokens_per_s=v["tokens_per_s"] if graph.seq else None,
                    model_tflops_per_chip=v["model_tflops_per_chip"],
                    hardware_tflops_per_chip=v["hardware_tflops_per_chip"], mfu=v["mfu"],
                    hfu=v["hfu"], memory=memory, comm=comm,
                    bottleneck_stage=int(v["bottleneck_stage"]))
