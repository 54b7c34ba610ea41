"""The sampler interface: a daemon thread that records hardware telemetry during a run.

A `Sampler` takes one sample at `start()`, one every `interval_s` on its thread, and one at
`stop()`. The training loop calls `mark_step(step)` when step `step` begins (and, optionally,
`mark_end()` when the last one ends; `stop()` does it otherwise). Each sample is a set of
readings `(metric, value)` stamped with one time; the step a reading belongs to is the step in
progress at that time, worked out from the marks when the run stops, so the thread and the
training loop share no state but two append-only lists.

Reading failures never reach the training loop: a reading group that fails at `start()` is
listed in `SampleSet.unavailable` and not read again, one that fails later is counted in
`SampleSet.errors` and read again next time.

Metric names carry their unit: `power_w`, `energy_j` (joules since `start()`), `*_pct`,
`*_bytes`, `*_mhz`, `temperature_c`, `load_avg_1m`.
"""
from __future__ import annotations

import bisect
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

__all__ = ["STEP_START", "STEP_END", "Sample", "SampleSet", "Sampler", "Reading",
           "REDUCTIONS"]

STEP_START = "step_start"
"""`to_rows()` metric of a step mark: at the time the step began, value = the step."""

STEP_END = "step_end"
"""`to_rows()` metric of the end of the last marked step: value = that step."""

Reading = tuple[str, float]
"""One reading of a sample: (metric, value)."""

REDUCTIONS: Mapping[str, Callable[[list[float]], float]] = MappingProxyType({
    "mean": statistics.fmean, "min": min, "max": max, "sum": math.fsum,
    "median": statistics.median, "first": lambda v: v[0], "last": lambda v: v[-1]})
"""The `reduce` choices of `SampleSet.per_step`."""


class Sample(NamedTuple):
    """One reading: what the store keeps (a plain tuple `(t_s, step, metric, value)`)."""

    t_s: float
    """Seconds since the sampler started."""
    step: int | None
    """The step in progress when the sample was taken; None outside the marked steps (before
    the first mark, after the end), as the store's NULL step."""
    metric: str
    """Metric name, unit in the name (`power_w`, `energy_j`, `rss_bytes`, ...)."""
    value: float
    """The reading, in the unit the name says."""


def _interp(ts: list[float], vs: list[float], t: float) -> float | None:
    """`vs` linearly interpolated at `t` over sorted times `ts`; None outside [ts[0], ts[-1]]."""
    if not ts or t < ts[0] or t > ts[-1]:
        return None
    i = bisect.bisect_left(ts, t)
    if ts[i] == t:
        return vs[i]
    t0, t1, v0, v1 = ts[i - 1], ts[i], vs[i - 1], vs[i]
    return v0 + (v1 - v0) * (t - t0) / (t1 - t0)


