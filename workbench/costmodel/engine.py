"""Vectorised cost evaluation: compute, communication, step time and MFU of many plans.

`evaluate(profile, plans, cluster, options)` returns one array per quantity (one entry per
plan) plus the step's collectives; `estimate()` is this with a batch of one plan and
`search()` with thousands. The model, per rank of the slowest pipeline stage:

    step = T_mb x (m + (pp - 1) / vpp) + exposed DP/FSDP reduction + ZeRO gather + optimizer

where T_mb is the stage's time per microbatch: forward + backward + recomputation of its
layers (roofline, `efficiency.py`), plus the communication on the critical path (TP
all-reduces, CP K/V exchange, EP all-to-all, pipeline sends, FSDP gathers not hidden by
prefetch), and m = microbatches per DP rank; (pp - 1) / vpp microbatch slots are the
pipeline bubble (Narayanan et al. 2021). Collective times come from `comm.py`.

Framework terms (`efficiency.py`; every one is 0, or 1 for the overlap, in the GPU presets,
so GPU predictions do not depend on them; a calibrated chip carries measured values):

- each op pays a fixed dispatch time per pass, per op kind (`dispatch_fwd_s`,
  `dispatch_bwd_s`; the presets' single `op_overhead_s`), and its kernel runs at the
  fraction of the curve its narrowest GEMM dimension allows (`Curve.width_sat`);
- where one unsplit microbatch of the whole model was timed (`model_passes_s`,
  `calibrate_models.py`), the difference from the op-level prediction of that microbatch
  is spread over the model's ops per pass: added to their dispatch when the ops predict too
  little (host work, not divided by TP or CP), taken off their kernels when too much;
- an op on tensor-parallel weights (TP-split ops with parameters when tp > 1, and the
  sequence-parallel ops with SP) pays `tp_op_fwd_s` / `tp_op_bwd_s` more (distributed-tensor
  dispatch), and each TP collective call `tp_collective_s` more (redistribution; ranks
  meeting after compute);
- ring attention pays `cp_step_s` per K/V block step, (cp - 1) steps per pass;
- every collective call pays `collective_call_s` on top of the link latency;
- DDP pays `ddp_microbatch_s` per microbatch, `ddp_tensor_s` per parameter tensor and step
  (gradient hooks of the microbatch that synchronises), `ddp_byte_s` per gradient byte it
  all-reduces and `ddp_step_s` per step, exposed;
- each FSDP unit all-gather pays `fsdp_gather_s` plus `fsdp_tensor_s` per parameter tensor
  and `fsdp_byte_s` per byte it gathers, each unit gradient reduction `fsdp_reduce_s`
  (copy-in/out, hooks; `fsdp_reduce_s` includes the call's latency, which the one modelled
  reduce-scatter of the stage's gradients then does not count again), and FSDP pays
  `fsdp_microbatch_s` per microbatch and `fsdp_step_s` per step;
- a pipeline stage pays `pp_action_s` per action (forward or backward of a microbatch on a
  model chunk), and its compute costs `pp_compute_factor` times its time alone;
- the optimizer pays `optimizer_tensor_s` per parameter tensor the rank updates
  (`optimizer_dtensor_s` when the tensor is a distributed tensor: FSDP shards, TP weights),
  and moves `optimizer_bytes_per_param` per parameter where measured (an unfused update);
- only `comm_overlap` of a collective hides behind concurrent compute (DP reduction behind
  the last backward, FSDP gathers behind the previous unit);
- the pipeline is its schedule replayed op by op (`pipeline.shared_core_pipeline_s`) where
  ranks share cores (`rank_contention` ranks per core, stage times measured with every rank
  busy: a stage that runs while others wait runs faster, and the bubble, the span minus
  m x T_mb, is negative where a heavy stage mostly runs alone) and wherever the schedule is
  short (`pipeline.REPLAY_MAX_OPS`); elsewhere the closed form `pipeline_bubble_s`, which is exact for
  balanced stages and an upper bound for unbalanced ones.
"""
from __future__ import annotations

import numpy as np

