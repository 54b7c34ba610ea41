"""What each op of a plan sends: the collectives inside a microbatch's forward and backward.

One function for the cost model (which times them in closed form) and the simulator (which
issues them on its network): per signature and plan, the bytes of one call and how many
calls a microbatch's forward and backward make (recomputation's reruns counted in the
backward), for the TP, CP and EP groups; and the pipeline message size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .plans import DTYPE_BYTES, CostOptions, PlanArrays
from .profile import VOCAB_LOSS_ALLREDUCES, GraphProfile

RECOMPUTE_SELECTIVE, RECOMPUTE_FULL = 1, 2


@dataclass
class LayerCollective:
    """One collective family of the layers, per signature (rows) and plan (columns)."""

    name: str
    """Human name, e.g. `TP all-reduce`."""
    kind: str
    """Collective kind (`comm.COLLECTIVES`)."""
    group: str
    """`tp`, `cp` or `ep`."""
    bytes: np.ndarray
    """Bytes of one call (S x N)."""
    fwd_calls: np.ndarray
    """Calls in one microbatch's forward (S x N)."""
    bwd_calls: np.ndarray
    """Calls in one microbatch's backward, recomputation included (S x N)."""


def group_of(plans: PlanArrays, group: str) -> tuple[np.ndarray, np.ndarray]:
    """(size, stride) of a plan group: a mesh dimension, or `ep` (carved from cp x fsdp,
    innermost first) or `dp_all` (every rank holding the same weights: cp x fsdp x dp)."""
    if group == "ep":
        return plans.ep, plans.group(("cp", "fsdp"))[1]
    if group == "dp_all":
        return plans.group(("cp", "fsdp", "dp"))
    return plans.group((group,))


def layer_collectives(prof: GraphProfile, plans: PlanArrays,
                      opt: CostOptions) -> list[LayerCollective]:
    """The TP, CP and EP collectives of every op (see module docstring)."""
    elem = DTYPE_BYTES[plans.dtype] / 2
    mb, cp, tp = plans.mb, plans.cp, plans.tp
    full = (plans.recompute == RECOMPUTE_FULL)[None, :]
    again = (plans.recompute > 0)[None, :]  # selective and full both rerun attention
    ones = np.ones((len(prof.kind), len(plans)))
    out = []
    # TP: an all-reduce (reduce-scatter + all-gather with SP: the same bytes) after every
    # row-parallel op forward and backward; the vocab embedding's forward; the vocab head's
    # backward; a full recompute reruns the unit ops' forward ones.
    row = (prof.tp_fwd_calls * prof.tp_bwd_calls)[:, None]
    out.append(LayerCollective(
        "TP all-reduce (reduce-scatter + all-gather with SP)", "all_reduce", "tp",
        prof.tp_allreduce_bytes[:, None] * mb / cp * elem * ones,
        prof.tp_fwd_calls[:, None] * ones, (prof.tp_bwd_calls[:, None] + full * row) * ones))
    # The loss over vocabulary-split logits: all-reduces of one value per token (SP or not).
    loss = (prof.tp_loss_bytes > 0)[:, None] * ones
    out.append(LayerCollective(
        "TP all-reduce of the vocab-parallel loss (row max, sum of exponentials, target logit)",
        "all_reduce", "tp", prof.tp_loss_bytes[:, None] * mb / cp * elem * ones,
        VOCAB_LOSS_ALLREDUCES * loss, 0 * loss))
    # SP around a block TP leaves whole (MoE): its input is all-gathered forward, and its
    # output split again, whose backward all-gathers the gradient (the input gradient is
    # the same on every rank, so the gather's backward is a local split); a full recompute
    # gathers the input again.
    gathered = (prof.tp_gather_bytes > 0)[:, None] * plans.sp[None, :] * ones
    out.append(LayerCollective("TP all-gather around a whole MoE block (SP)", "all_gather",
                               "tp", prof.tp_gather_bytes[:, None] * mb / cp * elem * ones,
                               gathered, gathered * (1 + full)))
    attention = (prof.kv_bytes > 0)[:, None] * ones
    if opt.cp_algorithm == "ring":
        # Ring attention = all-gather of K/V forward; all-gather K/V + reduce-scatter dK/dV
        # backward (and the forward again when recomputed).
        kv = prof.kv_bytes[:, None] * mb * elem * np.where(prof.tp_split[:, None], 1.0 / tp, 1.0)
        out.append(LayerCollective("CP ring K/V exchange", "all_gather", "cp", kv,
                                   attention, attention * (1 + again)))
        out.append(LayerCollective("CP ring dK/dV reduce-scatter", "reduce_scatter", "cp", kv,
                                   0 * attention, attention))
    else:
        qkvo = (prof.kv_bytes + prof.qo_bytes)[:, None] * mb * elem / tp / np.maximum(cp, 1)
        out.append(LayerCollective("CP all-to-all (Ulysses)", "all_to_all", "cp", qkvo,
                                   2 * attention, attention * (2 + again)))
    moe = (prof.moe_buffer_bytes > 0)[:, None] * ones
    out.append(LayerCollective("EP all-to-all (dispatch + combine)", "all_to_all", "ep",
                               prof.moe_buffer_bytes[:, None] * mb / cp * elem * ones,
                               2 * moe, moe * (2 + 2 * full)))
    return out


def p2p_bytes(prof: GraphProfile, plans: PlanArrays, opt: CostOptions) -> np.ndarray:
    """Bytes of one pipeline message (a unit's input activation and the skip maps carried
    across the boundary, `LayerGraph.carried`, averaged over the units; or their gradients):
    divided by tp with SP or the scatter/gather optimisation, by cp always."""
    elem = DTYPE_BYTES[plans.dtype] / 2
    rows = prof.checkpoint_sig[1:-1]
    ckpt = np.where(rows >= 0, prof.saved_bytes[np.maximum(rows, 0)], 0.0).mean() if prof.units else 0.0
    carried = prof.graph.carried
    ckpt += float(np.mean([size for _, size in carried])) if carried else 0.0
    divide = np.where(plans.sp | opt.pp_scatter_gather, plans.tp, 1)
    return ckpt * plans.mb / plans.cp / divide * elem


def p2p_tensors(prof: GraphProfile) -> float:
    """Tensors in one pipeline message, averaged over the unit boundaries: the activation
    and the skip maps carried across (`LayerGraph.carried`); each is its own send."""
    carried = prof.graph.carried
    return 1.0 + (float(np.mean([n for n, _ in carried])) if carried else 0.0)


def rank_params(prof: GraphProfile, plans: PlanArrays) -> np.ndarray:
    """Parameters one rank holds of each signature's op (S x N): TP splits its layers, EP the
    experts (before any ZeRO/FSDP sharding)."""
    p = prof.params[:, None] * np.where(prof.tp_split[:, None], 1.0 / plans.tp, 1.0)
    return p * np.where(prof.ep[:, None], 1.0 / plans.ep, 1.0)
