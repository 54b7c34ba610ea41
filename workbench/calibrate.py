"""`workbench calibrate`: measure this device and write a chip and cluster profile file.

What it measures, each figure on every rank of a world of `ranks` concurrent processes (one
torch thread each on a CPU, so that ranks that share cores are measured sharing them; every
sample lasts a fixed wall time, so all ranks stay busy together):

- **Peak**: the FLOP/s of a large square matmul, fp32 and bf16 (the chip's dense peak).
- **Memory bandwidth**: a large copy, read + write bytes over its time.
- **Kernels**: forward and backward seconds of each fitted op kind of the layer graph
  (linear, batched matmul, convolution, attention, LSTM) over a range of sizes, each op timed
  as the slope between chains of 2 and 6 copies (so the backward engine's start and the loss
  are not charged to it). What a size takes beyond the smallest one is its kernel:
  `e(F) = e_max F / (F + F_half)` is fitted to the wide sizes by least squares
  (`fit_curve`), and narrow ones (narrowest GEMM dimension < `WIDE`) give the width term
  (`fit_width`).
- **Dispatch**: the fixed seconds per op kind and pass, fitted (`calibrate_blocks.py`) to
  reference blocks written the way models are (modules in modules, head reshapes, RoPE, residuals)
  beyond their ops' kernels; the kinds no block holds keep their chain's smallest size.
- **Optimizer**: `AdamW(foreach=False)` (the runner's) seconds per parameter tensor and bytes
  moved per parameter.
- **Collectives and framework costs over the backend** (`calibrate_collectives.py`).

`calibrate_collectives.calibrate(...)` returns the profile in the format of
`workbench/data/cpu.json` (`chip` with its measured `efficiency`, `host_level`, `worlds`,
`measurement`), which `hardware.load_cpu_cluster(path=...)`, `hardware.load_cluster` and
`--cluster FILE` read like any preset; `add_command` adds the `calibrate` subcommand.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

DEVICES = ("cpu", "cuda")
"""Devices `calibrate` measures."""


@dataclass(frozen=True)
class Settings:
    """How much to measure (the `--quick` settings are for tests)."""

    device: str = "cpu"
    """`cpu` (gloo, one torch thread per rank) or `cuda` (nccl, one GPU per rank)."""
    worlds: tuple[int, ...] = (2, 4)
    """World sizes (concurrent ranks) to calibrate; each gets its own figures."""
    quick: bool = False
    """Few sizes and repeats: seconds instead of minutes, for tests."""
    repeats: int = 7
    """Timed samples per figure (the median is kept)."""
    min_sample_s: float = 0.02
    """Each sample runs the op often enough to last at least this long."""
    ops_for: tuple[str, ...] = ()
    """Study files whose ops are also measured at their exact shapes (`calibrate_ops.py`)."""

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"calibrate: device must be one of {', '.join(DEVICES)}, "
                             f"got {self.device!r}")
        if not self.worlds or any(not isinstance(w, int) or isinstance(w, bool) or w < 1
                                  for w in self.worlds):
            raise ValueError(f"calibrate: worlds must be integers >= 1, got {self.worlds!r}")
        if not isinstance(self.repeats, int) or self.repeats < 1:
            raise ValueError(f"calibrate: repeats must be an integer >= 1, got {self.repeats!r}")


# ----------------------------------------------------------------------------- fitting

def fit_curve(flops, seconds, peak_flops_per_s: float) -> tuple[float, float]:
    """(e_max, half_flops) of `e(F) = e_max F / (F + half_flops)` fitted to kernel times.

    The curve means `seconds = (F + half_flops) / (peak x e_max)`: a line in F. It is fitted by
    least squares on the relative error (each point weighted by 1 / seconds, so that small
    and large ops count alike); exact when the points lie on such a line. ValueError when
    fewer than two sizes, or when the fitted line has a slope or intercept <= 0.
    """
    f, t = np.asarray(flops, dtype=float), np.asarray(seconds, dtype=float)
    if f.shape != t.shape or f.size < 2 or len(np.unique(f)) < 2:
        raise ValueError("fit_curve: flops and seconds need >= 2 distinct sizes of equal count")
    if (t <= 0).any() or (f <= 0).any():
        raise ValueError("fit_curve: flops and seconds must be > 0")
    w = 1.0 / t
    a = np.stack([f * w, w], axis=1)
    slope, intercept = np.linalg.lstsq(a, np.ones_like(t), rcond=None)[0]
    if slope <= 0:
        raise ValueError(f"fit_curve: fitted seconds per FLOP {slope:g} must be > 0")
    intercept = max(intercept, 0.0)  # a kernel has no negative fixed time
    return float(1.0 / (slope * peak_flops_per_s)), float(intercept / slope)


def nnls(a, y):
    """Least squares with every coefficient >= 0 (active set: drop the most negative)."""
    a, y = np.asarray(a, dtype=float), np.asarray(y, dtype=float)
    free = list(range(a.shape[1]))
    while True:
        coef = np.zeros(a.shape[1])
        if free:
            coef[free] = np.linalg.lstsq(a[:, free], y, rcond=None)[0]
        negative = [i for i in free if coef[i] < 0]
        if not negative:
            return coef
        free.remove(min(negative, key=lambda i: coef[i]))


# ----------------------------------------------------------------------------- timing

def _sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], settings: Settings,
              timed: Callable[[object], float] | None = None) -> float:
    """Median seconds of one `fn()` call over `repeats` samples, each calling it for
    `min_sample_s` of wall time (after one warm-up call). Fixed durations keep every rank of
    a world busy for the same time, so ranks that share cores are measured sharing them.
    With `timed(result)`, a call's seconds are what `timed` returns (the part of it to time)."""
    fn()
    _sync(settings.device)
    samples = []
    for _ in range(settings.repeats):
        start, count, parts = time.perf_counter(), 0, []
        while True:
            out = fn()
            if timed is not None:
                parts.append(timed(out))
            count += 1
            _sync(settings.device)
            if time.perf_counter() - start >= settings.min_sample_s:
                break
        samples.append(statistics.median(parts) if timed is not None
                       else (time.perf_counter() - start) / count)
    return statistics.median(samples)


