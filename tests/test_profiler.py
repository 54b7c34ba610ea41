"""Profiler samplers: CPU sampling of a busy loop, the NVML sampler against a fake pynvml with
exact numbers, the CUDA -> CPU fallback, SampleSet arithmetic, and a real GPU (gpu marker)."""
import hashlib
import time
from types import SimpleNamespace

import pytest

from workbench.profiler import (STEP_END, STEP_START, CpuSampler, NvmlSampler, Sample,
                                SampleSet, make_sampler)
from workbench.profiler import nvml as nvml_mod


class FakeClock:
    """A clock the test sets by hand."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _busy(seconds):
    """Keep a core busy for `seconds` of wall time the way training does: in native code that
    releases the GIL (hashing 1 MiB blocks), so the sampler thread is not starved of the GIL
    as it can be behind a pure-Python spin loop when other threads of the test process run."""
    block, end = b"x" * 2**20, time.perf_counter() + seconds
    while time.perf_counter() < end:
        hashlib.sha256(block).digest()


# ------------------------------------------------------------------------------ CPU sampler

def test_cpu_sampler_busy_loop_per_step():
    with CpuSampler(interval_s=0.02) as s:
        for step in range(3):
            s.mark_step(step)
            _busy(0.2)
    r = s.result
    assert r.source == "cpu" and r.errors == ()
    assert {"cpu_process_pct", "cpu_system_pct", "rss_bytes", "mem_used_bytes",
            "load_avg_1m"} <= set(r.metrics())
    assert r.steps() == [0, 1, 2]
    # every reading belongs to the step whose [mark, next mark or end) holds its time
    bounds = r.step_bounds_s()
    for smp in r.samples:
        if smp.step is None:
            assert smp.t_s < bounds[0][0] or smp.t_s >= r.end_s
        else:
            assert bounds[smp.step][0] <= smp.t_s < bounds[smp.step][1]
    # 0.2 s per step at 0.02 s per sample: readings in every step; the loop keeps a core busy
    cpu = r.per_step("cpu_process_pct")
    assert sorted(cpu) == [0, 1, 2] and all(v > 0 for v in cpu.values())
    rss = r.per_step("rss_bytes", reduce="max")
    assert all(v > 10 * 2**20 for v in rss.values())  # python + torch: well over 10 MiB
    assert all(d >= 0.2 for d in r.step_durations_s().values())
    # no RAPL on a machine without powercap: energy is absent, not zero
    if "energy_j" not in r.metrics():
        assert r.energy_per_step_j() is None and "energy_j" in r.unavailable


def test_cpu_sampler_stops_promptly_and_rejects_misuse():
    s = CpuSampler(interval_s=3600)  # the thread would sleep an hour unless woken
    with pytest.raises(RuntimeError, match="start"):
        s.mark_step(0)
    s.start()
    s.mark_step(0)
    with pytest.raises(ValueError, match="step must increase"):
        s.mark_step(0)
    with pytest.raises(ValueError, match="non-negative int"):
        s.mark_step(-3)
    r = s.stop()
    assert not s._thread.is_alive() and r.errors == ()
    assert s.stop() is r  # stop() is idempotent
    with pytest.raises(RuntimeError, match="runs once"):
        s.start()
    with pytest.raises(ValueError, match="interval_s"):
        CpuSampler(interval_s=0)
    with pytest.raises(ValueError, match="pid"):
        CpuSampler(pid=-1)


def test_cpu_sampler_rapl_energy_with_wraparound(tmp_path):
    for name, uj in (("intel-rapl:0", 900_000_000), ("intel-rapl:1", 5_000_000)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "energy_uj").write_text(f"{uj}\n")
        (tmp_path / name / "max_energy_range_uj").write_text("1000000000\n")
    (tmp_path / "intel-rapl:0:0").mkdir()  # a sub-zone (core): inside package 0, not added
    (tmp_path / "intel-rapl:0:0" / "energy_uj").write_text("123\n")
    clock = FakeClock()
    s = CpuSampler(interval_s=3600, powercap_dir=tmp_path, clock=clock).start()
    clock.t = 2.0
    s.mark_step(0)
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("950000000\n")   # +50 J
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("15000000\n")    # +10 J
    s.sample_now()
    clock.t = 4.0
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("30000000\n")    # wrapped: +80 J
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("35000000\n")    # +20 J
    r = s.stop()
    # package 0 wrapped: 30e6 - 950e6 + 1e9 range = 80e6 uJ; total at t=4: 60 + 100 = 160 J
    assert r.series("energy_j") == [(0.0, 0.0), (2.0, 60.0), (4.0, 160.0)]
    # power between samples: 60 J / 2 s = 30 W, then 100 J / 2 s = 50 W
    assert r.series("power_w") == [(2.0, 30.0), (4.0, 50.0)]
    assert r.energy_per_step_j() == {0: 100.0}  # E(4) - E(2) = 160 - 60
    assert r.info["energy"] == "RAPL intel-rapl:0 + intel-rapl:1"


# ------------------------------------------------------------------------------ NVML sampler

class FakeNVMLError(Exception):
    """Stands in for pynvml.NVMLError."""


def _fake_pynvml(clock, *, energy=True, gpm=True, init_fails=False):
    """A pynvml look-alike whose readings are scripted by the fake clock's time."""
    energy_mj = {0.0: 10_000_000, 1.0: 10_100_000, 2.0: 10_300_000, 3.0: 10_600_000,
                 4.0: 11_000_000}
    power_mw = {0.0: 100_000, 1.0: 200_000, 2.0: 300_000, 3.0: 400_000, 4.0: 500_000}
    calls = {"init": 0, "shutdown": 0, "free": 0}
    nv = SimpleNamespace(NVMLError=FakeNVMLError, NVML_SUCCESS=0, NVML_CLOCK_SM=1,
                         NVML_CLOCK_MEM=2, NVML_TEMPERATURE_GPU=0, calls=calls,
                         NVML_GPM_METRICS_GET_VERSION=1, NVML_GPM_METRIC_SM_UTIL=2,
                         NVML_GPM_METRIC_ANY_TENSOR_UTIL=5, NVML_GPM_METRIC_HMMA_TENSOR_UTIL=7,
                         NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC=60)  # the rest: absent

    def init():
        if init_fails:
            raise FakeNVMLError("NVML Shared Library Not Found")
        calls["init"] += 1

    def unsupported(*_):
        raise FakeNVMLError("Not Supported")

    def temperature(handle, sensor):
        if clock.t >= 3.0:
            raise FakeNVMLError("GPU is lost")
        return 65

    def metrics_get(get):
        values = {2: 75.0, 5: 50.0, 60: 1024.0}  # SM util %, tensor util %, NVLink rx MiB/s
        for m in get.metrics[:get.numMetrics]:
            m.nvmlReturn, m.value = (0, values[m.metricId]) if m.metricId in values else (3, 0.0)

    nv.nvmlInit = init
    nv.nvmlShutdown = lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1)
    nv.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
    nv.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3"  # bytes, as old pynvml
    nv.nvmlDeviceGetTotalEnergyConsumption = (
        (lambda h: energy_mj[clock.t]) if energy else unsupported)
    nv.nvmlDeviceGetPowerUsage = lambda h: power_mw[clock.t]
    nv.nvmlDeviceGetClockInfo = lambda h, kind: {1: 1980, 2: 2619}[kind]
    nv.nvmlDeviceGetUtilizationRates = unsupported
    nv.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(used=42 * 2**30)
    nv.nvmlDeviceGetTemperature = temperature
    nv.nvmlGpmQueryDeviceSupport = lambda h: SimpleNamespace(isSupportedDevice=int(gpm))
    nv.nvmlGpmSampleAlloc = lambda: SimpleNamespace(t=None)
    nv.nvmlGpmSampleGet = lambda h, smp: setattr(smp, "t", clock.t)
    nv.nvmlGpmSampleFree = lambda smp: calls.__setitem__("free", calls["free"] + 1)
    nv.c_nvmlGpmMetricsGet_t = lambda: SimpleNamespace(
        metrics=[SimpleNamespace(metricId=0, nvmlReturn=0, value=0.0) for _ in range(32)])
    nv.nvmlGpmMetricsGet = metrics_get
    return nv