from ..hardware import Cluster
from ..plan import Plan
from . import comm
from .efficiency import efficiency_for, in_pipeline_factor
from .measured import measured_kernels, spread_model_passes
from .memory import memory_per_stage
from .pipeline import replayed_spans_s
from .plans import DTYPE_BYTES, CostOptions, PlanArrays
from .profile import GraphProfile, _row
from .volumes import (RECOMPUTE_FULL, RECOMPUTE_SELECTIVE, group_of, layer_collectives, p2p_bytes,
                      p2p_tensors, rank_params)

OPTIMIZER_STEP_BYTES = {"adam": 28, "sgd": 20}
"""Bytes each parameter's optimizer update reads and writes (Adam: fp32 master, m, v read and
written (24) + the low-precision grad read and weight written (4); SGD: master and momentum
(16) + 4)."""


def collective_s(kind, size, n, stride, cluster: Cluster, algorithm: str = "ring"):
    """`comm.collective_time_s` plus the chip's fixed framework cost per call."""
    t = comm.collective_time_s(kind, size, n, stride, cluster, algorithm)
    call = efficiency_for(cluster.chip).collective_call_s
    return t + np.where(np.asarray(n) > 1, call, 0.0) if call else t


def _collective(records, name, kind, group, n, stride, size, count, cluster, algorithm="ring",
                bytes_per_step=None):
    """Time one collective (per op) and keep a record of it for `Estimate.comm`."""
    t = collective_s(kind, size, n, stride, cluster, algorithm)
    records.append({"name": name, "kind": kind, "group": group, "group_size": n,
                    "level": comm.span_level(cluster, n, stride), "bytes": size,
                    "count_per_step": count, "time_s": t,
                    "bytes_per_step": size * count if bytes_per_step is None else bytes_per_step})
    return t


_LAYER_FACTS: dict[int, tuple] = {}


def _param_tensors(layer) -> int:
    """Parameter tensors a layer owns (a tied layer borrows its weight)."""
    sh, k = layer.shape, layer.kind
    weight = 0 if layer.tied_to else 1
    if k in ("linear", "conv"):
        return weight + int(bool(sh.get("bias", True)))
    if k == "batched_matmul":
        return int(bool(sh.get("params"))) + int(bool(sh.get("bias")))
    if k == "norm":
        return sh.get("affine_params", 2) if layer.params else 0
    if k == "lstm":
        return 4 if sh.get("bias", True) else 2
    if k in ("embedding", "parameter"):
        return weight
    return 0


