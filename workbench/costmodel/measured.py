"""Measured times that replace or correct the op-level prediction (`engine.op_times`).

- `measured_kernels`: kernels timed at their exact op shapes (`calibrate_ops.py`) in place
  of the curves' kernels, where an op runs unsplit and its key matches.
- `spread_model_passes`: one unsplit microbatch of the whole model timed
  (`calibrate_models.py`); the difference from the op-level prediction of the same
  microbatch is spread over the model's ops.
"""
from __future__ import annotations

import numpy as np

from ..calibrate_models import model_key
from ..calibrate_ops import MEASURED_KINDS, op_key
from .plans import PlanArrays
from .profile import GraphProfile


def measured_kernels(prof: GraphProfile, plans: PlanArrays, share, table, k_f, k_b) -> None:
    """Put the kernels measured at their exact shapes (`calibrate_ops`) in place of the
    curves' where an op runs unsplit on the rank and its key is in `table` (in place)."""
    for i, kind in enumerate(prof.kind):
        if kind not in MEASURED_KINDS:
            continue
        whole = share[i] == 1.0
        for mb in np.unique(plans.mb[whole]):
            hit = table.get(op_key(kind, prof.fwd_flops[i] * mb, prof.bwd_flops[i] * mb,
                                   prof.params[i], plans.dtype))
            if hit is not None:
                cols = whole & (plans.mb == mb)
                k_f[i, cols], k_b[i, cols] = hit


def spread_model_passes(prof: GraphProfile, plans: PlanArrays, table, unsplit, k_f, busy_f,
                        k_b, busy_b) -> None:
    """Where one unsplit microbatch of the whole model was timed (`calibrate_models`), spread
    the difference between that and the op-level prediction of the same microbatch over the
    ops of each pass (in place): time under-predicted is added to the dispatch (host work,
    which TP and CP do not divide), time over-predicted comes off the kernels (which they do).
    `unsplit(mb)` gives the (forward kernel, forward dispatch, backward kernel, backward
    dispatch) seconds (S x 1) of one unsplit microbatch of `mb` samples."""
    layers = prof.counts.sum(axis=0)  # layers of each signature in the whole model
    for mb in np.unique(plans.mb):
        hit = table.get(model_key(prof.graph, int(mb), plans.dtype))
        if hit is None:
            continue
        parts = unsplit(int(mb))
        cols = plans.mb == mb
        for measured, k, busy, k1, busy1 in ((hit[0], k_f, busy_f, parts[0], parts[1]),
                                             (hit[1], k_b, busy_b, parts[2], parts[3])):
            kernel_s, dispatch_s = float(layers @ k1[:, 0]), float(layers @ busy1[:, 0])
            missing = measured - kernel_s - dispatch_s
            if missing >= 0 and dispatch_s > 0:
                busy[:, cols] *= 1 + missing / dispatch_s
            elif kernel_s > 0 and kernel_s + missing >= 0:
                k[:, cols] *= 1 + missing / kernel_s
            elif dispatch_s > 0:  # even with no kernel time the prediction is too long
                k[:, cols] = 0.0
                busy[:, cols] *= max(0.0, 1 + (kernel_s + missing) / dispatch_s)
