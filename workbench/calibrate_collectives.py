"""The measurements of `workbench calibrate` that need a world of ranks.

`run_world(ranks, settings)` starts `ranks` processes (gloo over 127.0.0.1 with one torch
thread each on a CPU, nccl with one GPU each on CUDA), and every rank measures at the same
time as the others, so that ranks sharing cores are measured sharing them:

- the chip figures of `calibrate.py` (peak, memory bandwidth, per-op dispatch and kernels,
  optimizer per tensor);
- collectives (all-reduce, all-gather, reduce-scatter, broadcast, a ring shift of
  send/recv pairs) over a range of sizes: the fixed cost per call, the latency per hop and
  the bandwidth of `comm.py`'s formula are fitted to them (`fit_collectives`);
- how much of a collective hides behind compute (an all-reduce started asynchronously while
  the rank runs matmuls);
- framework costs (`calibrate_framework.py`), each from several sizes of a tiny synthetic
  model so that fixed start-up costs cancel: DDP per microbatch, parameter tensor and step, FSDP2 per unit all-gather and
  reduction, distributed-tensor ops under tensor parallelism, pipeline-schedule actions,
  ring-attention steps, and AdamW on distributed-tensor parameters.

Every rank returns its figures; the parent keeps the median over ranks.
"""
from __future__ import annotations

import datetime
import os
import queue as queue_mod
import statistics
import time
import traceback

import numpy as np

from .calibrate import Settings, measure_kernels, measure_memory_bandwidth, measure_optimizer, \
    PEAK_CALL_LIMIT_S, measure_peak, nnls

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "send_recv")
"""Collectives timed (send_recv: every rank sends to the next and receives from the previous)."""


def _sizes(settings: Settings) -> list[int]:
    """Collective sizes in bytes (multiples of 4 x 8 so every world size divides them)."""
    if settings.quick:
        return [32, 2**18, 2**22]  # wide apart: the bandwidth term stands out of the noise
    return [32, 1024, 2**14, 2**16, 2**18, 2**20, 2**22, 2**24]


def _barrier(device: str) -> None:
    import torch
    import torch.distributed as dist
    if device == "cuda":
        torch.cuda.synchronize()
    dist.barrier()


