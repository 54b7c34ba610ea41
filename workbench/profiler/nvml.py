"""NVIDIA GPU telemetry through NVML (`pynvml`, package nvidia-ml-py).

Metrics, each read by its own NVML call so that one unsupported call loses only its metric:
- `energy_j`: joules since start, from nvmlDeviceGetTotalEnergyConsumption (a millijoule
  counter since the driver loaded; Volta and newer). The per-step energy comes from this.
- `power_w`: nvmlDeviceGetPowerUsage (milliwatts). NB: on recent data-centre GPUs this is an
  average over a window of about a second, so it lags short steps; prefer the energy counter.
- `sm_clock_mhz`, `mem_clock_mhz`: nvmlDeviceGetClockInfo (NVML_CLOCK_SM, NVML_CLOCK_MEM).
- `gpu_util_pct`, `mem_util_pct`: nvmlDeviceGetUtilizationRates (share of time a kernel ran /
  device memory was read or written, over the driver's sample period).
- `mem_used_bytes`: nvmlDeviceGetMemoryInfo().used.
- `temperature_c`: nvmlDeviceGetTemperature(NVML_TEMPERATURE_GPU).
- `gpm_*` (Hopper and newer, where nvmlGpmQueryDeviceSupport says so): GPU performance
  monitoring metrics between consecutive samples (nvmlGpmSampleGet + nvmlGpmMetricsGet), see
  `GPM_METRICS`; a metric the device or the installed pynvml lacks is listed as unavailable.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from .base import Reading, Sampler

try:
    import pynvml
except ImportError:  # pragma: no cover - nvidia-ml-py is a dependency
    pynvml = None

__all__ = ["NvmlSampler", "device_name", "GPM_METRICS"]

_MIB = 2**20

GPM_METRICS: tuple[tuple[str, str, float], ...] = (
    ("gpm_sm_util_pct", "NVML_GPM_METRIC_SM_UTIL", 1.0),
    ("gpm_sm_occupancy_pct", "NVML_GPM_METRIC_SM_OCCUPANCY", 1.0),
    ("gpm_any_tensor_util_pct", "NVML_GPM_METRIC_ANY_TENSOR_UTIL", 1.0),
    ("gpm_hmma_tensor_util_pct", "NVML_GPM_METRIC_HMMA_TENSOR_UTIL", 1.0),
    ("gpm_dram_bw_util_pct", "NVML_GPM_METRIC_DRAM_BW_UTIL", 1.0),
    ("gpm_fp32_util_pct", "NVML_GPM_METRIC_FP32_UTIL", 1.0),
    ("gpm_fp16_util_pct", "NVML_GPM_METRIC_FP16_UTIL", 1.0),
    ("gpm_nvlink_rx_bytes_per_s", "NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC", _MIB),
    ("gpm_nvlink_tx_bytes_per_s", "NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC", _MIB),
    ("gpm_pcie_rx_bytes_per_s", "NVML_GPM_METRIC_PCIE_RX_PER_SEC", _MIB),
    ("gpm_pcie_tx_bytes_per_s", "NVML_GPM_METRIC_PCIE_TX_PER_SEC", _MIB),
)
"""(metric, pynvml constant, factor to the metric's unit). Percentages are 0-100; NVML
reports NVLink and PCIe traffic in MiB/s (pynvml.py comments), converted here to bytes/s."""


def _require_pynvml() -> None:
    """A clear error when the pynvml module is missing."""
    if pynvml is None:
        raise RuntimeError("pynvml is not installed (pip install nvidia-ml-py)")


def _check_index(device_index: int) -> None:
    """ValueError unless `device_index` is a non-negative int."""
    if isinstance(device_index, bool) or not isinstance(device_index, int) or device_index < 0:
        raise ValueError(f"device_index must be a non-negative int, got {device_index!r}")


def _text(name: str | bytes) -> str:
    """NVML strings are bytes in old pynvml versions."""
    return name.decode() if isinstance(name, bytes) else str(name)


def device_name(index: int = 0) -> str:
    """The NVML name of GPU `index` (e.g. "NVIDIA H100 80GB HBM3"), the key of
    `workbench.hardware.chip_for_nvml_name`. RuntimeError when NVML cannot say."""
    _check_index(index)
    _require_pynvml()
    try:
        pynvml.nvmlInit()
    except Exception as e:
        raise RuntimeError(f"NVML did not initialise ({type(e).__name__}: {e})") from e
    try:
        return _text(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(index)))
    except Exception as e:
        raise RuntimeError(f"NVML has no name for GPU {index} ({type(e).__name__}: {e})") from e
    finally:
        pynvml.nvmlShutdown()


class NvmlSampler(Sampler):
    """Samples one NVIDIA GPU through NVML. Initialising NVML happens here, so a machine
    without a driver fails at construction (`make_sampler` then falls back to the CPU)."""

    gpm_min_window_s = 0.05
    """GPM metrics over a shorter window than this are not read."""

    def __init__(self, device_index: int = 0, interval_s: float = 0.1, *,
                 clock: Callable[[], float] = time.perf_counter):
        """Initialise NVML and open GPU `device_index` (NVMLError when that fails)."""
        super().__init__(interval_s, clock=clock)
        _check_index(device_index)
        _require_pynvml()
        self.device_index = device_index
        self.source = f"nvml:{device_index}"
        pynvml.nvmlInit()
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            self.device_name = _text(pynvml.nvmlDeviceGetName(self._handle))
        except Exception:
            pynvml.nvmlShutdown()
            raise
        self._nvml_open = True
        self._info.update(device_index=str(device_index), device_name=self.device_name)
        self._energy0_mj: int | None = None
        self._gpm: list[tuple[str, int, float]] | None = None
        self._gpm_samples: list = []
        self._gpm_t_s = 0.0

    def _open(self) -> None:
        self._readers = {  # energy first: it is the one whose timestamp matters most
            "energy": self._read_energy, "power": self._read_power,
            "sm_clock": self._read_sm_clock, "mem_clock": self._read_mem_clock,
            "utilization": self._read_utilization, "memory": self._read_memory,
            "temperature": self._read_temperature, "gpm": self._read_gpm}

    def _close(self) -> None:
        if not self._nvml_open:
            return
        self._nvml_open = False
        try:
            for s in self._gpm_samples:
                pynvml.nvmlGpmSampleFree(s)
        finally:
            pynvml.nvmlShutdown()

    def _read_energy(self) -> list[Reading]:
        mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        if self._energy0_mj is None:
            self._energy0_mj = mj
        return [("energy_j", (mj - self._energy0_mj) / 1000)]

    def _read_power(self) -> list[Reading]:
        return [("power_w", pynvml.nvmlDeviceGetPowerUsage(self._handle) / 1000)]

    def _read_sm_clock(self) -> list[Reading]:
        return [("sm_clock_mhz", pynvml.nvmlDeviceGetClockInfo(self._handle, pynvml.NVML_CLOCK_SM))]

    def _read_mem_clock(self) -> list[Reading]:
        return [("mem_clock_mhz",
                 pynvml.nvmlDeviceGetClockInfo(self._handle, pynvml.NVML_CLOCK_MEM))]

    def _read_utilization(self) -> list[Reading]:
        u = pynvml.nvmlDeviceGetUtilizationRates(self._handle)
        return [("gpu_util_pct", u.gpu), ("mem_util_pct", u.memory)]

    def _read_memory(self) -> list[Reading]:
        return [("mem_used_bytes", pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)]

    def _read_temperature(self) -> list[Reading]:
        return [("temperature_c",
                 pynvml.nvmlDeviceGetTemperature(self._handle, pynvml.NVML_TEMPERATURE_GPU))]

    def _read_gpm(self) -> list[Reading]:
        """GPM metrics between the previous GPM sample and now. The first call checks support
        and takes the first sample; a call within `gpm_min_window_s` of the previous GPM
        sample (the one in `stop()` can be) reads nothing, as such short windows are noise."""
        if self._gpm is None:
            if not pynvml.nvmlGpmQueryDeviceSupport(self._handle).isSupportedDevice:
                raise RuntimeError("the device does not support GPM (Hopper or newer needed)")
            self._gpm = []
            for metric, const, factor in GPM_METRICS:
                if hasattr(pynvml, const):
                    self._gpm.append((metric, getattr(pynvml, const), factor))
                else:
                    self._unavailable[metric] = f"the installed pynvml has no {const}"
            self._gpm_samples = [pynvml.nvmlGpmSampleAlloc(), pynvml.nvmlGpmSampleAlloc()]
            self._gpm_t_s = self.now_s()
            pynvml.nvmlGpmSampleGet(self._handle, self._gpm_samples[0])
            return []
        t = self.now_s()
        if not self._gpm or t - self._gpm_t_s < self.gpm_min_window_s:
            return []
        prev, cur = self._gpm_samples
        pynvml.nvmlGpmSampleGet(self._handle, cur)
        self._gpm_samples, self._gpm_t_s = [cur, prev], t
        get = pynvml.c_nvmlGpmMetricsGet_t()
        get.version = pynvml.NVML_GPM_METRICS_GET_VERSION
        get.numMetrics = len(self._gpm)
        get.sample1, get.sample2 = prev, cur
        for i, (_, metric_id, _) in enumerate(self._gpm):
            get.metrics[i].metricId = metric_id
        pynvml.nvmlGpmMetricsGet(get)
        rows, kept = [], []
        for i, (metric, metric_id, factor) in enumerate(self._gpm):
            m = get.metrics[i]
            if m.nvmlReturn == pynvml.NVML_SUCCESS:
                rows.append((metric, m.value * factor))
                kept.append((metric, metric_id, factor))
            else:  # this device does not measure it: stop asking
                self._unavailable[metric] = f"nvmlGpmMetricsGet returned {m.nvmlReturn}"
        self._gpm = kept
        return rows