def _width(layer) -> float:
    """The narrowest dimension of the GEMM behind a layer's kernel (inf for non-GEMM ops)."""
    sh, k = layer.shape, layer.kind
    if k == "linear":
        return min(sh["tokens"], sh["in_features"], sh["out_features"])
    if k == "batched_matmul":
        return min(sh["m"], sh["k"], sh["n"])
    if k == "conv":
        taps = int(np.prod(sh["kernel"]))
        return min(sh["in_channels"] // sh.get("groups", 1) * taps, sh["out_channels"])
    if k == "attention":
        return sh["head_dim"]
    if k == "lstm":
        return min(sh["input_size"], sh["hidden"])
    return float("inf")


def layer_facts(prof: GraphProfile) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per signature, the GEMM width (S); per row [pre, units..., post], the parameter
    tensors (U+2) and those of them that TP splits or SP shards (U+2). Cached per profile."""
    hit = _LAYER_FACTS.get(id(prof))
    if hit is not None and hit[0] is prof:
        return hit[1:]
    g = prof.graph
    index: dict[tuple, int] = {}
    for i in range(len(prof.kind)):
        index.setdefault((prof.kind[i], prof.fwd_flops[i], prof.bwd_flops[i], prof.rw_bytes[i],
                          prof.params[i], prof.saved_bytes[i]), i)
    width = np.full(len(prof.kind), np.inf)
    tensors = np.zeros(g.units + 2)
    tp_tensors = np.zeros((2, g.units + 2))  # [TP-split, SP-sharded]
    for layer in g.layers:
        key = (layer.kind, float(layer.fwd_flops), float(layer.bwd_flops),
               float(layer.read_bytes + layer.write_bytes), float(layer.params),
               float(layer.saved_bytes))
        sig = index.get(key)
        if sig is not None:
            width[sig] = min(width[sig], _width(layer))
        row, n = _row(layer.unit, g.units), _param_tensors(layer)
        tensors[row] += n
        if layer.tp in ("column", "row", "heads", "vocab"):
            tp_tensors[0, row] += n
        elif layer.tp == "sequence":
            tp_tensors[1, row] += n
    if len(_LAYER_FACTS) > 64:
        _LAYER_FACTS.clear()
    _LAYER_FACTS[id(prof)] = (prof, width, tensors, tp_tensors)
    return width, tensors, tp_tensors


def op_times(prof: GraphProfile, plans: PlanArrays, cluster: Cluster, opt: CostOptions):
    """Per-signature forward and backward seconds (S x N) on one rank, and the share of each
    op a rank does (S x N)."""
    eff = efficiency_for(cluster.chip)
    k_f, busy_f, k_b, busy_b, share = _op_parts(prof, plans, cluster, opt)
    if eff.model_passes_s:
        def unsplit(mb: int):  # one unsplit microbatch of the whole model
            one = PlanArrays.from_plans([Plan.parse(f"mb={mb},gbs={mb},dtype={plans.dtype}")])
            return _op_parts(prof, one, cluster, opt)[:4]
        spread_model_passes(prof, plans, eff.model_passes_s, unsplit, k_f, busy_f, k_b, busy_b)
    tp, cp = plans.tp[None, :], plans.cp[None, :]
    if eff.tp_op_fwd_s or eff.tp_op_bwd_s:  # distributed-tensor weights under TP (and SP)
        split_weights = (prof.tp_split & (prof.params > 0))[:, None]
        on_dtensors = (split_weights | (prof.tp_sequence[:, None] & plans.sp[None, :])) & (tp > 1)
        busy_f, busy_b = busy_f + on_dtensors * eff.tp_op_fwd_s, busy_b + on_dtensors * eff.tp_op_bwd_s
    if eff.cp_step_s:  # ring attention: cp - 1 block exchanges per pass
        steps = (prof.kind == "attention")[:, None] * prof.cp[:, None] * (cp - 1)
        busy_f, busy_b = busy_f + steps * eff.cp_step_s, busy_b + steps * eff.cp_step_s
    return k_f + busy_f, k_b + busy_b, share


def _op_parts(prof: GraphProfile, plans: PlanArrays, cluster: Cluster, opt: CostOptions):
    """Per-signature (S x N) forward kernel and dispatch seconds, backward kernel and
    dispatch seconds, and the share of each op a rank does."""
    eff = efficiency_for(cluster.chip)
    peak = cluster.chip.peak_flops_per_s(plans.dtype)
    mem_bw = cluster.chip.memory_bandwidth_Bps * eff.memory
    tp, cp, mb = plans.tp[None, :], plans.cp[None, :], plans.mb[None, :]
    share = np.where(prof.tp_split[:, None], 1.0 / tp, 1.0)
    share = np.where(prof.tp_sequence[:, None] & plans.sp[None, :], share / tp, share)
    share = np.where(prof.cp[:, None], share / cp, share)
    scale = share * mb
    elem = DTYPE_BYTES[plans.dtype] / 2  # the graph's bytes are for 2-byte elements
    f_flops, b_flops = prof.fwd_flops[:, None] * scale, prof.bwd_flops[:, None] * scale
    f_bytes = prof.rw_bytes[:, None] * scale * elem
    b_bytes = 2 * f_bytes
    if opt.attention == "unfused":  # scores: QK^T write, softmax r/w, dropout r/w + mask, AV read
        scores = prof.score_elements[:, None] * scale
        f_bytes = f_bytes + 13 * scores * elem
        b_bytes = b_bytes + 26 * scores * elem
    e_f, e_b = np.ones_like(f_flops), np.ones_like(b_flops)
    width = layer_facts(prof)[0][:, None]
    busy_f, busy_b = np.zeros((len(prof.kind), 1)), np.zeros((len(prof.kind), 1))
    for kind in set(prof.kind):
        rows = prof.kind == kind
        busy_f[rows], busy_b[rows] = eff.dispatch_s(kind), eff.dispatch_s(kind, backward=True)
        if kind in ("linear", "batched_matmul", "attention", "conv", "lstm"):
            w = np.broadcast_to(width[rows], f_flops[rows].shape)
            e_f[rows] = eff.curve(kind)(f_flops[rows], w)
            e_b[rows] = eff.curve(kind, backward=True)(b_flops[rows], w)
    active = (prof.rw_bytes > 0)[:, None]
    n = len(plans)  # per plan: the model's measured microbatch may scale them per plan
    busy_f, busy_b = np.repeat(busy_f * active, n, axis=1), np.repeat(busy_b * active, n, axis=1)
    counted = prof.counted[:, None]
    k_f = np.where(counted, np.maximum(f_flops / (peak * np.maximum(e_f, 1e-12)), f_bytes / mem_bw),
                   f_bytes / mem_bw)
    k_b = np.where(counted, np.maximum(b_flops / (peak * np.maximum(e_b, 1e-12)), b_bytes / mem_bw),
                   b_bytes / mem_bw)
    if eff.op_kernels_s:
        measured_kernels(prof, plans, share, eff.op_kernels_s, k_f, k_b)
    return k_f, busy_f, k_b, busy_b, share


def evaluate(prof: GraphProfile, plans: PlanArrays, cluster: Cluster,
             opt: CostOptions = CostOptions()) -> dict:
    """Every quantity of the cost model for every plan (arrays of len(plans))."""
    n = len(plans)
    records: list[dict] = []
    t_f, t_b, share = op_times(prof, plans, cluster, opt)
    counts = prof.counts
    full = plans.recompute == RECOMPUTE_FULL
    selective = plans.recompute == RECOMPUTE_SELECTIVE
    is_attention = (prof.kind == "attention")[:, None]
    elem = DTYPE_BYTES[plans.dtype] / 2
    tp = plans.tp

    # Per-signature seconds (S x N); stages sum them with (stage x signature) count matrices.
    compute_sig = t_f + t_b
    rec_sig = np.where(full, t_f, np.where(selective, t_f * is_attention, 0.0))
    gemm_sig = compute_sig * prof.counted[:, None]

    # TP, CP and EP collectives inside each op, on the critical path.
    group_sig = {"tp": 0.0, "cp": 0.0, "ep": 0.0}
    tp_call_s = efficiency_for(cluster.chip).tp_collective_s
    for fam in layer_collectives(prof, plans, opt):
        n_g, s_g = group_of(plans, fam.group)
        calls = fam.fwd_calls + fam.bwd_calls
        t_call = collective_s(fam.kind, fam.bytes, n_g, s_g, cluster)
        if fam.group == "tp" and tp_call_s:
            t_call = t_call + np.where(n_g > 1, tp_call_s, 0.0)
        group_sig[fam.group] = group_sig[fam.group] + calls * t_call
        _record_per_op(records, fam.name, fam.kind, fam.group, n_g, s_g, fam.bytes, calls,
                       counts, prof, plans, cluster)
    tp_sig, cp_sig, ep_sig = group_sig["tp"], group_sig["cp"], group_sig["ep"]
    n_tp, s_tp = group_of(plans, "tp")

    # PP: each microbatch sends its activation forward and its gradient back, per model chunk,
    # with the skip maps the boundary carries: a send per tensor.
    p2p, sends = p2p_bytes(prof, plans, opt), p2p_tensors(prof)
    n_pp, s_pp = plans.group(("pp",))
    t_send = collective_s("send_recv", p2p / sends, np.minimum(n_pp, 2), s_pp, cluster)
    t_p2p = sends * t_send
    if opt.pp_scatter_gather:  # the receiver all-gathers the 1/tp slices over the TP group
        t_p2p = t_p2p + np.where(plans.sp, 0.0, collective_s(
            "all_gather", p2p * tp, n_tp, s_tp, cluster))
    eff = efficiency_for(cluster.chip)
    pp_mb = np.where(plans.pp > 1, 2 * plans.vpp * (t_p2p + eff.pp_action_s), 0.0)
    m = plans.microbatches
    records.append({"name": "PP send/recv (activations, gradients)", "kind": "send_recv",
                    "group": "pp", "group_size": n_pp, "level": comm.span_level(cluster, 2, s_pp),
                    "bytes": p2p / sends,
                    "count_per_step": np.where(plans.pp > 1,
                                               np.round(2 * plans.vpp * m * sends), 0),
                    "bytes_per_step": np.where(plans.pp > 1, 2 * plans.vpp * m * p2p, 0.0),
                    "time_s": t_send})

    p_sig = rank_params(prof, plans)
    attention_sig = compute_sig * is_attention

    out = {name: np.zeros(n) for name in (
        "compute_s", "recompute_s", "tp_comm_s", "cp_comm_s", "ep_comm_s", "pp_comm_s",
        "fsdp_exposed_s", "bubble_s", "stage_time_mb_s", "others_mb_s", "bottleneck_stage",
        "stage_params", "stage_units", "stage_bwd_mb_s", "stage_root_params", "stage_tensors",
        "stage_root_tensors",
        "stage_tp_tensors", "stage_sp_tensors")}
    _, row_tensors, row_tp_tensors = layer_facts(prof)
    pre_params, post_params = counts[0] @ p_sig, counts[-1] @ p_sig  # FSDP roots: N each
    groups = {}
    stage_passes = {}  # (pp, vpp) -> (plan indices, forward share, seconds) per stage
    for (pp, vpp) in {(int(a), int(b)) for a, b in zip(plans.pp, plans.vpp)}:
        idx = np.nonzero((plans.pp == pp) & (plans.vpp == vpp))[0]
        a = prof.stage_matrix(pp, vpp)
        sc, su = a @ counts, a @ prof.unit_counts            # stage x signature
        groups[(pp, vpp)] = (idx, sc, su)
        cols = lambda x: x[:, idx]                            # noqa: E731
        parts = {"compute_s": sc @ cols(compute_sig), "recompute_s": su @ cols(rec_sig),
                 "tp_comm_s": sc @ cols(tp_sig), "cp_comm_s": sc @ cols(cp_sig),
                 "ep_comm_s": sc @ cols(ep_sig)}
        if opt.overlap_tp:  # hidden behind the stage's GEMMs
            parts["tp_comm_s"] = np.maximum(0.0, parts["tp_comm_s"] - sc @ cols(gemm_sig))
        if opt.overlap_cp:  # hidden behind the stage's attention
            parts["cp_comm_s"] = np.maximum(0.0, parts["cp_comm_s"] - sc @ cols(attention_sig))
        in_pipe = in_pipeline_factor(eff, pp)  # compute inside the schedule
        parts["compute_s"], parts["recompute_s"] = (parts["compute_s"] * in_pipe,
                                                    parts["recompute_s"] * in_pipe)
        total = sum(parts.values()) + pp_mb[idx]
        if pp > 1:  # each stage's forward and backward, for the schedule replay
            fwd, bwd = sc @ cols(t_f) * in_pipe, sc @ cols(t_b) * in_pipe + parts["recompute_s"]
            fwd_part = np.where(fwd + bwd > 0, fwd / np.maximum(fwd + bwd, 1e-300), 0.5)
            stage_passes[(pp, vpp)] = (idx, fwd_part, total - pp_mb[idx])
        worst = total.argmax(axis=0)
        pick = lambda x: x[worst, np.arange(len(idx))]        # noqa: E731
        for k, v in parts.items():
            out[k][idx] = pick(v)
        out["pp_comm_s"][idx] = pp_mb[idx]
        out["stage_time_mb_s"][idx] = pick(total)
        out["others_mb_s"][idx] = total.sum(axis=0) - pick(total)  # the other stages' times
        out["bottleneck_stage"][idx] = worst
        out["stage_bwd_mb_s"][idx] = pick(sc @ cols(t_b) * in_pipe)
        stage_params = sc @ cols(p_sig)                      # stage x k
        root = a[:, :1] * pre_params[idx] + a[:, -1:] * post_params[idx]
        big = stage_params.argmax(axis=0)
        out["stage_params"][idx] = stage_params[big, np.arange(len(idx))]
        out["stage_root_params"][idx] = root[big, np.arange(len(idx))]
        out["stage_units"][idx] = a[big, 1:-1].sum(axis=1)
        out["stage_tensors"][idx] = (a @ row_tensors)[big]
        out["stage_root_tensors"][idx] = (a[:, 0] * row_tensors[0]
                                          + a[:, -1] * row_tensors[-1])[big]
        out["stage_tp_tensors"][idx] = (a @ row_tp_tensors[0])[big]
        out["stage_sp_tensors"][idx] = (a @ row_tp_tensors[1])[big]

    _data_parallel(out, plans, cluster, opt, records, elem)
    out["stage_time_mb_s"] += out["fsdp_exposed_s"]
    out["others_mb_s"] += out["fsdp_exposed_s"] * (plans.pp - 1)
    out["bubble_s"] = pipeline_bubble_s(out["others_mb_s"], plans.pp, plans.vpp)
    for idx, fwd_part, stage_s in stage_passes.values():  # run the schedule where it pays
        stage_s = stage_s + out["fsdp_exposed_s"][idx]
        action_s = plans.vpp[idx] * (eff.pp_action_s + t_p2p[idx])  # a pass's sends, receives
        fwd = fwd_part * stage_s + action_s
        bwd = (1 - fwd_part) * stage_s + action_s
        span = replayed_spans_s(fwd, bwd, m[idx], plans.schedule[idx], int(plans.vpp[idx[0]]),
                                eff.rank_contention)
        replayed = ~np.isnan(span)
        i = idx[replayed]
        out["bubble_s"][i] = span[replayed] - out["stage_time_mb_s"][i] * m[i]
    out["microbatch_time_s"] = out["stage_time_mb_s"] * m
    out["step_time_s"] = (out["microbatch_time_s"] + out["bubble_s"] + out["dp_exposed_s"]
                          + out["zero_gather_s"] + out["optimizer_s"])
    _rates(out, prof, plans, cluster)
    out.update(memory_per_stage(prof, plans, cluster, opt, share, groups, p_sig))
    out["records"] = records
    return out


def pipeline_bubble_s(others_mb_s, pp, vpp):
    """Seconds the pipeline adds to the slowest stage's microbatches when every rank has its
    own core or chip; `others_mb_s`: the other stages' seconds per microbatch.

    In a 1F1B schedule the slowest stage waits, once per model chunk, for the other stages'
    forward and backward of one microbatch (their fill and drain): the bubble is the sum of
    the other stages' per-microbatch times over vpp, (pp - 1) / vpp x T when the stages are
    balanced (Narayanan et al. 2021). Ranks that share cores run the schedule instead
    (`pipeline.shared_core_pipeline_s`)."""
    return np.where(np.asarray(pp) > 1, others_mb_s / np.asarray(vpp), 0.0)


def _record_per_op(records, name, kind, group, n, stride, size_sig, passes_sig, counts, prof,
                   plans, cluster):
    """Record a per-op collective family: its largest call, and its calls and bytes per step
    on one rank of a stage (the model's ops over pp stages, times the microbatches)."""
    per_op = size_sig * (passes_sig > 0)
    pick = per_op.argmax(axis=0)
    cols = np.arange(per_op.shape[1])
    layers = counts.sum(axis=0)[:, None]
    ops = (layers * passes_sig).sum(axis=0) / plans.pp
    total = (layers * passes_sig * size_sig).sum(axis=0) / plans.pp
    t = collective_s(kind, per_op[pick, cols], n, stride, cluster)
    active = np.asarray(n) > 1
    records.append({"name": name, "kind": kind, "group": group, "group_size": n,
                    "level": comm.span_level(cluster, n, stride), "bytes": per_op[pick, cols],
                    "count_per_step": np.where(active, np.ceil(ops) * plans.microbatches, 0),
                    "bytes_per_step": np.where(active, total * plans.microbatches, 0.0),
                    "time_s": t})


def _data_parallel(out, plans, cluster, opt, records, elem):
    """Gradient reduction, ZeRO/FSDP gathers and the optimizer step (per step)."""
    eff = efficiency_for(cluster.chip)
    overlap = eff.comm_overlap
    params = out["stage_params"]
    w_bytes = 2 * elem
    grads = params * w_bytes
    # CP shards the weights over the CP ranks too (FSDP over fsdp x cp, torchtitan's and the
    # runner's way), even with fsdp = 1
    sharded = (plans.fsdp > 1) | (plans.zero == 3) | (plans.cp > 1)
    n_dp, s_dp = plans.group(("cp", "fsdp", "dp"))           # every rank holding the same weights
    n_sh, s_sh = np.where(plans.fsdp > 1, plans.group(("cp", "fsdp")), (n_dp, s_dp))
    n_rep, s_rep = plans.group(("dp",))
    alg = opt.dp_algorithm
    plain = ~sharded & (plans.zero == 0)
    units = np.maximum(out["stage_units"], 1)
    root = out["stage_root_params"]
    buckets = np.maximum(1, np.ceil(grads / opt.bucket_bytes))
    t_ar = _collective(records, "DP gradient all-reduce (buckets)", "all_reduce", "dp", n_dp,
                       s_dp, grads, np.where(plain, buckets, 0), cluster, alg,
                       bytes_per_step=np.where(plain, grads, 0))
    rs_calls = np.where(sharded, units + (root > 0), 1)  # FSDP: one per unit and the root
    t_rs = _collective(records, "ZeRO/FSDP gradient reduce-scatter", "reduce_scatter", "fsdp",
                       n_sh, s_sh, grads, np.where(plain, 0, rs_calls), cluster, alg,
                       bytes_per_step=np.where(plain, 0, grads))
    hsdp = sharded & (plans.dp > 1) & (plans.fsdp > 1)
    t_hsdp = _collective(records, "HSDP replica all-reduce of shards", "all_reduce", "dp", n_rep,
                         s_rep, grads / np.maximum(n_sh, 1), np.where(hsdp, 1, 0), cluster, alg)
    if eff.fsdp_reduce_s:  # per unit (its call's latency included: counted once, here)
        t_rs = t_rs - collective_s("reduce_scatter", 0.0, n_sh, s_sh, cluster, alg) \
            + rs_calls * eff.fsdp_reduce_s
    reduce_s = np.where(plain, t_ar, t_rs + np.where(hsdp, t_hsdp, 0.0))
    m = plans.microbatches
    ddp = plain & (n_dp > 1)  # DDP's own costs: per microbatch, per tensor and step, per step
    ddp_s = np.where(ddp, m * eff.ddp_microbatch_s + out["stage_tensors"] * eff.ddp_tensor_s
                     + grads * eff.ddp_byte_s + eff.ddp_step_s, 0.0)
    if opt.overlap_dp:
        last_bucket = reduce_s * np.minimum(1.0, opt.bucket_bytes / np.maximum(grads, 1.0))
        hidden = overlap * np.minimum(reduce_s - last_bucket, out["stage_bwd_mb_s"])
        out["dp_exposed_s"] = reduce_s - hidden + ddp_s
    else:
        out["dp_exposed_s"] = reduce_s + ddp_s
    out["dp_exposed_s"] = out["dp_exposed_s"] + np.where(sharded, eff.fsdp_step_s, 0.0)
    zero12 = ~sharded & (plans.zero > 0)
    t_ag = _collective(records, "ZeRO-1/2 parameter all-gather", "all_gather", "dp", n_dp, s_dp,
                       params * w_bytes, np.where(zero12, 1, 0), cluster, alg)
    out["zero_gather_s"] = np.where(zero12, t_ag, 0.0)
    # FSDP (FSDP2's defaults) gathers the root's weights (embeddings, head: the pre/post
    # layers) once per microbatch and keeps them to the end of its backward; each unit's
    # weights before its forward and again before its backward, prefetching the next unit
    # while this one computes. The first gathers of each pass are exposed, each later one only
    # by what the previous unit's compute does not hide.
    unit_bytes = (params - root) * w_bytes / units
    t_unit = _collective(records, "FSDP parameter all-gather (per unit)", "all_gather", "fsdp",
                         n_sh, s_sh, unit_bytes, np.where(sharded, 2 * units * m, 0), cluster, alg)
    t_root = _collective(records, "FSDP root parameter all-gather", "all_gather", "fsdp", n_sh,
                         s_sh, root * w_bytes, np.where(sharded & (root > 0), m, 0), cluster, alg)
    fwd_unit = (out["compute_s"] - out["stage_bwd_mb_s"]) / units
    bwd_unit = out["stage_bwd_mb_s"] / units
    later = (t_unit - overlap * np.minimum(t_unit, fwd_unit)
             + t_unit - overlap * np.minimum(t_unit, bwd_unit))   # exposed part, units 2..U
    gathers = t_root * (root > 0) + 2 * t_unit + (units - 1) * later
    root_tensors = out["stage_root_tensors"]
    gathered_tensors = 2 * (out["stage_tensors"] - root_tensors) + root_tensors
    gathered_bytes = (2 * params - root) * w_bytes  # the root once, every unit twice
    framework = (eff.fsdp_gather_s * ((root > 0) + 2 * units)    # copy-in/out, hooks
                 + eff.fsdp_tensor_s * gathered_tensors + eff.fsdp_microbatch_s
                 + eff.fsdp_byte_s * gathered_bytes)
    out["fsdp_exposed_s"] = np.where(sharded, gathers + framework, 0.0)
    opt_params = params / np.where(sharded | (plans.zero >= 1), n_sh, 1)
    tensors = out["stage_tensors"]
    dtensors = np.where(sharded, tensors, np.where(
        plans.tp > 1, out["stage_tp_tensors"] + plans.sp * out["stage_sp_tensors"], 0.0))
    out["optimizer_s"] = optimizer_s(opt_params, cluster, opt, tensors - dtensors, dtensors)


def optimizer_s(params_per_rank, cluster: Cluster, opt: CostOptions, tensors_per_rank=0.0,
                dtensors_per_rank=0.0):
    """Seconds of the optimizer update of `params_per_rank` parameters (memory bound), plus
    the chip's fixed cost per parameter tensor (plain and distributed tensors)."""
    eff = efficiency_for(cluster.chip)
    bw = cluster.chip.memory_bandwidth_Bps * eff.memory
    per_param = eff.optimizer_bytes_per_param or OPTIMIZER_STEP_BYTES[opt.optimizer]
    return (params_per_rank * per_param / bw
            + np.asarray(tensors_per_rank) * eff.optimizer_tensor_s
            + np.asarray(dtensors_per_rank) * eff.optimizer_dtensor_s)


def _rates(out, prof, plans, cluster):
    """Throughput, model and hardware FLOPs, MFU and HFU."""
    g = prof.graph
    recompute = np.where(plans.recompute == RECOMPUTE_FULL, float(g.recompute_flops("full")),
                         np.where(plans.recompute == RECOMPUTE_SELECTIVE,
                                  float(g.recompute_flops("selective")), 0.0))
    step = out["step_time_s"]
    n = plans.n_chips
    peak = cluster.chip.peak_flops_per_s(plans.dtype)
    out["model_flops_per_step"] = float(g.model_flops) * plans.gbs.astype(float)
    out["hardware_flops_per_step"] = out["model_flops_per_step"] + recompute * plans.gbs
    out["samples_per_s"] = plans.gbs / step
    out["tokens_per_s"] = out["samples_per_s"] * (g.seq or 1)
    out["model_tflops_per_chip"] = out["model_flops_per_step"] / step / n / 1e12
    out["hardware_tflops_per_chip"] = out["hardware_flops_per_step"] / step / n / 1e12
    out["mfu"] = out["model_flops_per_step"] / (step * n * peak)
    out["hfu"] = out["hardware_flops_per_step"] / (step * n * peak)