def _timed(fn, device: str, inner: int, repeats: int) -> float:
    """Median seconds per call of `fn` over `repeats` samples of `inner` calls; every rank
    runs the same count (collectives must match), starting together."""
    import torch
    fn()
    samples = []
    for _ in range(repeats):
        _barrier(device)
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def measure_collectives(settings: Settings) -> list[dict]:
    """Seconds of each collective kind at each size: [{kind, bytes, seconds}]."""
    import torch
    import torch.distributed as dist
    world, rank, dev = dist.get_world_size(), dist.get_rank(), settings.device
    rows = []
    for size in _sizes(settings):
        n = max(size // 4 // world * world, world)
        full = torch.randn(n, device=dev)
        part = torch.randn(n // world, device=dev)
        out_full, out_part = torch.empty_like(full), torch.empty_like(part)
        recv = torch.empty_like(full)
        nxt, prv = (rank + 1) % world, (rank - 1) % world

        def shift():
            ops = [dist.P2POp(dist.isend, full, nxt), dist.P2POp(dist.irecv, recv, prv)]
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        calls = {"all_reduce": lambda: dist.all_reduce(full),
                 "all_gather": lambda: dist.all_gather_into_tensor(out_full, part),
                 "reduce_scatter": lambda: dist.reduce_scatter_tensor(out_part, full),
                 "broadcast": lambda: dist.broadcast(full, 0), "send_recv": shift}
        inner = max(2, min(40, int(2e6 / (size + 2e4))))
        for kind in KINDS:
            t = _timed(calls[kind], dev, inner, max(3, settings.repeats // 2))
            rows.append({"kind": kind, "bytes": 4 * n, "seconds": t})
    return rows


def fit_collectives(rows: list[dict], world: int) -> dict:
    """`call_s`, `latency_s` and `bandwidth_Bps` of `call + hops x latency + wire x bytes /
    bandwidth` (comm.py's ring formula, one call of a framework) fitted by least squares on
    relative errors; a coefficient that would be negative is held at 0 and the rest refitted."""
    from .costmodel import comm
    n = np.array([world])
    x = np.array([[1.0, float(comm.hops(r["kind"], n)[0]),
                   float(comm.wire_factor(r["kind"], n)[0]) * r["bytes"]] for r in rows])
    y = np.array([r["seconds"] for r in rows])
    coef = nnls(x / y[:, None], np.ones_like(y))  # relative errors
    if coef[2] <= 0:
        raise ValueError("fit_collectives: the measured times do not grow with the bytes")
    return {"call_s": float(coef[0]), "latency_s": float(coef[1]),
            "bandwidth_Bps": float(1.0 / coef[2])}


def measure_overlap(settings: Settings) -> float:
    """Fraction of an all-reduce that hides behind concurrent compute: (C + A - T) / min(C, A)
    with C the compute alone, A the all-reduce alone and T both (the all-reduce started
    asynchronously, then the compute, then the wait), clipped to [0, 1]."""
    import torch
    import torch.distributed as dist
    dev = settings.device
    buf = torch.randn((2**18 if settings.quick else 2**20), device=dev)
    a = torch.randn(256, 256, device=dev)

    def compute():
        for _ in range(8 if settings.quick else 24):
            torch.mm(a, a)

    def both():
        work = dist.all_reduce(buf, async_op=True)
        compute()
        work.wait()
    reps = max(3, settings.repeats // 2)
    c = _timed(compute, dev, 3, reps)
    r = _timed(lambda: dist.all_reduce(buf), dev, 3, reps)
    t = _timed(both, dev, 3, reps)
    return float(min(1.0, max(0.0, (c + r - t) / min(c, r))))


FRAMEWORK_REPEATS = 3
"""Independent measurements of the overlap and framework costs, one after the other, of
which `measure_rank` keeps the median of every figure. One measurement each swung between
calibrations an hour apart on the 2-core host (world 2: overlap 0.04-0.52, TP collective
0.38-1.32 ms, FSDP per gathered tensor 0-65 us, pipeline action 0.04-0.52 ms), and a round
of the validation predicted with one such calibration was off by 20% on whole groups."""


def measure_rank(settings: Settings, log) -> dict:
    """Everything one rank measures, every rank at the same time (barriers between parts)."""
    import torch.distributed as dist
    dev = settings.device
    sync = lambda: _barrier(dev)  # noqa: E731
    out = {}
    log("  peak matmul FLOP/s and memory bandwidth")
    sync()
    out["peak_flops_per_s"] = measure_peak(settings)
    sync()
    out["memory_Bps"] = measure_memory_bandwidth(settings)
    sync()
    log("  per-op dispatch and kernels (forward, backward)")
    out["kernels"] = measure_kernels(settings, log, sync)
    log("  reference blocks (dispatch as models pay it)")
    from .calibrate_blocks import measure_blocks
    out["blocks"] = measure_blocks(settings, sync)
    sync()
    out["optimizer"] = measure_optimizer(settings)
    if settings.ops_for:
        from .calibrate_ops import measure_ops, study_ops
        ops = study_ops(settings.ops_for)
        log(f"  {len(ops)} ops of {', '.join(settings.ops_for)} at their shapes")
        out["op_kernels"] = measure_ops(ops, settings, sync, log)
        from .calibrate_models import measure_models, study_models
        table = study_models(settings.ops_for)
        log(f"  {len(table)} models of {', '.join(settings.ops_for)}, one microbatch each")
        out["model_passes"] = measure_models(table, settings, sync, log)
    if dist.get_world_size() == 1:
        return out
    from .calibrate_framework import (measure_cp, measure_ddp, measure_dtensor_optimizer,
                                      measure_fsdp, measure_pp, measure_tp)
    sync()
    out["optimizer_dtensor_s"] = measure_dtensor_optimizer(settings)
    log("  collectives")
    out["collectives"] = measure_collectives(settings)
    repeats = 1 if settings.quick else FRAMEWORK_REPEATS
    rounds = []
    for i in range(repeats):
        log(f"  overlap; FSDP, DDP, tensor-parallel, pipeline and ring-attention framework "
            f"costs ({i + 1}/{repeats})")
        sync()
        rounds.append({"overlap": measure_overlap(settings), "fsdp": measure_fsdp(settings),
                       "ddp": measure_ddp(settings), "tp": measure_tp(settings),
                       "pp": measure_pp(settings), "cp": measure_cp(settings)})
    out.update(merge_ranks(rounds))
    sync()
    return out


def _worker(rank: int, world: int, port: int, settings: Settings, results) -> None:
    import torch
    import torch.distributed as dist
    if settings.device == "cpu":
        torch.set_num_threads(1)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    else:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    try:
        dist.init_process_group("gloo" if settings.device == "cpu" else "nccl",
                                init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=300))
        log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
        results.put((rank, "ok", measure_rank(settings, log)))
    except BaseException as exc:  # report, then leave
        results.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        try:
            results.close()
            results.join_thread()
            if dist.is_initialized():
                dist.destroy_process_group()
        finally:
            os._exit(0)


WORLD_TIMEOUT_S = 5400.0
"""How long one world may measure before the calibration gives it up as hung. 1800 s was too
short for world 4 on a slow spell of the 2-core host (2026-12-06: matmul 53 GFLOP/s, copy 10
GB/s, against 86-103 and 28-31 the day before; with both CPU studies' ops it was still in
its last framework round after 30 minutes)."""


def run_world(ranks: int, settings: Settings, timeout_s: float = WORLD_TIMEOUT_S) -> list[dict]:
    """Run `measure_rank` on `ranks` concurrent processes; every rank's figures, by rank.
    RuntimeError naming the rank when one fails."""
    import torch.multiprocessing as mp
    from .runner.launch import free_port, rank_environment, stop
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, ranks, port, settings, results), daemon=True)
             for r in range(ranks)]
    with rank_environment(settings.device):  # as the runner's ranks start
        for p in procs:
            p.start()
    got: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < ranks:
            try:
                rank, status, payload = results.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"calibrate: rank {dead[0]} of the world of {ranks} "
                                       f"died (exit code {procs[dead[0]].exitcode})") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"calibrate: the world of {ranks} ranks did not finish "
                                       f"in {timeout_s:.0f} s (WORLD_TIMEOUT_S): a hung "
                                       f"collective, or a host too slow for it") from None
                continue
            if status == "error":
                raise RuntimeError(f"calibrate: rank {rank} failed: {payload}")
            got[rank] = payload
    finally:
        stop(procs)
    return [got[r] for r in range(ranks)]