def test_nvml_sampler_with_fake_pynvml_exact_energy(monkeypatch):
    clock = FakeClock()
    fake = _fake_pynvml(clock)
    monkeypatch.setattr(nvml_mod, "pynvml", fake)
    s = NvmlSampler(0, interval_s=3600, clock=clock)  # the thread stays asleep: we sample
    assert s.device_name == "NVIDIA H100 80GB HBM3"
    s.start()                 # t=0: first sample
    clock.t = 1.0
    s.mark_step(0)
    s.sample_now()            # t=1, step 0
    clock.t = 2.0
    s.sample_now()            # t=2, step 0
    clock.t = 2.5
    s.mark_step(1)            # no sample at 2.5
    clock.t = 3.0
    s.sample_now()            # t=3, step 1
    clock.t = 4.0
    r = s.stop()              # step 1 ends at t=4; last sample at t=4 (outside the steps)
    assert r.source == "nvml:0" and r.info["device_name"] == "NVIDIA H100 80GB HBM3"
    assert r.marks == ((0, 1.0), (1, 2.5)) and r.end_s == 4.0
    # energy since start: (mJ - 10_000_000) / 1000 -> 0, 100, 300, 600, 1000 J
    assert r.series("energy_j") == [(0.0, 0.0), (1.0, 100.0), (2.0, 300.0), (3.0, 600.0),
                                    (4.0, 1000.0)]
    # step 0: E(2.5) - E(1) = (300 + (600 - 300) * 0.5) - 100 = 350 J
    # step 1: E(4) - E(2.5) = 1000 - 450 = 550 J
    assert r.energy_per_step_j() == {0: 350.0, 1: 550.0}
    # power mW / 1000; step 0 holds t=1, 2 -> (200 + 300) / 2 = 250 W; step 1 holds t=3 -> 400 W
    assert r.per_step("power_w") == {0: 250.0, 1: 400.0}
    assert r.per_step("power_w", reduce="max") == {0: 300.0, 1: 400.0}
    assert [smp.step for smp in r.samples if smp.metric == "power_w"] == [None, 0, 0, 1, None]
    assert r.per_step("sm_clock_mhz") == {0: 1980.0, 1: 1980.0}
    assert r.per_step("mem_clock_mhz") == {0: 2619.0, 1: 2619.0}
    assert r.per_step("mem_used_bytes") == {0: 42 * 2**30, 1: 42 * 2**30}
    # GPM: windows (0,1], (1,2], (2,3], (3,4]; NVLink 1024 MiB/s = 1024 * 2**20 bytes/s
    assert r.series("gpm_sm_util_pct") == [(1.0, 75.0), (2.0, 75.0), (3.0, 75.0), (4.0, 75.0)]
    assert r.per_step("gpm_any_tensor_util_pct") == {0: 50.0, 1: 50.0}
    assert r.per_step("gpm_nvlink_rx_bytes_per_s") == {0: 2**30, 1: 2**30}
    # what the device or pynvml lacks is unavailable, not an error
    assert "gpm_hmma_tensor_util_pct" in r.unavailable  # the device returned NOT_SUPPORTED
    assert "no NVML_GPM_METRIC_DRAM_BW_UTIL" in r.unavailable["gpm_dram_bw_util_pct"]
    assert "Not Supported" in r.unavailable["utilization"]
    assert "gpu_util_pct" not in r.metrics()
    # temperature failed at t=3 and t=4: counted once, the run went on
    assert r.series("temperature_c") == [(0.0, 65.0), (1.0, 65.0), (2.0, 65.0)]
    assert r.errors == ("temperature: FakeNVMLError: GPU is lost (x2, first at t=3.000 s)",)
    # NVML shut down once, both GPM samples freed
    assert fake.calls == {"init": 1, "shutdown": 1, "free": 2}