@dataclass(frozen=True)
class SampleSet:
    """The telemetry of one run: readings with the step each belongs to, and the step marks."""

    source: str
    """What was sampled: "nvml:<device index>" or "cpu"."""
    interval_s: float
    """The sampling period that was asked for."""
    samples: tuple[Sample, ...]
    """All readings, in time order."""
    marks: tuple[tuple[int, float], ...] = ()
    """(step, t_s) at which each marked step began, in order."""
    end_s: float | None = None
    """When the last marked step ended; None when no step was marked."""
    errors: tuple[str, ...] = ()
    """Reading failures during the run, one line per distinct failure with its count."""
    unavailable: Mapping[str, str] = field(default_factory=dict)
    """Metric or reading group -> why it was not recorded (not supported, no permission...)."""
    info: Mapping[str, str] = field(default_factory=dict)
    """Facts about what was sampled (device name, pid, energy source...)."""

    def metrics(self) -> list[str]:
        """The metric names present, sorted."""
        return sorted({s.metric for s in self.samples})

    def series(self, metric: str) -> list[tuple[float, float]]:
        """(t_s, value) of every reading of `metric`, in time order; [] when it is absent."""
        return [(s.t_s, s.value) for s in self.samples if s.metric == metric]

    def steps(self) -> list[int]:
        """The marked steps, in order."""
        return [step for step, _ in self.marks]

    def step_bounds_s(self) -> dict[int, tuple[float, float]]:
        """step -> (start t_s, end t_s) of every marked step (end = next mark or `end_s`;
        without `end_s` the last step has no end and is left out)."""
        ends = [t for _, t in self.marks[1:]] + [self.end_s]
        return {step: (t0, t1) for (step, t0), t1 in zip(self.marks, ends) if t1 is not None}

    def step_durations_s(self) -> dict[int, float]:
        """step -> wall time between its mark and the next mark (or the end), in seconds."""
        return {step: t1 - t0 for step, (t0, t1) in self.step_bounds_s().items()}

    def per_step(self, metric: str, reduce: str = "mean") -> dict[int, float]:
        """step -> `reduce` ("mean", "min", "max", "sum", "median", "first", "last") of the
        readings of `metric` taken during that step. A step shorter than the sampling period
        can have no reading and is then left out."""
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
        by_step: dict[int, list[float]] = {}
        for s in self.samples:
            if s.metric == metric and s.step is not None:
                by_step.setdefault(s.step, []).append(s.value)
        fn = REDUCTIONS[reduce]
        return {step: fn(by_step[step]) for step in self.steps() if step in by_step}

    def energy_per_step_j(self) -> dict[int, float] | None:
        """step -> joules used during the step: the cumulative energy counter (`energy_j`)
        linearly interpolated at the step's start and end, subtracted. None when the device
        has no energy counter; a step outside the sampled time span is left out."""
        energy = self.series("energy_j")
        if not energy:
            return None
        ts, vs = [t for t, _ in energy], [v for _, v in energy]
        out = {}
        for step, (t0, t1) in self.step_bounds_s().items():
            e0, e1 = _interp(ts, vs, t0), _interp(ts, vs, t1)
            if e0 is not None and e1 is not None:
                out[step] = e1 - e0
        return out

    def to_rows(self) -> list[tuple[float, int | None, str, float]]:
        """Plain (t_s, step, metric, value) tuples for the store: the readings, plus a
        `STEP_START` row per mark and a `STEP_END` row, so `from_rows` gives the marks back."""
        rows = [(t, step, STEP_START, float(step)) for step, t in self.marks]
        if self.marks and self.end_s is not None:
            last = self.marks[-1][0]
            rows.append((self.end_s, last, STEP_END, float(last)))
        rows += [tuple(s) for s in self.samples]
        return sorted(rows, key=lambda r: r[0])

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[float, int | None, str, float]], *, source: str,
                  interval_s: float) -> SampleSet:
        """The SampleSet that `to_rows()` wrote (errors, unavailable and info are not rows)."""
        samples, marks, end_s = [], [], None
        for t_s, step, metric, value in sorted(rows, key=lambda r: r[0]):
            if metric == STEP_START:
                marks.append((int(step), float(t_s)))
            elif metric == STEP_END:
                end_s = float(t_s)
            else:
                samples.append(Sample(float(t_s), None if step is None else int(step),
                                      str(metric), float(value)))
        return cls(source=source, interval_s=interval_s, samples=tuple(samples),
                   marks=tuple(marks), end_s=end_s)


def _assign_steps(raw: list[tuple[float, str, float]], marks: list[tuple[int, float]],
                  end_s: float | None) -> tuple[Sample, ...]:
    """Readings (t_s, metric, value) -> Samples with the step whose [mark, next mark or end)
    holds t_s, or None."""
    starts = [t for _, t in marks]
    out = []
    for t_s, metric, value in sorted(raw, key=lambda r: r[0]):
        i = bisect.bisect_right(starts, t_s) - 1
        inside = i >= 0 and (end_s is None or t_s < end_s)
        out.append(Sample(t_s, marks[i][0] if inside else None, metric, value))
    return tuple(out)


