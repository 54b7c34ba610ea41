"""Start the ranks of a job: local processes (tests, `workbench run --nproc N`) or torchrun.

Every collective has a bounded timeout (`timeout_s`); a rank that raises reports its
traceback and the job ends with a `RunError` naming the rank; a rank that dies without a
word (killed, crashed) is detected by its exit code and ends the job the same way. Nothing
already stored is touched.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import queue as queue_mod
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .train import RunSpec, run_rank


CPU_MALLOC_TUNABLES = ("glibc.malloc.mmap_threshold=33554432:"
                       "glibc.malloc.trim_threshold=17179869184")
"""glibc malloc settings a CPU rank starts with (`GLIBC_TUNABLES`): blocks up to 32 MiB (the
largest mmap threshold glibc allows on 64-bit) come from the heap, and freed memory stays in
the process (16 GiB trim threshold) instead of going back to the kernel. With glibc's defaults
a fresh rank returns its activations to the kernel after every pass and takes page faults on
the next: FCN-tiny's microbatch took 47-53 ms in fresh processes against 37-38 ms with these
settings (2 ranks, 2 cores). CPU trainers use a caching allocator (jemalloc, tcmalloc) for the
same reason; CUDA has one built in. A `GLIBC_TUNABLES` already set is left alone."""


@contextlib.contextmanager
def rank_environment(device: str):
    """The environment rank processes start with (spawned inside this context): on a CPU,
    `CPU_MALLOC_TUNABLES` unless the user set `GLIBC_TUNABLES`. The runner's ranks and the
    calibration's start the same way, so the calibration measures the regime the runs have."""
    if device != "cpu" or "GLIBC_TUNABLES" in os.environ:
        yield
        return
    os.environ["GLIBC_TUNABLES"] = CPU_MALLOC_TUNABLES
    try:
        yield
    finally:
        del os.environ["GLIBC_TUNABLES"]


class RunError(RuntimeError):
    """A rank failed; `rank` and `detail` say which and why."""

    def __init__(self, rank: int | None, detail: str):
        super().__init__(f"rank {rank} failed: {detail}" if rank is not None else detail)
        self.rank, self.detail = rank, detail


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, spec: RunSpec, results, timeout_s: float,
            fault: dict | None) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    device = (spec[0] if isinstance(spec, list) else spec).device
    backend = "nccl" if device == "cuda" else "gloo"
    try:
        if device == "cuda":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        if fault and fault.get("rank") == rank:
            if fault.get("kind") == "kill":
                os._exit(9)
            if fault.get("kind") == "hang":
                time.sleep(10 * timeout_s)
        specs = spec if isinstance(spec, list) else [spec]
        outs = [run_rank(s) for s in specs]  # several runs share one process group
        results.put((rank, "ok", outs if isinstance(spec, list) else outs[0]))
    except BaseException as exc:  # report everything, then leave
        results.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        try:
            results.close()
            results.join_thread()  # flush the result before the hard exit below
            if dist.is_initialized():
                dist.destroy_process_group()
        finally:
            os._exit(0)  # avoids rare aborts in interpreter teardown (see the CPU notes)


def _raise_root_cause(procs, got, rank: int, payload: str) -> None:
    """A rank reported an error. If another rank died without a word (killed, crashed), that
    death is the cause and the reported error its consequence: name the dead rank."""
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        dead = [r for r, p in enumerate(procs)
                if p.exitcode not in (None, 0) and r not in got and r != rank]
        if dead:
            first_line = payload.splitlines()[0] if payload else ""
            raise RunError(dead[0], f"process exited with code {procs[dead[0]].exitcode} "
                                    f"(killed or crashed); rank {rank} then failed: {first_line}")
        time.sleep(0.1)
    raise RunError(rank, payload)


def launch(spec: RunSpec | list[RunSpec], nproc: int, timeout_s: float = 120.0,
           fault: dict | None = None) -> list:
    """Run `spec` on `nproc` local processes; every rank's result, by rank. A list of specs
    runs one after the other in the same processes (start-up dominates tiny runs), and each
    rank's result is then the list of its runs' results.

    `fault` injects a failure for tests: {"rank": r, "kind": "kill" | "hang"}.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, nproc, port, spec, results, timeout_s, fault),
                         daemon=True) for r in range(nproc)]
    device = (spec[0] if isinstance(spec, list) else spec).device
    with rank_environment(device):
        for p in procs:
            p.start()
    got: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s * 3 + 60
    try:
        while len(got) < nproc:
            try:
                rank, status, payload = results.get(timeout=0.5)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in got]
                if dead:  # give a rank that just exited a moment to deliver its report
                    try:
                        rank, status, payload = results.get(timeout=2.0)
                    except queue_mod.Empty:
                        raise RunError(dead[0], f"process exited with code "
                                                f"{procs[dead[0]].exitcode} before reporting "
                                                f"(killed or crashed)") from None
                    if status == "error":
                        _raise_root_cause(procs, got, rank, payload)
                    got[rank] = payload
                    continue
                if time.monotonic() > deadline:
                    raise RunError(None, f"job did not finish within {timeout_s * 3 + 60:.0f} s")
                continue
            if status == "error":
                _raise_root_cause(procs, got, rank, payload)
            got[rank] = payload
    finally:
        stop(procs)
    return [got[r] for r in range(nproc)]


def stop(procs) -> None:
    """Join each process (5 s grace), killing the ones still alive."""
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
