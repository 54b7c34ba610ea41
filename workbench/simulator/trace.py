"""Timeline events of a simulated (or measured) step, exported as a Chrome trace or a Gantt chart.

The Chrome trace uses the Trace Event Format (Google, "Trace Event Format" document) that
chrome://tracing and ui.perfetto.dev open: complete events (``ph: "X"``) with ``ts``/``dur`` in
microseconds, one process per rank and one thread (lane) per event category, named by metadata
events (``ph: "M"``). Two conventions worth knowing:

- ``pid`` is ``rank + 1``: Perfetto treats pid 0 as the Linux idle task and mis-draws it
  (google/perfetto issue #394, "Please start from pid = 1"). The process *name* keeps the rank.
- Complete events on one thread must nest; events of one category on one rank that partly
  overlap (say a TP all-reduce during a DP bucket reduce) are spread over extra lanes
  ("comm #2", ...) so that no lane holds two partly overlapping events.
"""
from __future__ import annotations

import gzip
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

CATEGORIES = ("compute", "comm", "wait", "optimizer")
"""Event categories, in lane order (compute on top)."""

CATEGORY_COLOURS = {
    "compute": "#4C78A8",
    "comm": "#F58518",
    "wait": "#BAB0AC",
    "optimizer": "#54A24B",
}
"""Bar colour per category in the Gantt chart (Tableau 10 palette)."""

_US_PER_S = 1e6
_MS_PER_S = 1e3


@dataclass(frozen=True)
class TimelineEvent:
    """One interval of activity on one rank."""

    rank: int
    """Simulated rank (or the representative rank of a pipeline stage), >= 0."""
    name: str
    """Display name, e.g. "F mb3 c0", "TP all_reduce", "DP bucket 2"."""
    category: str
    """One of `CATEGORIES`: "compute", "comm", "wait", "optimizer"."""
    start_s: float
    """Start time, seconds from the start of the step."""
    end_s: float
    """End time in seconds, >= start_s."""
    level: str | None = None
    """Hierarchy level a comm event crosses ("node", "rack", "cluster"); None otherwise."""
    args: dict = field(default_factory=dict, hash=False)
    """Extra JSON-serialisable details shown in the trace viewer (bytes, FLOPs, ...); left out
    of the hash so events stay hashable."""

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"timeline event {self.name!r}: rank must be an int >= 0, got {self.rank!r}")
        if self.category not in CATEGORIES:
            raise ValueError(
                f"timeline event {self.name!r}: category must be one of {CATEGORIES}, got {self.category!r}"
            )
        if not (math.isfinite(self.start_s) and math.isfinite(self.end_s)):
            raise ValueError(
                f"timeline event {self.name!r}: start_s and end_s must be finite, "
                f"got {self.start_s!r}, {self.end_s!r}"
            )
        if self.end_s < self.start_s:
            raise ValueError(
                f"timeline event {self.name!r} on rank {self.rank}: end_s ({self.end_s}) must be "
                f">= start_s ({self.start_s})"
            )

    @property
    def duration_s(self) -> float:
        """Length of the interval in seconds."""
        return self.end_s - self.start_s


def _check_process_names(process_names: dict[int, str] | None) -> None:
    for rank, label in (process_names or {}).items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"process_names: keys must be ranks (ints >= 0), got {rank!r}")
        if not isinstance(label, str):
            raise ValueError(f"process_names: value for rank {rank} must be a str, got {label!r}")


def _rank_label(rank: int, process_names: dict[int, str] | None) -> str:
    if process_names and rank in process_names:
        return process_names[rank]
    return f"rank {rank}"


def _assign_lanes(events: Sequence[TimelineEvent]) -> list[int]:
    """Lane index per event so that no two events in one (rank, category, lane) partly overlap.

    Greedy interval partitioning: events sorted by start take the first lane that is free by
    their start (an event may start exactly when the previous one ends).
    """
    lanes = [0] * len(events)
    lane_ends: dict[tuple[int, str], list[float]] = {}
    order = sorted(range(len(events)), key=lambda i: (events[i].start_s, -events[i].end_s))
    for i in order:
        ev = events[i]
        ends = lane_ends.setdefault((ev.rank, ev.category), [])
        for lane, end in enumerate(ends):
            if end <= ev.start_s:
                ends[lane] = ev.end_s
                lanes[i] = lane
                break
        else:
            lanes[i] = len(ends)
            ends.append(ev.end_s)
    return lanes


def _tid(category: str, lane: int) -> int:
    """Thread id of a lane: compute 1, comm 2, wait 3, optimizer 4; extra lanes after them."""
    return 1 + CATEGORIES.index(category) + len(CATEGORIES) * lane