class Sampler:
    """Base of the samplers: the thread, the step marks and the error bookkeeping.

    Subclasses fill `_readers` (group name -> function returning readings) in `_open()`,
    which runs in `start()`, and release what they hold in `_close()`. A sampler runs once.
    Use it as a context manager (`with sampler: ...`, then `sampler.result`) or call
    `start()` and `stop()`."""

    source = "none"
    """`SampleSet.source` of what this sampler records."""

    _MAX_ERRORS = 50
    """Distinct failure messages kept; later ones are only counted."""

    def __init__(self, interval_s: float = 0.1, *, clock: Callable[[], float] = time.perf_counter):
        """`interval_s`: sampling period; `clock`: seconds, monotonic (tests pass a fake)."""
        if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)) or not (
                math.isfinite(interval_s) and interval_s > 0):
            raise ValueError(f"interval_s must be a positive number of seconds, got {interval_s!r}")
        self.interval_s = float(interval_s)
        self._clock = clock
        self._readers: dict[str, Callable[[], list[Reading]]] = {}
        self._unavailable: dict[str, str] = {}
        self._info: dict[str, str] = {}
        self._raw: list[tuple[float, str, float]] = []
        self._marks: list[tuple[int, float]] = []
        self._end_s: float | None = None
        self._errors: dict[str, list] = {}  # message -> [count, first t_s]
        self._dropped_errors = 0
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0: float | None = None
        self._result: SampleSet | None = None

    # --------------------------------------------------------------- subclass hooks
    def _open(self) -> None:
        """Acquire the device and fill `self._readers` (runs in `start()`)."""

    def _close(self) -> None:
        """Release what `_open()` acquired (runs in `stop()`, after the last sample)."""

    # --------------------------------------------------------------- public API
    @property
    def running(self) -> bool:
        """True between `start()` and `stop()`."""
        return self._t0 is not None and self._result is None

    @property
    def result(self) -> SampleSet | None:
        """The SampleSet once `stop()` has run, else None."""
        return self._result

    def now_s(self) -> float:
        """Seconds since `start()`, on the sampler's clock."""
        if self._t0 is None:
            raise RuntimeError("the sampler has not been started")
        return self._clock() - self._t0

    def start(self) -> Sampler:
        """Open the device, take the first sample and start the sampling thread."""
        if self._t0 is not None:
            raise RuntimeError("a sampler runs once: start() was already called")
        self._t0 = self._clock()
        try:
            self._open()
        except Exception as e:  # noqa: BLE001 - a broken device must not stop the run
            self._unavailable["device"] = f"{type(e).__name__}: {e}"
            self._readers.clear()
        t = self.now_s()
        for name, read in list(self._readers.items()):  # probe: what fails now is unavailable
            try:
                self._raw.extend((t, m, float(v)) for m, v in read())
            except Exception as e:  # noqa: BLE001
                self._unavailable[name] = f"{type(e).__name__}: {e}"
                del self._readers[name]
        self._thread = threading.Thread(target=self._loop, name=f"{type(self).__name__}",
                                        daemon=True)
        self._thread.start()
        return self

    def mark_step(self, step: int) -> None:
        """Step `step` begins now (and the previous one ends). Steps must increase."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if not self.running:
            raise RuntimeError("mark_step() needs a running sampler: call start() first")
        if self._marks and step <= self._marks[-1][0]:
            raise ValueError(f"step must increase: got {step} after {self._marks[-1][0]}")
        if self._end_s is not None:
            raise RuntimeError("mark_step() after mark_end(): the marked steps are over")
        self._marks.append((step, self.now_s()))

    def mark_end(self) -> None:
        """The step in progress ends now and no other follows (`stop()` does it otherwise)."""
        if not self.running:
            raise RuntimeError("mark_end() needs a running sampler: call start() first")
        if self._marks and self._end_s is None:
            self._end_s = self.now_s()

    def sample_now(self) -> None:
        """Take one sample now, in the calling thread (the sampling thread calls this)."""
        if not self.running:
            raise RuntimeError("sample_now() needs a running sampler")
        self._sample()

    def stop(self) -> SampleSet:
        """End the last step, stop the thread, take a last sample, release the device and
        return the SampleSet (again on later calls)."""
        if self._result is not None:
            return self._result
        if self._t0 is None:
            raise RuntimeError("stop() before start()")
        self.mark_end()
        self._halt.set()
        join_s = max(5.0, 2 * self.interval_s)
        self._thread.join(timeout=join_s)
        stuck = self._thread.is_alive()
        if stuck:  # a reading hangs inside the lock: leave the daemon thread to it
            self._record_error("sampler", f"thread still reading {join_s:g} s after stop()",
                               locked=True)
        else:
            self._sample()
            try:
                self._close()
            except Exception as e:  # noqa: BLE001
                self._record_error("close", f"{type(e).__name__}: {e}")
        errors = [f"{msg} (x{n}, first at t={t:.3f} s)" for msg, (n, t) in self._errors.items()]
        if self._dropped_errors:
            errors.append(f"{self._dropped_errors} more failures not listed")
        self._result = SampleSet(
            source=self.source, interval_s=self.interval_s,
            samples=_assign_steps(list(self._raw), self._marks, self._end_s),
            marks=tuple(self._marks), end_s=self._end_s, errors=tuple(errors),
            unavailable=MappingProxyType(dict(self._unavailable)),
            info=MappingProxyType(dict(self._info)))
        return self._result

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --------------------------------------------------------------- internals
    def _loop(self) -> None:
        """Sample every `interval_s` (on a fixed grid, so slow readings do not drift it)."""
        k = 1
        while True:
            wait_s = self._t0 + k * self.interval_s - self._clock()
            if self._halt.wait(max(0.0, wait_s)):
                return
            try:
                self._sample()
            except BaseException as e:  # noqa: BLE001 - the thread must outlive any reading
                self._record_error("sampler", f"{type(e).__name__}: {e}")
            k = max(k + 1, math.floor((self._clock() - self._t0) / self.interval_s) + 1)

    def _sample(self) -> None:
        """One sample: every reader once, one timestamp (taken before the first reading)."""
        with self._lock:
            t = self.now_s()
            for name, read in list(self._readers.items()):
                try:
                    self._raw.extend((t, m, float(v)) for m, v in read())
                except Exception as e:  # noqa: BLE001
                    self._record_error(name, f"{type(e).__name__}: {e}", t, locked=True)

    def _record_error(self, where: str, message: str, t_s: float | None = None,
                      locked: bool = False) -> None:
        """Count a failure; keep its first time and at most `_MAX_ERRORS` distinct messages."""
        if not locked:
            with self._lock:
                return self._record_error(where, message, t_s, locked=True)
        key = f"{where}: {message}"
        t = t_s if t_s is not None else (self._clock() - self._t0)
        if key in self._errors:
            self._errors[key][0] += 1
        elif len(self._errors) < self._MAX_ERRORS:
            self._errors[key] = [1, t]
        else:
            self._dropped_errors += 1