# ----------------------------------------------------------------------------- the profile

def merge_ranks(values: list):
    """Median over ranks (or repeats) of every number in same-shaped results (strings: the
    first one's)."""
    first = values[0]
    if isinstance(first, dict):
        return {k: merge_ranks([v[k] for v in values]) for k in first}
    if isinstance(first, (list, tuple)):
        return [merge_ranks([v[i] for v in values]) for i in range(len(first))]
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return float(statistics.median(values))
    return first


def _comm_model(fit: dict, world: int):
    """Seconds of one collective of `kind` and `size` bytes with the fitted figures."""
    from .costmodel import comm
    n = np.array([world])

    def t(kind: str, size: float) -> float:
        return float(fit["call_s"] + comm.hops(kind, n)[0] * fit["latency_s"]
                     + comm.wire_factor(kind, n)[0] * size / fit["bandwidth_Bps"])
    return t


def world_profile(m: dict, ranks: int, settings: Settings, stamp: str) -> dict:
    """One world's `{ranks, chip, level}` entry of the profile file from its merged figures:
    the chip with its `efficiency` table, the level with the fitted collectives."""
    from .calibrate import kernel_curves
    peak = m["peak_flops_per_s"]
    kernels = m["kernels"]
    curves = kernel_curves(kernels, peak["fp32"])
    dispatch = block_dispatch(m["blocks"], curves, peak["fp32"], m["memory_Bps"])
    fwd = {k: max(0.0, v["fwd_s"]) for k, v in kernels.items()}
    bwd = {k: max(0.0, v["bwd_s"]) for k, v in kernels.items()}
    fwd.update(dispatch["fwd_s"])
    bwd.update(dispatch["bwd_s"])
    who = (f"{ranks} concurrent rank(s), one torch thread each" if settings.device == "cpu"
           else f"{ranks} GPU rank(s)")
    eff = {"source": f"workbench calibrate {stamp}, {who}: per-op dispatch fitted to "
                     f"{len(m['blocks'])} reference blocks written like model code (kinds they do "
                     f"not hold: the op's seconds at the smallest size); curves fitted to the "
                     f"seconds beyond the smallest size (slopes of chains of 2 and 6 ops) over {sum(len(v['sizes']) - 1 for v in kernels.values() if 'sizes' in v)} "
                     f"sizes (fp32); framework costs from tiny synthetic FSDP, TP, PP and ring-"
                     f"attention models (workbench/calibrate_collectives.py)",
           "memory": 1.0, "op_overhead_s": fwd["elementwise"],
           "curves": {k: {n: curves[f"{k}_fwd"][n] for n in ("e_max", "half_flops", "width_sat")}
                      for k in ("linear", "batched_matmul", "attention", "conv", "lstm")},
           "curves_bwd": {k: curves[f"{k}_bwd"]
                          for k in ("linear", "batched_matmul", "attention", "conv", "lstm")},
           "dispatch_fwd_s": fwd, "dispatch_bwd_s": bwd,
           "rank_contention": rank_contention(ranks, settings.device),
           "optimizer_tensor_s": max(0.0, m["optimizer"]["tensor_s"]),
           "optimizer_bytes_per_param": m["optimizer"]["param_s"] * m["memory_Bps"]}
    if m.get("op_kernels"):
        eff["op_kernels_s"] = m["op_kernels"]
    if m.get("model_passes"):
        eff["model_passes_s"] = m["model_passes"]
    level = None
    if ranks > 1:
        fit = fit_collectives(m["collectives"], ranks)
        t = _comm_model(fit, ranks)
        from .calibrate_framework import fsdp_fit
        fsdp, tp, pp, cp = fsdp_fit(m["fsdp"], t), m["tp"], m["pp"], m["cp"]
        eff.update(
            optimizer_dtensor_s=max(0.0, m["optimizer_dtensor_s"]),
            collective_call_s=fit["call_s"], comm_overlap=m["overlap"],
            fsdp_gather_s=fsdp["gather_s"], fsdp_reduce_s=fsdp["reduce_s"],
            fsdp_tensor_s=fsdp["tensor_s"], fsdp_microbatch_s=fsdp["microbatch_s"],
            fsdp_step_s=fsdp["step_s"], fsdp_byte_s=fsdp["byte_s"],
            ddp_microbatch_s=m["ddp"]["microbatch_s"], ddp_tensor_s=m["ddp"]["tensor_s"],
            ddp_step_s=max(0.0, m["ddp"]["step_s"] - t("all_reduce", 0.0)),
            ddp_byte_s=max(0.0, m["ddp"]["byte_s"]
                           - (t("all_reduce", 1.0) - t("all_reduce", 0.0))),
            tp_op_fwd_s=max(0.0, tp["fwd_s"]), tp_op_bwd_s=max(0.0, tp["bwd_s"]),
            tp_collective_s=max(0.0, tp["collective_s"] - t("all_reduce", tp["allreduce_bytes"])),
            pp_action_s=max(0.0, (pp["per_microbatch_s"] - pp["stage_s"]) / 2
                            - t("send_recv", pp["message_bytes"])),
            cp_step_s=max(0.0, (cp["extra_s"] - 2 * t("all_gather", cp["kv_bytes"])
                                - t("reduce_scatter", cp["kv_bytes"])) / (2 * (ranks - 1))))
        backend = "gloo over tcp://127.0.0.1" if settings.device == "cpu" else "nccl"
        level = {"name": "node", "size": ranks, "bandwidth_Bps": fit["bandwidth_Bps"],
                 "latency_s": fit["latency_s"], "oversubscription": 1.0,
                 "source": f"Measured {stamp}: {ranks} processes, torch.distributed {backend}; "
                           f"call + hops x latency + wire factor x bytes / bandwidth (comm.py) "
                           f"fitted by least squares to all-reduce, all-gather, reduce-scatter, "
                           f"broadcast and send/recv times over {len(_sizes(settings))} sizes; "
                           f"the fixed cost per call ({fit['call_s'] * 1e6:.1f} us) is the "
                           f"chip's collective_call_s"}
    chip = _chip_table(peak, m["memory_Bps"], settings, stamp, who)
    chip["efficiency"] = eff
    return {"ranks": ranks, "chip": chip, "level": level}