def chain_times(make: Callable[[int], Callable], settings: Settings,
                lengths: tuple[int, int] = (2, 6)) -> tuple[float, float]:
    """(forward, backward) seconds of ONE op, the slope between chains of `lengths` ops.

    `make(L)` returns `forward`, which runs L ops in a chain and returns the output; backward
    is the time of forward + `output.sum().backward()` less the forward's (both as rates over
    a fixed duration, as `time_call`; the slope removes the sum and the engine's start)."""
    fwd, both = [], []
    for length in lengths:
        forward = make(length)
        fwd.append(time_call(forward, settings))
        both.append(time_call(lambda: forward().sum().backward(), settings))
    n = lengths[1] - lengths[0]
    f = (fwd[1] - fwd[0]) / n
    return f, (both[1] - both[0]) / n - f


# ----------------------------------------------------------------------------- op chains
# Each maker takes a size tuple and returns make(L) for `chain_times`, and the op's cost-model
# arguments (`costmodel.ops`), so that the FLOPs fitted are the ones the cost model charges.

def _module_chain(factory, shape, device, combine=None):
    """make(L) for a chain of L modules from `factory()` applied to a tensor of `shape`
    (`combine(y, module)` instead of `module(y)` when given)."""
    import torch

    def make(length):
        torch.manual_seed(0)
        mods = [factory() for _ in range(length)]
        for m in mods:
            if isinstance(m, torch.nn.Module):
                m.to(device)
        x = torch.randn(*shape, device=device, requires_grad=True)

        def forward():
            y = x
            for m in mods:
                y = combine(y, m) if combine else m(y)
            return y
        return forward
    return make


def _linear(size, device):
    from torch import nn
    m, k = size
    return (_module_chain(lambda: nn.Linear(k, k), (m, k), device),
            ("linear", dict(tokens=m, in_features=k, out_features=k)))


def _batched_matmul(size, device):
    import torch
    e, m, k = size
    return (_module_chain(lambda: torch.randn(e, k, k, device=device, requires_grad=True),
                          (e, m, k), device, lambda y, w: torch.bmm(y, w)),
            ("batched_matmul", dict(batch=e, m=m, k=k, n=k, params=True)))


def _conv(size, device):
    from torch import nn
    b, c, s, dims = size
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    spatial = (s,) * dims
    return (_module_chain(lambda: conv(c, c, 3, padding=1), (b, c, *spatial), device),
            ("conv", dict(batch=b, in_channels=c, out_channels=c, kernel=(3,) * dims,
                          in_spatial=spatial, out_spatial=spatial)))