def chrome_trace(
    events: Sequence[TimelineEvent], process_names: dict[int, str] | None = None
) -> dict:
    """Trace Event Format dict for `events` (open the saved JSON in ui.perfetto.dev).

    Metadata events come first (process name and sort index per rank, thread name and sort
    index per lane), then one complete event per timeline event in input order. ``ts`` and
    ``dur`` are microseconds rounded to 1 ns; ``args`` holds the event's `level` (if any) and
    its `args`. `process_names` maps rank to a label (default "rank N").
    """
    _check_process_names(process_names)
    lanes = _assign_lanes(events)
    ranks = sorted({ev.rank for ev in events} | set(process_names or {}))
    used_lanes = sorted({(ev.rank, ev.category, lane) for ev, lane in zip(events, lanes)},
                        key=lambda t: (t[0], CATEGORIES.index(t[1]), t[2]))
    meta: list[dict] = []
    for rank in ranks:
        pid = rank + 1
        meta.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                     "args": {"name": _rank_label(rank, process_names)}})
        meta.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
                     "args": {"sort_index": rank}})
    for rank, category, lane in used_lanes:
        tid = _tid(category, lane)
        label = category if lane == 0 else f"{category} #{lane + 1}"
        meta.append({"name": "thread_name", "ph": "M", "pid": rank + 1, "tid": tid,
                     "args": {"name": label}})
        meta.append({"name": "thread_sort_index", "ph": "M", "pid": rank + 1, "tid": tid,
                     "args": {"sort_index": CATEGORIES.index(category) * 1000 + lane}})
    complete: list[dict] = []
    for ev, lane in zip(events, lanes):
        ts_us = round(ev.start_s * _US_PER_S, 3)
        end_us = round(ev.end_s * _US_PER_S, 3)
        args = dict(ev.args)
        if ev.level is not None:
            args["level"] = ev.level
        complete.append({"name": ev.name, "cat": ev.category, "ph": "X", "ts": ts_us,
                         "dur": round(end_us - ts_us, 3), "pid": ev.rank + 1,
                         "tid": _tid(ev.category, lane), "args": args})
    return {"traceEvents": meta + complete, "displayTimeUnit": "ms"}


def save_chrome_trace(
    events: Sequence[TimelineEvent], path: str | Path, process_names: dict[int, str] | None = None
) -> None:
    """Write `chrome_trace(events, process_names)` as JSON to `path` (gzip if it ends in .gz;
    Perfetto opens both)."""
    text = json.dumps(chrome_trace(events, process_names), separators=(",", ":"))
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def gantt_figure(
    events: Sequence[TimelineEvent], title: str = "", process_names: dict[int, str] | None = None
) -> go.Figure:
    """Plotly Gantt chart: one row per rank (rank 0 on top), one horizontal bar per event.

    One `go.Bar` trace per category present (in `CATEGORIES` order), so ~50,000 events make
    a handful of traces; the categories sit side by side within a rank's row. The x axis is
    milliseconds from the start of the step (numeric, not a date axis); hovering a bar shows
    its name, start, end, duration and level.
    """
    _check_process_names(process_names)
    ranks = sorted({ev.rank for ev in events})
    labels = {rank: _rank_label(rank, process_names) for rank in ranks}
    by_category: dict[str, list[TimelineEvent]] = {}
    for ev in events:
        by_category.setdefault(ev.category, []).append(ev)
    fig = go.Figure()
    for category in CATEGORIES:
        evs = by_category.get(category)
        if not evs:
            continue
        # numpy arrays, not lists: plotly validates lists element by element (~40x slower)
        start_ms = np.array([ev.start_s for ev in evs]) * _MS_PER_S
        end_ms = np.array([ev.end_s for ev in evs]) * _MS_PER_S
        dur_ms = end_ms - start_ms
        custom = np.empty((len(evs), 5), dtype=object)
        custom[:, 0] = [ev.name for ev in evs]
        custom[:, 1], custom[:, 2], custom[:, 3] = start_ms, end_ms, dur_ms
        custom[:, 4] = [ev.level or "-" for ev in evs]
        fig.add_trace(go.Bar(
            name=category,
            orientation="h",
            y=np.array([labels[ev.rank] for ev in evs], dtype=object),
            x=dur_ms,
            base=start_ms,
            marker_color=CATEGORY_COLOURS[category],
            customdata=custom,
            hovertemplate=("%{customdata[0]}<br>%{y}<br>start %{customdata[1]:.3f} ms"
                           "<br>end %{customdata[2]:.3f} ms<br>duration %{customdata[3]:.3f} ms"
                           "<br>level %{customdata[4]}<extra>" + category + "</extra>"),
        ))
    fig.update_layout(
        title=title,
        barmode="group",
        bargap=0.15,
        xaxis={"title": {"text": "time (ms)"}, "type": "linear"},
        yaxis={"title": {"text": "rank"}, "type": "category",
               "categoryorder": "array", "categoryarray": [labels[r] for r in ranks],
               "autorange": "reversed"},
        legend={"title": {"text": "category"}},
    )
    return fig