def rank_contention(ranks: int, device: str) -> float:
    """Ranks per core of this host while `ranks` CPU ranks (one torch thread each) run at once
    (1 when each has a core; GPU ranks each have their own chip)."""
    import os
    if device != "cpu":
        return 1.0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1.0, ranks / max(1, cores or 1))


def block_dispatch(blocks: dict, curves: dict, peak: float, memory_Bps: float) -> dict:
    """`fit_dispatch` of the reference blocks, their kernels timed with the fitted curves."""
    from .calibrate import op_width
    from .calibrate_blocks import fit_dispatch
    from .costmodel.efficiency import Curve
    from .costmodel.ops import cost

    def kernel_s(kind: str, shape: dict, backward: bool) -> float:
        c = cost(kind, **shape, dtype_bytes=4)
        moved = (c.read_bytes + c.write_bytes) * (2 if backward else 1) / memory_Bps
        flops = c.bwd_flops if backward else c.fwd_flops
        if not c.counted or not flops:
            return moved
        curve = Curve(**curves[f"{kind}_{'bwd' if backward else 'fwd'}"])
        return max(flops / (peak * float(curve(flops, op_width(kind, shape)))), moved)
    return fit_dispatch(blocks, kernel_s)


def _chip_table(peak: dict, memory_Bps: float, settings: Settings, stamp: str, who: str) -> dict:
    """The chip table: name, peaks, memory, bandwidth, NVML names, source."""
    import torch
    if settings.device == "cuda":
        from . import hardware
        preset = hardware.chip_for_nvml_name(torch.cuda.get_device_name())
        name, nvml, memory = preset.name, list(preset.nvml_names), \
            torch.cuda.get_device_properties(0).total_memory
    else:
        name, nvml = "cpu", []
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"name": name, "dense_flops_per_s": {k: float(v) for k, v in peak.items()},
            "memory_bytes": int(memory), "memory_bandwidth_Bps": float(memory_Bps),
            "nvml_names": nvml,
            "source": f"Measured {stamp} by workbench calibrate on this host ({_host()}), torch "
                      f"{torch.__version__}, {who}: peak = a {'512' if settings.quick else '2048'}"
                      f"^3 matmul in fp32 and bf16 (2 n^3 FLOPs; smaller where one call "
                      f"would take over {PEAK_CALL_LIMIT_S} s), memory bandwidth = a large copy "
                      f"(read + write), memory_bytes = {'GPU memory' if settings.device == 'cuda' else 'host RAM'}"}