def _attention(size, device):
    import torch
    import torch.nn.functional as F
    b, h, s, d = size

    def kv():
        return [torch.randn(b, h, s, d, device=device, requires_grad=True) for _ in range(2)]
    return (_module_chain(kv, (b, h, s, d), device,
                          lambda y, t: F.scaled_dot_product_attention(y, t[0], t[1])),
            ("attention", dict(batch=b, heads=h, q_len=s, kv_len=s, head_dim=d)))


def _lstm(size, device):
    from torch import nn
    b, seq, h = size
    return (_module_chain(lambda: nn.LSTM(h, h), (seq, b, h), device, lambda y, m: m(y)[0]),
            ("lstm", dict(batch=b, seq=seq, input_size=h, hidden=h)))


COUNTED_SIZES = {
    # kind: (maker, full sizes, quick sizes); the first size is the dispatch (tiny) one, and
    # sizes narrower than `WIDE` in their narrowest GEMM dimension fit the width term
    "linear": (_linear, [(4, 8), (32, 32), (64, 64), (128, 128), (256, 128), (256, 256),
                         (512, 512), (1024, 512), (2048, 8), (2048, 16), (1024, 24)],
               [(4, 8), (32, 32), (128, 128), (256, 256), (2048, 8)]),
    "batched_matmul": (_batched_matmul, [(2, 4, 8), (4, 32, 32), (4, 64, 64), (8, 128, 128),
                                         (8, 256, 256), (8, 512, 8), (8, 512, 16)],
                       [(2, 4, 8), (4, 32, 32), (8, 128, 128), (8, 512, 8)]),
    "conv": (_conv, [(1, 4, 4, 2), (1, 32, 4, 2), (2, 32, 8, 2), (2, 64, 8, 2), (2, 32, 32, 2),
                     (2, 64, 32, 2), (2, 32, 64, 2), (2, 16, 8, 3), (2, 32, 16, 3),
                     (2, 4, 128, 2), (2, 8, 128, 2), (2, 16, 64, 2), (2, 8, 16, 3)],
             [(1, 4, 4, 2), (2, 32, 32, 2), (2, 32, 16, 3), (2, 8, 64, 2)]),
    "attention": (_attention, [(1, 2, 4, 8), (2, 4, 16, 32), (2, 4, 32, 16), (2, 4, 64, 32),
                               (4, 8, 128, 32),
                               (4, 8, 256, 64), (4, 8, 128, 8), (4, 8, 256, 16)],
                  [(1, 2, 4, 8), (2, 4, 32, 32), (4, 8, 128, 32), (4, 8, 128, 8)]),
    "lstm": (_lstm, [(1, 4, 8), (4, 8, 32), (8, 16, 64), (16, 32, 128), (32, 32, 256),
                     (32, 16, 8), (32, 16, 16)],
             [(1, 4, 8), (4, 8, 32), (16, 32, 128), (32, 16, 8)]),
}
"""Sizes of the fitted op kinds: linear (tokens, width), batched matmul (batch, m, k),
convolution (batch, channels, spatial, 2-D or 3-D), attention (batch, heads, seq, head dim),
LSTM (batch, seq, hidden)."""

WIDE = 32
"""Sizes whose narrowest GEMM dimension is at least this fit the FLOP curve; narrower ones
measure the width term."""


def _dispatch_makers(device) -> dict[str, list]:
    """Per op kind, chains of PyTorch's tiny modules of that kind (the median is kept)."""
    import torch
    from torch import nn
    flat, image = (4, 8), (2, 4, 4, 4)

    def leaf(shape):
        return lambda: torch.randn(*shape, device=device, requires_grad=True)
    idx = torch.randint(0, 16, (4,), device=device)
    return {
        "norm": [_module_chain(lambda: nn.LayerNorm(8), flat, device),
                 _module_chain(lambda: nn.RMSNorm(8), flat, device),
                 _module_chain(lambda: nn.BatchNorm2d(4), image, device),
                 _module_chain(lambda: nn.GroupNorm(2, 4), image, device)],
        "elementwise": [_module_chain(nn.ReLU, flat, device),
                        _module_chain(nn.GELU, flat, device),
                        _module_chain(nn.SiLU, flat, device),
                        _module_chain(leaf(flat), flat, device, lambda y, c: y + c),
                        _module_chain(leaf(flat), flat, device, lambda y, c: y * c)],
        "pool": [_module_chain(lambda: nn.MaxPool2d(3, 1, 1), image, device),
                 _module_chain(lambda: nn.AvgPool2d(3, 1, 1), image, device)],
        "dropout": [_module_chain(lambda: nn.Dropout(0.1), flat, device)],
        "embedding": [_module_chain(lambda: nn.Embedding(16, 8), flat, device,
                                    lambda y, e: y + e(idx))],
    }


