"""Memory per rank: weights, gradients, optimizer state, activations, FSDP buffers.

Per pipeline stage, then the most loaded stage is the rank's peak:

- states: bytes per parameter by precision and optimizer (mixed-precision Adam: 2 weight +
  2 grad + 12 optimizer = 16, Rajbhandari et al. 2019; SGD with momentum: 2 + 2 + 8 = 12;
  fp32: 4 + 4 + 8 / 4), sharded as the plan says: ZeRO-1 the optimizer, ZeRO-2 also the
  grads, ZeRO-3 / FSDP also the weights, over the ranks holding the same weights (FSDP: the
  shard group fsdp x cp; ZeRO: every DP rank); TP divides split layers, EP the experts.
- activations: the saved bytes of the stage's layers per microbatch (TP, SP and CP divide
  them as their layers split), times the microbatches in flight: GPipe m; 1F1B pp - stage;
  interleaved 1F1B the Megatron-LM warm-up count over vpp. Selective recomputation drops the
  attention core's saved tensors (Korthikanti et al. 2022); full recomputation keeps each
  unit's input and rematerialises one unit at a time.
- FSDP buffers: the gathered weights of the unit in use and the prefetched next one, plus
  one unit's unsharded gradient.
- a fixed framework allowance (`plans.FRAMEWORK_ALLOWANCE_BYTES`).
"""
from __future__ import annotations

import numpy as np

from ..hardware import Cluster
from .plans import DTYPE_BYTES, CostOptions, PlanArrays
from .profile import GraphProfile

STATE_BYTES = {  # (weights, grads, optimizer) bytes per parameter
    ("adam", 2): (2, 2, 12), ("adam", 4): (4, 4, 8),
    ("sgd", 2): (2, 2, 8), ("sgd", 4): (4, 4, 4),
}


def state_bytes_per_param(optimizer: str, dtype: str) -> tuple[int, int, int]:
    """(weight, gradient, optimizer) bytes per parameter; fp8 keeps bf16 weights (2 bytes)."""
    return STATE_BYTES[(optimizer, 4 if DTYPE_BYTES[dtype] == 4 else 2)]


def inflight_microbatches(schedule: np.ndarray, stage: np.ndarray, pp: np.ndarray,
                          vpp: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Microbatches whose activations a stage holds at its peak (in whole-stage units)."""
    gpipe = m
    one_f_one_b = np.minimum(m, pp - stage)
    warmup = (pp - stage - 1) * 2 + (vpp - 1) * pp + 1  # Megatron-LM interleaved warm-up
    interleaved = np.minimum(m * vpp, warmup) / vpp
    return np.select([schedule == 0, schedule == 1], [gpipe, one_f_one_b], interleaved)


def memory_per_stage(prof: GraphProfile, plans: PlanArrays, cluster: Cluster,
                     opt: CostOptions, share: np.ndarray, groups: dict,
                     params_sig: np.ndarray) -> dict:
    """Peak bytes per rank and its breakdown (arrays of len(plans)).

    `share` (S x N) is the part of each op a rank does, `params_sig` (S x N) its parameters
    per rank, `groups` maps (pp, vpp) to (plan indices, stage x signature counts, the same
    for unit rows only), as the engine made them.
    """
    n = len(plans)
    elem = DTYPE_BYTES[plans.dtype] / 2
    w_b, g_b, o_b = state_bytes_per_param(opt.optimizer, plans.dtype)
    saved = prof.saved_bytes[:, None] * share * plans.mb * elem       # S x N per microbatch
    not_attention = (prof.kind != "attention")[:, None]

    sharded = (plans.fsdp > 1) | (plans.zero == 3)
    n_shard = np.where(plans.fsdp > 1, plans.fsdp * plans.cp, plans.dp * plans.cp)
    shard_w = np.where(sharded, n_shard, 1)
    # FSDP reduce-scatters once per step, on the last microbatch: with gradient accumulation
    # (m > 1) the gradients stay unsharded between microbatches (FSDP2's
    # set_requires_gradient_sync(False)), so they cost their full size.
    m_acc = plans.microbatches
    shard_g = np.where((sharded & (m_acc == 1)) | (~sharded & (plans.zero >= 2)), n_shard, 1)
    shard_o = np.where(sharded | (plans.zero >= 1), n_shard, 1)
    m = plans.microbatches

    keys = ("weights_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes",
            "fsdp_buffer_bytes", "memory_peak_bytes", "memory_stage")
    out = {k: np.zeros(n) for k in keys}
    for (pp, vpp), (idx, sc, su) in groups.items():
        cols = lambda x: x[:, idx]                                  # noqa: E731
        a = prof.stage_matrix(pp, vpp)
        sk = a @ prof.checkpoint_counts
        s_saved = cols(saved)
        rec = plans.recompute[idx]
        acts = np.select([rec == 2, rec == 1],
                         [sk @ s_saved, sc @ (s_saved * not_attention)], sc @ s_saved)
        units_per_stage = np.maximum(su.sum(axis=1) / max(su.sum(), 1) * prof.units, 1)[:, None]
        remat = np.where(rec == 2, (su @ s_saved) / units_per_stage, 0.0)
        inflight = inflight_microbatches(plans.schedule[idx][None, :], np.arange(pp)[:, None],
                                         pp, vpp, m[idx][None, :])
        activations = acts * inflight + remat
        params = sc @ cols(params_sig)                                # stage x k
        weights = params * w_b / shard_w[idx]
        grads = params * g_b / shard_g[idx]
        optim = params * o_b / shard_o[idx]
        buffers = np.where(sharded[idx], params / units_per_stage * (2 * w_b + g_b), 0.0)
        total = weights + grads + optim + activations + buffers + opt.framework_bytes
        worst = total.argmax(axis=0)
        pick = lambda x: x[worst, np.arange(len(idx))]              # noqa: E731
        for k, v in (("weights_bytes", weights), ("grads_bytes", grads),
                     ("optimizer_bytes", optim), ("activations_bytes", activations),
                     ("fsdp_buffer_bytes", buffers), ("memory_peak_bytes", total)):
            out[k][idx] = pick(v)
        out["memory_stage"][idx] = worst
    out["framework_bytes"] = np.full(n, float(opt.framework_bytes))
    out["memory_capacity_bytes"] = np.full(n, float(cluster.chip.memory_bytes))
    out["fits"] = out["memory_peak_bytes"] <= out["memory_capacity_bytes"]
    return out
