"""Pipeline stage split: which units (and layers) each pipeline stage runs.

Stages take whole units (`LayerGraph.units`), split as evenly as possible with the first and
last virtual stages getting the fewer where uneven, since they also carry the embeddings and
the output head (Llama 3 405B: 126 layers on 16 stages = 7, 8 x 14, 7; Dubey et al. 2024,
arXiv 2407.21783, section 3.3.2). With `vpp` chunks per stage, stage s runs chunks
s, s + pp, s + 2 pp, ... (interleaved 1F1B).
"""
from __future__ import annotations

from typing import Any

from .costmodel.graph import POST_UNIT, PRE_UNIT, Layer
from .plan import Plan, PlanError, Violation

__all__ = ["bottleneck_stage", "stage_flops", "stage_layers", "stage_units",
           "virtual_stage_layers", "virtual_stage_units"]


def virtual_stage_units(units: int, pp: int, vpp: int = 1) -> list[list[int]]:
    """Unit indices of each of the pp x vpp virtual stages, contiguous and in order.

    Units are split as evenly as possible (sizes differ by at most one). Where the split is
    uneven the first and last virtual stages get the fewer units, since they also carry the
    embeddings and the output head: the extra units go to the middle stages, latest first
    (under 1F1B earlier stages keep more microbatches' activations), and only when every
    middle stage has one does the first get one too (the head outweighs the embedding).
    """
    for name, value, low in (("units", units, 0), ("pp", pp, 1), ("vpp", vpp, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise PlanError([Violation(name, f"{name} is an integer >= {low}",
                                       f"{name}={value!r} is not an integer >= {low}")])
    stages = pp * vpp
    if stages > 1 and units < stages:
        raise PlanError([Violation("pp", "each pipeline (virtual) stage gets at least one unit",
                                   f"pp x vpp = {pp} x {vpp} = {stages} stages but only "
                                   f"{units} units")])
    sizes = [units // stages] * stages
    extra = units % stages
    for v in [*range(stages - 2, 0, -1), 0][:extra]:
        sizes[v] += 1
    out, start = [], 0
    for size in sizes:
        out.append(list(range(start, start + size)))
        start += size
    return out


def stage_units(units: int, pp: int, vpp: int = 1) -> list[list[int]]:
    """Unit indices on each physical stage: stage s holds virtual stages s, s + pp, ...
    (round-robin, as in Megatron-LM's interleaved schedule), in that order."""
    chunks = virtual_stage_units(units, pp, vpp)
    return [[u for chunk in chunks[s::pp] for u in chunk] for s in range(pp)]


def virtual_stage_layers(graph: Any, plan: Plan) -> list[list[Layer]]:
    """Layers of each virtual stage, in forward order: PRE_UNIT layers (stem, embeddings) on
    the first, POST_UNIT layers (final norm, head, loss) on the last."""
    chunks = virtual_stage_units(graph.units, plan.pp, plan.vpp)
    stage_of = {u: v for v, chunk in enumerate(chunks) for u in chunk}
    stage_of[PRE_UNIT], stage_of[POST_UNIT] = 0, len(chunks) - 1
    out: list[list[Layer]] = [[] for _ in chunks]
    for layer in graph.layers:
        if layer.unit not in stage_of:
            raise ValueError(f"layer {layer.name}: unit {layer.unit} is not PRE_UNIT, POST_UNIT "
                             f"or in 0..{graph.units - 1} (rule: layers belong to a unit)")
        out[stage_of[layer.unit]].append(layer)
    return out


def stage_layers(graph: Any, plan: Plan) -> list[list[Layer]]:
    """Layers of each physical stage: its virtual stages' layers, chunk after chunk."""
    chunks = virtual_stage_layers(graph, plan)
    return [[layer for chunk in chunks[s::plan.pp] for layer in chunk] for s in range(plan.pp)]


def stage_flops(graph: Any, plan: Plan) -> list[int]:
    """Forward + backward FLOPs of each physical stage (graph batch, no recomputation)."""
    return [sum(layer.flops for layer in layers) for layers in stage_layers(graph, plan)]


def bottleneck_stage(graph: Any, plan: Plan) -> int:
    """Index of the physical stage with the most forward + backward FLOPs, the one that sets
    the pipeline's pace (the lowest index on a tie)."""
    flops = stage_flops(graph, plan)
    return flops.index(max(flops))
