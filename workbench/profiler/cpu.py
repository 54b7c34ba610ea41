"""CPU telemetry from /proc and RAPL: the fallback sampler where there is no NVML device.

Metrics (Linux):
- `cpu_process_pct`: CPU time of the process and its descendants over the last interval, in %
  of one core (as `top` shows it: 200 = two cores busy).
- `cpu_system_pct`: busy share of all cores over the last interval (/proc/stat), 0-100.
- `rss_bytes`: resident memory of the process and its descendants (/proc/<pid>/stat).
- `mem_used_bytes`: system memory in use, MemTotal - MemAvailable (/proc/meminfo).
- `load_avg_1m`: the one-minute load average.
- `energy_j`, `power_w`: package energy since start (sum of the top-level
  /sys/class/powercap/intel-rapl:<n> domains, counter wrap handled) and its rate, when those
  files are readable (since Linux 5.10 they are usually root-only).
Rates need two samples, so they first appear in the second sample.
"""
from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from .base import Reading, Sampler

__all__ = ["CpuSampler", "POWERCAP_DIR"]

POWERCAP_DIR = Path("/sys/class/powercap")
"""Where Linux exposes RAPL energy counters (Documentation/power/powercap/powercap.rst)."""

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat(pid: int) -> tuple[int, int, int]:
    """(parent pid, utime + stime in clock ticks, rss in pages) from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()  # the name (field 2) may hold spaces
    # fields[0] is field 3 (state): ppid is field 4, utime 14, stime 15, rss 24 (proc(5))
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[21])


def _children(pid: int) -> list[int]:
    """Direct children of `pid` from /proc/<pid>/task/*/children, or by scanning /proc."""
    task_dir = Path(f"/proc/{pid}/task")
    files = [d / "children" for d in task_dir.iterdir()]
    if files and files[0].exists():
        kids = []
        for f in files:
            try:
                kids += [int(x) for x in f.read_text().split()]
            except (FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile
                pass
        return kids
    kids = []  # kernels without CONFIG_PROC_CHILDREN
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if _proc_stat(int(d.name))[0] == pid:
                    kids.append(int(d.name))
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
    return kids


def _tree_stats(root: int) -> dict[int, tuple[int, int]]:
    """pid -> (CPU ticks, rss pages) for `root` and all its descendants alive now."""
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        try:
            _, ticks, rss = _proc_stat(pid)
            out[pid] = (ticks, rss)
            todo += [k for k in _children(pid) if k not in out]
        except (FileNotFoundError, ProcessLookupError):
            if pid == root:
                raise
    return out


def _system_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
    total = sum(values[:8])
    return total - values[3] - values[4], total


def _meminfo_used_bytes() -> int:
    """MemTotal - MemAvailable from /proc/meminfo, in bytes."""
    kib = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, value = line.split(":", 1)
            if name in ("MemTotal", "MemAvailable"):
                kib[name] = int(value.split()[0])
    return (kib["MemTotal"] - kib["MemAvailable"]) * 1024


def _rapl_domains(powercap_dir: Path) -> list[Path]:
    """The package-level RAPL domains (intel-rapl:<n>, not their sub-zones) under the dir."""
    if not powercap_dir.is_dir():
        return []
    return sorted(d for d in powercap_dir.iterdir() if re.fullmatch(r"intel-rapl:\d+", d.name))


class _Rate:
    """Turns a cumulative counter into a rate between consecutive calls."""

    def __init__(self) -> None:
        self.prev: tuple[float, float] | None = None

    def __call__(self, t_s: float, count: float) -> float | None:
        """Increase per second since the previous call; None on the first call."""
        prev, self.prev = self.prev, (t_s, count)
        if prev is None or t_s <= prev[0]:
            return None
        return (count - prev[1]) / (t_s - prev[0])


class CpuSampler(Sampler):
    """Samples the CPU, memory and (where readable) RAPL energy of a process tree."""

    source = "cpu"

    def __init__(self, interval_s: float = 0.1, pid: int | None = None, *,
                 powercap_dir: str | Path = POWERCAP_DIR,
                 clock: Callable[[], float] = time.perf_counter):
        """`pid`: root of the process tree to watch (default: this process);
        `powercap_dir`: where to look for RAPL counters."""
        super().__init__(interval_s, clock=clock)
        if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0):
            raise ValueError(f"pid must be a positive int or None, got {pid!r}")
        self.pid = os.getpid() if pid is None else pid
        self.powercap_dir = Path(powercap_dir)
        self._info.update(pid=str(self.pid), cores=str(os.cpu_count()))

    def _open(self) -> None:
        self._readers = {"process": self._read_process, "system_cpu": self._read_system_cpu,
                         "meminfo": self._read_meminfo, "loadavg": self._read_loadavg}
        domains = _rapl_domains(self.powercap_dir)
        if not domains:
            self._unavailable["energy_j"] = f"no RAPL domains under {self.powercap_dir}"
        else:
            self._rapl = [(d / "energy_uj", self._max_range_uj(d)) for d in domains]
            self._rapl_last: list[int] | None = None
            self._rapl_total_uj = 0
            self._power = _Rate()
            self._readers = {"rapl": self._read_rapl, **self._readers}  # energy first
            self._info["energy"] = "RAPL " + " + ".join(d.name for d in domains)
        self._process_last: tuple[float, dict[int, int]] | None = None
        self._system_last: tuple[int, int] | None = None

    @staticmethod
    def _max_range_uj(domain: Path) -> int | None:
        """The wrap-around range of a RAPL counter, None when not published."""
        try:
            return int((domain / "max_energy_range_uj").read_text())
        except (OSError, ValueError):
            return None

    def _read_rapl(self) -> list[Reading]:
        """Energy since start summed over the package domains, and its rate as power."""
        now = [int(path.read_text()) for path, _ in self._rapl]
        if self._rapl_last is not None:
            for (_, range_uj), last, cur in zip(self._rapl, self._rapl_last, now):
                delta = cur - last
                if delta < 0:  # the counter wrapped at its range (unknown range: count 0)
                    delta = delta + range_uj if range_uj else 0
                self._rapl_total_uj += delta
        self._rapl_last = now
        energy_j = self._rapl_total_uj / 1e6
        power_w = self._power(self.now_s(), energy_j)
        return [("energy_j", energy_j)] + ([("power_w", power_w)] if power_w is not None else [])

    def _read_process(self) -> list[Reading]:
        """RSS of the tree now; CPU % of one core since the last sample. A process new
        since the last sample counts all its CPU time; one that ended counts none of its
        last interval."""
        stats = _tree_stats(self.pid)
        t = self.now_s()
        rows: list[Reading] = [("rss_bytes", sum(r for _, r in stats.values()) * _PAGE_BYTES)]
        last, self._process_last = self._process_last, (t, {p: c for p, (c, _) in stats.items()})
        if last is not None and t > last[0]:
            ticks = sum(max(0, c - last[1].get(p, 0)) for p, (c, _) in stats.items())
            rows.append(("cpu_process_pct", 100.0 * ticks / _TICKS_PER_S / (t - last[0])))
        return rows

    def _read_system_cpu(self) -> list[Reading]:
        """Busy share of all cores since the last sample, in %."""
        now = _system_ticks()
        last, self._system_last = self._system_last, now
        if last is None or now[1] <= last[1]:
            return []
        return [("cpu_system_pct", 100.0 * (now[0] - last[0]) / (now[1] - last[1]))]

    def _read_meminfo(self) -> list[Reading]:
        """System memory in use."""
        return [("mem_used_bytes", _meminfo_used_bytes())]

    def _read_loadavg(self) -> list[Reading]:
        """One-minute load average."""
        return [("load_avg_1m", os.getloadavg()[0])]