def _host() -> str:
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def calibrate(settings: Settings, log=print) -> dict:
    """Measure every world of `settings` and return the profile file's content: `chip` and
    `host_level` of the one-rank-per-core world (the default cluster), `worlds` (every world
    measured), `measurement` (when, where, the raw figures, and `host_check`: the host's speed
    on a reference before and after, `calibrate_drift.py`, with a logged warning when it
    moved)."""
    import torch
    from .calibrate_drift import drift_warning, host_drift, measure_host
    stamp = utc_stamp()
    raw, own = {}, host_ranks(settings.device)
    before = measure_host(settings)
    for ranks in sorted(set(settings.worlds) | ({own} if own > 1 else set())):
        log(f"world of {ranks} rank(s) on {settings.device}:")
        raw[str(ranks)] = merge_ranks(run_world(ranks, settings))
    drift = host_drift(before, measure_host(settings))
    warning = drift_warning(drift)
    if warning:
        log(warning)
    return profile_from_raw(raw, settings, stamp, {
        "host": _host(), "torch": torch.__version__, "load_average": list(os.getloadavg()),
        "host_check": drift})


def utc_stamp() -> str:
    """Now in UTC as a profile's `measured_at` writes it (2026-12-05T03:50:54Z)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def host_ranks(device: str) -> int:
    """Ranks that give each one its own core (CPU) or GPU (CUDA): the host's default world."""
    import torch
    return torch.cuda.device_count() if device == "cuda" else (os.cpu_count() or 1)


def profile_from_raw(raw: dict[str, dict], settings: Settings, stamp: str,
                     measurement: dict, host_world: int | None = None) -> dict:
    """The profile file's content fitted from `raw` (world size as text -> that world's
    figures, median over ranks): `chip` and `host_level` of the host's default world
    (`host_world` ranks; default: this machine's `host_ranks`, else the largest world),
    `worlds`, and `measurement` (`measurement`'s entries, the stamp, the raw figures)."""
    import platform
    entries = [world_profile(raw[w], int(w), settings, stamp)
               for w in sorted(raw, key=int)]
    cores = host_world or host_ranks(settings.device)
    host = next((e for e in entries if e["ranks"] == cores), entries[-1])
    if host["level"] is None:
        raise ValueError("calibrate: the host world needs >= 2 ranks (no collectives measured)")
    return {"chip": host["chip"], "host_level": host["level"],
            "worlds": [e for e in entries if e["level"] is not None],
            "measurement": {"measured_at": stamp, "python": platform.python_version(),
                            "device": settings.device, "quick": settings.quick,
                            **measurement, "raw": raw}}