def measure_kernels(settings: Settings, log: Callable[[str], None] = print,
                    sync: Callable[[], None] = lambda: None) -> dict:
    """Per op kind: dispatch seconds (forward, backward) and, for the fitted kinds, every
    size's FLOPs and seconds. Keys: `<kind>` -> {`fwd_s`, `bwd_s`, `sizes`: [{flops_fwd,
    flops_bwd, fwd_s, bwd_s}]}."""
    import torch
    from .costmodel.ops import cost
    torch.manual_seed(0)
    out: dict[str, dict] = {}
    for kind, (maker, full, quick) in COUNTED_SIZES.items():
        rows = []
        for size in (quick if settings.quick else full):
            sync()
            make, (op, shape) = maker(size, settings.device)
            f, b = chain_times(make, settings)
            c = cost(op, **shape, dtype_bytes=4)
            rows.append({"size": list(size), "flops_fwd": c.fwd_flops, "flops_bwd": c.bwd_flops,
                         "width": op_width(op, shape), "fwd_s": f, "bwd_s": b})
        out[kind] = {"fwd_s": rows[0]["fwd_s"], "bwd_s": rows[0]["bwd_s"], "sizes": rows}
        log(f"  {kind:15s} dispatch fwd {rows[0]['fwd_s'] * 1e6:7.1f} us  "
            f"bwd {rows[0]['bwd_s'] * 1e6:7.1f} us  ({len(rows)} sizes)")
    for kind, makers in _dispatch_makers(settings.device).items():
        sync()
        times = [chain_times(make, settings) for make in makers]
        f = statistics.median(t[0] for t in times)
        b = statistics.median(t[1] for t in times)
        if kind == "embedding":  # the chain adds each lookup to the running sum: remove the add
            f, b = f - out["elementwise_add"][0], b - out["elementwise_add"][1]
        out[kind] = {"fwd_s": f, "bwd_s": b, "modules": [list(t) for t in times]}
        if kind == "elementwise":
            out["elementwise_add"] = times[3]
        log(f"  {kind:15s} dispatch fwd {f * 1e6:7.1f} us  bwd {b * 1e6:7.1f} us")
    out.pop("elementwise_add")
    return out


def op_width(kind: str, shape: dict) -> float:
    """The narrowest GEMM dimension of an op (`costmodel.engine`'s definition)."""
    from .costmodel.engine import _width
    from .costmodel.graph import make_layer
    return float(_width(make_layer("op", kind, **shape)))


def fit_width(flops, widths, seconds, curve: tuple[float, float], peak: float) -> float:
    """`width_sat` from narrow ops: an op of width w streams its FLOPs at fill = w / width_sat
    of the curve's rate, seconds = F / (peak e_max fill) + half / (peak e_max); the median of
    w / fill over the ops slower than the curve (0 when none is)."""
    e_max, half = curve
    sat = []
    for f, w, t in zip(flops, widths, seconds):
        stream = t - half / (peak * e_max)
        fill = f / (peak * e_max) / stream if stream > 0 else 0.0
        if 0 < fill < 1:
            sat.append(w / fill)
    return float(statistics.median(sat)) if sat else 0.0


def kernel_curves(kernels: dict, peak_flops_per_s: float) -> dict:
    """Fitted curves per fitted kind and pass (`<kind>_fwd`, `<kind>_bwd`: e_max, half_flops,
    width_sat) from `measure_kernels` output: the kernel is what each size takes beyond the
    kind's dispatch (its smallest size); wide sizes fit the FLOP curve, narrow ones the width.
    When noise leaves no positive slope, the curve is the largest size's rate (no F_half)."""
    curves = {}
    for kind in COUNTED_SIZES:
        rows = kernels[kind]["sizes"][1:]
        for pass_ in ("fwd", "bwd"):
            base = kernels[kind][f"{pass_}_s"]
            pts = [(r[f"flops_{pass_}"], r["width"], max(r[f"{pass_}_s"] - base, 1e-9))
                   for r in rows]
            wide = [p for p in pts if p[1] >= WIDE]
            narrow = [p for p in pts if p[1] < WIDE]
            try:
                e_max, half = fit_curve([p[0] for p in wide], [p[2] for p in wide],
                                        peak_flops_per_s)
            except ValueError:  # noise hid the slope: the rate of the largest size, no F_half
                f, _, t = max(wide)
                e_max, half = f / (peak_flops_per_s * t), 0.0
            e_max = min(max(e_max, 1e-3), 2.0)  # a noisy peak cannot make it absurd
            width = fit_width(*zip(*narrow), (e_max, half), peak_flops_per_s) if narrow else 0.0
            curves[f"{kind}_{pass_}"] = {"e_max": e_max, "half_flops": half, "width_sat": width}
    return curves