def test_nvml_sampler_without_energy_counter_or_gpm(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(nvml_mod, "pynvml", _fake_pynvml(clock, energy=False, gpm=False))
    s = NvmlSampler(0, interval_s=3600, clock=clock).start()
    clock.t = 1.0
    s.mark_step(0)
    clock.t = 2.0
    r = s.stop()
    assert r.energy_per_step_j() is None
    assert "Not Supported" in r.unavailable["energy"]
    assert "does not support GPM" in r.unavailable["gpm"]
    assert r.series("power_w") == [(0.0, 100.0), (2.0, 300.0)]


def test_sampleset_rows_round_trip_and_reduce():
    r = SampleSet(source="cpu", interval_s=0.5, samples=(
        Sample(0.0, None, "power_w", 10.0), Sample(1.0, 0, "power_w", 20.0),
        Sample(1.5, 0, "power_w", 40.0), Sample(2.5, 1, "power_w", 30.0)),
        marks=((0, 1.0), (1, 2.0)), end_s=3.0)
    rows = r.to_rows()
    assert (1.0, 0, STEP_START, 0.0) in rows and (3.0, 1, STEP_END, 1.0) in rows
    assert all(isinstance(row, tuple) and len(row) == 4 for row in rows)
    back = SampleSet.from_rows(rows, source="cpu", interval_s=0.5)
    assert back.samples == r.samples and back.marks == r.marks and back.end_s == 3.0
    assert r.per_step("power_w", "sum") == {0: 60.0, 1: 30.0}  # 20 + 40; 30
    assert r.per_step("power_w", "first") == {0: 20.0, 1: 30.0}
    assert r.step_durations_s() == {0: 1.0, 1: 1.0}
    with pytest.raises(ValueError, match="reduce must be one of"):
        r.per_step("power_w", "p99")
    # rows without a STEP_END: the last step has no end, so no duration and no energy
    open_ended = SampleSet.from_rows([row for row in rows if row[2] != STEP_END],
                                     source="cpu", interval_s=0.5)
    assert open_ended.end_s is None and open_ended.step_durations_s() == {0: 1.0}


# ------------------------------------------------------------------------------ make_sampler

def test_make_sampler_cuda_falls_back_to_cpu_with_a_message(monkeypatch):
    monkeypatch.setattr(nvml_mod, "pynvml", _fake_pynvml(FakeClock(), init_fails=True))
    sampler, message = make_sampler("cuda", index=1, interval_s=0.05)
    assert isinstance(sampler, CpuSampler) and sampler.interval_s == 0.05
    assert "NVML unavailable for GPU 1" in message and "Library Not Found" in message


def test_make_sampler_on_this_machine():
    sampler, message = make_sampler("cuda")
    try:
        import pynvml
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except pynvml.NVMLError:  # the CPU machine: NVMLError_LibraryNotFound
        assert isinstance(sampler, CpuSampler) and "NVMLError_LibraryNotFound" in message
    else:
        assert isinstance(sampler, NvmlSampler) and "NVML sampler on GPU 0" in message
        sampler.start().stop()  # releases NVML
    cpu, message = make_sampler("cpu")
    assert isinstance(cpu, CpuSampler) and message.startswith("CPU sampler")


def test_make_sampler_rejects_bad_devices():
    with pytest.raises(ValueError, match="device must be"):
        make_sampler("tpu")
    with pytest.raises(ValueError, match="device must be"):
        make_sampler("cuda:x")
    with pytest.raises(ValueError, match="disagrees"):
        make_sampler("cuda:1", index=2)
    with pytest.raises(ValueError, match="interval_s"):
        make_sampler("cuda", interval_s=-1)


# ------------------------------------------------------------------------------ real GPU

@pytest.mark.gpu
def test_nvml_sampler_on_a_real_gpu():
    import torch

    from workbench.hardware import chip_for_nvml_name
    from workbench.profiler import device_name

    name = device_name(0)
    chip_for_nvml_name(name)  # the runner's MFU lookup must know this device
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    sampler, message = make_sampler("cuda", interval_s=0.05)
    assert isinstance(sampler, NvmlSampler), message
    with sampler:
        for step in range(4):
            sampler.mark_step(step)
            for _ in range(1000):  # 2 * 4096**3 FLOP = 137 GFLOP each: ~0.2-0.3 s a step
                a @ a
            torch.cuda.synchronize()
    r = sampler.result
    print(message, r.metrics(), dict(r.unavailable), r.errors)
    print("energy per step J", r.energy_per_step_j(), "mean W", r.per_step("power_w"))
    assert r.errors == ()
    assert all(v > 0 for _, v in r.series("power_w"))
    assert all(v > 0 for _, v in r.series("sm_clock_mhz"))
    assert max(v for _, v in r.series("mem_used_bytes")) > 4096 * 4096 * 2
    energy = r.energy_per_step_j()
    assert energy is not None and sorted(energy) == [0, 1, 2, 3]
    assert sum(energy.values()) > 0
