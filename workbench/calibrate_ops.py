"""Kernels measured at the exact op shapes of studies: `workbench calibrate --ops-for STUDY`.

The efficiency curves (`calibrate.py`) are fitted to a few op shapes per kind (square GEMMs,
3 x 3 convolutions that keep their channels); real models hold strided, transposed, 1 x 1 and
channel-changing convolutions and skinny GEMMs that the curves can miss by 30% or more. With
`--ops-for`, every GEMM-like op (linear, batched matmul, convolution, attention, LSTM) of a
study's points is also built from its layer-graph shape at the point's microbatch and timed
alone on every rank of each calibrated world at once (one op, one module: never the model).

What is stored per op is its **kernel**: the seconds beyond the tiniest op of its kind in the
same harness, forward and backward (`op_kernels_s` of the chip's `efficiency` table, keyed by
`op_key`). That is the part the curves model (they are fitted to the seconds beyond the
smallest size), so the engine (`engine.op_times`) swaps the curve's kernel for the measured
one where the key matches and keeps the per-kind dispatch and the framework terms as they
are. Ops a plan splits (tensor and context parallel shards) and ops of dtypes not measured
keep the curves.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Callable

MEASURED_KINDS = ("linear", "batched_matmul", "conv", "attention", "lstm")
"""Op kinds whose kernels are measured at their shapes (the ones the curves model)."""

MEASURED_DTYPE = "fp32"
"""The dtype the ops are measured in (the runner's CPU dtype)."""

_TINY = {
    "linear": dict(tokens=4, in_features=8, out_features=8),
    "batched_matmul": dict(batch=2, m=4, k=8, n=8, params=True),
    "conv": dict(batch=1, in_channels=4, out_channels=4, kernel=(3, 3), in_spatial=(4, 4),
                 out_spatial=(4, 4)),
    "attention": dict(batch=1, heads=2, q_len=4, kv_len=4, head_dim=8),
    "lstm": dict(batch=1, seq=4, input_size=8, hidden=8),
}
"""The tiniest op of each kind: its seconds are the harness and dispatch, not kernel."""


def op_key(kind: str, fwd_flops: float, bwd_flops: float, params: float,
           dtype: str = MEASURED_DTYPE) -> str:
    """The table key of an op on one rank: the dtype it runs in, its kind, its forward and
    backward FLOPs at its batch and its parameters (which do not grow with the batch)."""
    return f"{dtype}:{kind}:{int(round(fwd_flops))}:{int(round(bwd_flops))}:{int(round(params))}"


def study_ops(paths) -> dict[str, tuple[str, dict]]:
    """key -> (kind, shape) of every measured-kind op that the points of the studies at
    `paths` run unsplit (tensor and context parallel 1), at their microbatch size."""
    from . import costmodel, models
    from .plan import Plan
    from .study import load
    ops: dict[str, tuple[str, dict]] = {}
    seen = set()
    for path in paths:
        for point in load(path).points:
            if point.plan is None:  # "search the best plan": no shapes to time
                continue
            plan = Plan.parse(point.plan)
            if plan.tp > 1 or plan.cp > 1:
                continue
            tag = (point.model, tuple(sorted(point.overrides.items())), plan.microbatch_size)
            if tag in seen:
                continue
            seen.add(tag)
            cfg = models.get(point.model, **point.overrides)
            graph = costmodel.graph(cfg, batch=plan.microbatch_size)
            for layer in graph.layers:
                if layer.kind in MEASURED_KINDS:
                    key = op_key(layer.kind, layer.fwd_flops, layer.bwd_flops, layer.params)
                    ops.setdefault(key, (layer.kind, dict(layer.shape)))
    return ops


def _conv_geometry(k: int, n_in: int, n_out: int, transposed: bool):
    """(stride, padding, output_padding) giving `n_out` from `n_in` with kernel `k`, the
    smallest stride first and `k // 2` padding preferred; None if none does."""
    for stride in range(1, 9):
        pads = sorted(range(k + 1), key=lambda p: abs(p - k // 2))
        if not transposed:  # large paddings (FCN's 100): the one that fits at this stride
            pads.append(max(0, -(-((n_out - 1) * stride + k - n_in) // 2)))
        for pad in pads:
            if transposed:
                extra = n_out - ((n_in - 1) * stride - 2 * pad + k)
                if 0 <= extra < stride:
                    return stride, pad, extra
            elif (n_in + 2 * pad - k) // stride + 1 == n_out and n_in + 2 * pad >= k:
                return stride, pad, 0
    return None


def build_op(kind: str, shape: dict, device: str) -> Callable[[], object] | None:
    """A callable running the op alone (fp32, fresh weights, inputs that need a gradient as
    the layer's do); None for a shape it cannot rebuild."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    torch.manual_seed(0)
    grad_in = shape.get("input_grad", True)
    if kind == "linear":
        m = nn.Linear(shape["in_features"], shape["out_features"],
                      bias=shape.get("bias", True)).to(device)
        x = torch.randn(shape["tokens"], shape["in_features"], device=device,
                        requires_grad=grad_in)
        return lambda: m(x)
    if kind == "batched_matmul":
        b, mm, k, n = shape["batch"], shape["m"], shape["k"], shape["n"]
        x = torch.randn(b, mm, k, device=device, requires_grad=grad_in)
        # a learned right side needs its gradient; with neither, backward would have no work
        w = torch.randn(b, k, n, device=device, requires_grad=bool(shape.get("params")) or
                        not grad_in)
        return lambda: torch.bmm(x, w)
    if kind == "conv":
        kernel, dims = tuple(shape["kernel"]), len(shape["kernel"])
        transposed = shape.get("transposed", False)
        geo = [_conv_geometry(k, i, o, transposed) for k, i, o in
               zip(kernel, shape["in_spatial"], shape["out_spatial"])]
        if None in geo:
            return None
        stride, pad, extra = (tuple(g[i] for g in geo) for i in range(3))
        cls = ([nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d] if transposed
               else [nn.Conv1d, nn.Conv2d, nn.Conv3d])[dims - 1]
        kw = dict(output_padding=extra) if transposed else {}
        m = cls(shape["in_channels"], shape["out_channels"], kernel, stride=stride, padding=pad,
                groups=shape.get("groups", 1), bias=shape.get("bias", True), **kw).to(device)
        x = torch.randn(shape["batch"], shape["in_channels"], *shape["in_spatial"],
                        device=device, requires_grad=grad_in)
        return lambda: m(x)
    if kind == "attention":
        b, h, d = shape["batch"], shape["heads"], shape["head_dim"]
        kvh = shape.get("kv_heads") or h
        q = torch.randn(b, h, shape["q_len"], d, device=device, requires_grad=True)
        kv = [torch.randn(b, kvh, shape["kv_len"], d, device=device, requires_grad=True)
              for _ in range(2)]
        causal = bool(shape.get("causal", False))
        return lambda: F.scaled_dot_product_attention(q, *kv, is_causal=causal,
                                                      enable_gqa=kvh != h)
    if kind == "lstm":
        m = nn.LSTM(shape["input_size"], shape["hidden"], bias=shape.get("bias", True)).to(device)
        x = torch.randn(shape["seq"], shape["batch"], shape["input_size"], device=device,
                        requires_grad=grad_in)
        return lambda: m(x)[0]
    return None


def time_op(op: Callable[[], object], settings) -> tuple[float, float]:
    """(forward, backward) seconds of one op: forward alone, then forward + backward with a
    fixed output gradient, each a median over fixed-duration samples (`time_call`)."""
    from .calibrate import time_call
    grad = op().detach().clone().fill_(1.0)
    fwd = time_call(op, settings)
    both = time_call(lambda: op().backward(grad), settings)
    return fwd, both - fwd


def measure_ops(ops: dict[str, tuple[str, dict]], settings, sync: Callable[[], None],
                log: Callable[[str], None] = print) -> dict[str, list[float]]:
    """key -> [forward, backward] kernel seconds of every op (beyond the tiniest op of its
    kind in the same harness, >= 0). Every rank measures the same ops in the same order."""
    base = {}
    for kind, shape in _TINY.items():
        sync()
        base[kind] = time_op(build_op(kind, shape, settings.device), settings)
    out = {}
    for i, (key, (kind, shape)) in enumerate(sorted(ops.items())):
        op = build_op(kind, shape, settings.device)
        sync()
        if op is None:
            continue
        f, b = time_op(op, settings)
        out[key] = [max(0.0, f - base[kind][0]), max(0.0, b - base[kind][1])]
        if (i + 1) % 50 == 0:
            log(f"    {i + 1} / {len(ops)} ops")
    return out


def seconds_table(d, where: str, key_ok: Callable[[str], bool], key_rule: str
                  ) -> dict[str, tuple[float, float]]:
    """A profile's table of key -> [forward_s, backward_s], checked: every key passes
    `key_ok` (else a ValueError saying it is not `key_rule`), every value is two numbers
    >= 0 (else a ValueError naming the entry)."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{where} must be a table of key -> [forward_s, backward_s]")
    out = {}
    for key, value in d.items():
        if not key_ok(str(key)):
            raise ValueError(f"{where}: key {key!r} is not {key_rule}")
        if (not isinstance(value, (list, tuple)) or len(value) != 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and v >= 0 for v in value)):
            raise ValueError(f"{where}.{key} must be [forward_s, backward_s], two numbers >= 0, "
                             f"got {value!r}")
        out[str(key)] = (float(value[0]), float(value[1]))
    return out


def table_from_dict(d, where: str) -> dict[str, tuple[float, float]]:
    """A profile's `op_kernels_s` table, checked (`seconds_table`): keys `op_key` strings of
    measured kinds."""
    def key_ok(key: str) -> bool:
        parts = key.split(":")
        return len(parts) == 5 and parts[1] in MEASURED_KINDS and all(
            p.isdigit() for p in parts[2:])
    return seconds_table(d, where, key_ok, f"dtype:kind:fwd_flops:bwd_flops:params of a "
                                           f"measured kind ({', '.join(MEASURED_KINDS)})")