# ----------------------------------------------------------------------------- chip figures

PEAK_CALL_LIMIT_S = 2.0
"""The longest one matmul call of `measure_peak` may take: a dtype the host does not
accelerate measures at a smaller size (fp32 stays at 2048 even with 2 ranks per core: 0.24 s
alone). One 2048^3 bf16 matmul on one thread took 61 s on a 2-core EPYC without bf16
instructions (fp32: 0.24 s), and at 10 calls per measurement the peak and the host checks
cost a calibration over 30 minutes."""


def peak_size(fn_at, settings: Settings, call_limit_s: float = PEAK_CALL_LIMIT_S) -> int:
    """The matmul size `measure_peak` uses for one dtype: 512 with --quick; otherwise the
    largest of 512, 1024, 2048 whose one call, projected from one call at 512 (n^3 scaling),
    takes under `call_limit_s`. `fn_at(n)` makes the call at size n."""
    if settings.quick:
        return 512
    call = fn_at(512)
    call()
    _sync(settings.device)
    start = time.perf_counter()
    call()
    _sync(settings.device)
    at_512_s = time.perf_counter() - start
    fits = [n for n in (1024, 2048) if at_512_s * (n / 512) ** 3 <= call_limit_s]
    return max(fits, default=512)


def measure_peak(settings: Settings, dtypes: tuple[str, ...] = ("fp32", "bf16"),
                 call_limit_s: float = PEAK_CALL_LIMIT_S) -> dict[str, float]:
    """Dense peak FLOP/s per dtype (`dtypes`, of fp32 and bf16): a large square matmul
    (2 n^3 FLOPs) at `peak_size` under `call_limit_s`, 2048 where the host runs the dtype
    at speed."""
    import torch
    torch_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    out = {}
    for name in dtypes:
        def at(n, dtype=torch_dtypes[name]):
            a = torch.randn(n, n, device=settings.device).to(dtype)
            b = torch.randn(n, n, device=settings.device).to(dtype)
            return lambda: torch.mm(a, b)
        n = peak_size(at, settings, call_limit_s)
        out[name] = 2 * n**3 / time_call(at(n), settings)
    return out


def measure_memory_bandwidth(settings: Settings) -> float:
    """Bytes/s of a large copy (`dst.copy_(src)`), counting the read and the write."""
    import torch
    n = (16 if settings.quick else 128) * 2**20 // 4
    src = torch.randn(n, device=settings.device)
    dst = torch.empty_like(src)
    return 2 * 4 * n / time_call(lambda: dst.copy_(src), settings)


def optimizer_tensor_s(params: list, settings: Settings) -> float:
    """Seconds per parameter tensor of `AdamW(foreach=False).step()` over `params` (which
    have gradients): the step time divided by the tensors (tiny tensors: the bytes are
    negligible)."""
    import torch
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    return time_call(opt.step, settings) / len(params)


def measure_optimizer(settings: Settings) -> dict:
    """AdamW(foreach=False) on this device: `tensor_s` per parameter tensor (32 tensors of 64
    elements: the bytes are negligible) and `bytes_per_param` it moves (4 tensors of 2^18
    elements, less their per-tensor time, at the measured memory bandwidth: `bandwidth_Bps`)."""
    import torch

    def params(count, size):
        ps = [torch.nn.Parameter(torch.randn(size, device=settings.device)) for _ in range(count)]
        for p in ps:
            p.grad = torch.randn_like(p)
        return ps
    tensor_s = optimizer_tensor_s(params(32, 64), settings)
    n = 2**16 if settings.quick else 2**18
    big = optimizer_tensor_s(params(4, n), settings)
    return {"tensor_s": tensor_s, "param_s": max(0.0, big - tensor_s) / n}
