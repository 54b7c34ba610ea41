"""Hardware telemetry during a run: NVML on NVIDIA GPUs, /proc and RAPL on CPUs.

    sampler, message = make_sampler("cuda", index=0, interval_s=0.1)
    with sampler:
        for step in range(n_steps):
            sampler.mark_step(step)
            train_step()
    samples = sampler.result            # SampleSet
    samples.energy_per_step_j()         # {step: joules} or None without an energy counter
    samples.per_step("power_w")         # {step: mean watts}
    store_rows = samples.to_rows()      # [(t_s, step, metric, value), ...]
"""
from __future__ import annotations

from .base import REDUCTIONS, STEP_END, STEP_START, Sample, Sampler, SampleSet
from .cpu import CpuSampler
from .nvml import GPM_METRICS, NvmlSampler, device_name

__all__ = ["REDUCTIONS", "STEP_END", "STEP_START", "Sample", "Sampler", "SampleSet",
           "CpuSampler", "NvmlSampler", "GPM_METRICS", "device_name", "make_sampler"]


def make_sampler(device: str, index: int = 0, interval_s: float = 0.1) -> tuple[Sampler, str]:
    """The sampler for `device` ("cpu", "cuda" or "cuda:<index>") and a line saying what it
    samples. For CUDA it is an NvmlSampler when NVML initialises and sees GPU `index`;
    otherwise a CpuSampler, and the message says why (this never raises for a missing GPU)."""
    if not isinstance(device, str):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:<index>', got {device!r}")
    kind, colon, rest = device.partition(":")
    if kind == "cuda" and colon:
        if not rest.isdigit():
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:<index>', got {device!r}")
        if index not in (0, int(rest)):
            raise ValueError(f"index ({index}) disagrees with device {device!r}")
        index = int(rest)
    elif kind not in ("cpu", "cuda") or colon:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:<index>', got {device!r}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be a non-negative int, got {index!r}")
    cpu = CpuSampler(interval_s)  # validates interval_s before any NVML call
    if kind == "cpu":
        return cpu, f"CPU sampler (pid {cpu.pid}, every {cpu.interval_s:g} s)"
    try:
        gpu = NvmlSampler(index, interval_s)
    except Exception as e:  # noqa: BLE001 - no driver, no library, no such GPU: use the CPU
        return cpu, (f"NVML unavailable for GPU {index} ({type(e).__name__}: {e}); "
                     f"sampling the CPU of pid {cpu.pid} instead")
    return gpu, f"NVML sampler on GPU {index} ({gpu.device_name}, every {gpu.interval_s:g} s)"
