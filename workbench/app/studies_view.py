"""What the Scaling studies page shows, as pure functions of the store and the page's inputs.

The page (`pages/studies.py`) lists the shipped studies (`studies/*.toml`) and the studies in
the store, lets a user edit or write a study TOML, runs it as a background job (progress from
`run_study`'s callback) and draws throughput, MFU and peak memory per rank against chips (or
the study's `[report] x`) with `report_figures`' builders, one line per model or plan. Every
plotted point carries the explorer URL of its model, cluster, chips and plan in `customdata`,
so a click opens it in the plan explorer.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import plotly.graph_objects as go

import workbench

from .. import report, report_figures as rf
from ..study import parse
from ..study_run import format_seconds, run_study
from .urls import explorer_url

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

STUDIES_DIR = Path(workbench.__file__).resolve().parents[1] / "studies"
"""The studies that ship with the project."""
SHIPPED_PREFIX = "shipped:"
"""Dropdown value prefix of a shipped study file (then the file name)."""
STORED_PREFIX = "stored:"
"""Dropdown value prefix of a study in the store (then its name)."""
AUTO = "auto"
"""Series choice meaning: as the study's `[report] series` says (model when it says nothing)."""
SERIES_CHOICES = (("auto", "as the study's [report] says"), ("model", "model"),
                  ("plan_request", "plan as written in the study"),
                  ("plan", "plan as resolved at each point"), ("cluster", "cluster"))
"""(value, label) of the legend groupings the page offers."""
IN_PROCESS_POINTS = 8
"""Studies with at most this many predict/simulate points run inside the background worker
(starting a process pool costs more than it saves); larger ones use a pool of every core."""
EXAMPLE_STUDY = """\
# A small sweep: Llama 3 8B under FSDP, with and without TP=8, on 8 and 16 H100s.
# Edit it (models, chips, plans; see the README's "Studies") and press Run.
[study]
name = "example-sweep"
question = "How do FSDP and TP=8 x FSDP compare for Llama 3 8B on 8 and 16 H100s?"
do = ["predict", "simulate"]

[[models]]
name = "llama3-8b"

[cluster]
preset = "dgx-h100"

[sweep]
chips = [8, 16]
global_batch_per_chip = 2

[plan]
plans = ["fsdp=*,mb=1", "tp=8,fsdp=*,mb=1"]

[report]
series = "plan_request"
"""
"""The study the page's editor starts with (four points, well under a second)."""


@dataclass(frozen=True)
class RunOutcome:
    """What pressing Run did."""

    name: str | None
    """The study's name (None when its text did not parse)."""
    ok: bool
    """Whether the study ran (points may still have failed: see the message)."""
    message: str
    """One line for the page."""


@dataclass
class StudyView:
    """Everything the page draws for one stored study."""

    figures: dict[str, go.Figure]
    """`throughput`, `mfu` and `memory` figures (placeholders when there is nothing yet)."""
    summary: str
    """Heading line: the study, its question and how many points are stored."""
    rows: list[dict[str, str]] = field(default_factory=list)
    """One display row per stored point (`report.summary_table`)."""
    message: str = ""
    """A problem to show (unknown study, bad `[report]` table), else ''."""


# -- choosing a study ---------------------------------------------------------------------

def shipped_studies(studies_dir: Path = STUDIES_DIR) -> list[str]:
    """File names of the shipped studies, sorted."""
    return sorted(p.name for p in Path(studies_dir).glob("*.toml"))


def source_options(store, studies_dir: Path = STUDIES_DIR) -> list[dict[str, str]]:
    """Dropdown options: every study in the store (newest first), then every shipped file."""
    stored = [{"label": f"{s['name']} (stored, {s['n_results']} results)",
               "value": STORED_PREFIX + s["name"]} for s in store.studies()]
    shipped = [{"label": f"{f} (shipped)", "value": SHIPPED_PREFIX + f}
               for f in shipped_studies(studies_dir)]
    return stored + shipped


def newest_study(store) -> str | None:
    """Name of the newest study in the store that has results (None if none has)."""
    return next((s["name"] for s in store.studies() if s["n_results"]), None)


def study_name(text: str) -> str:
    """The `[study] name` of a study's TOML text (ValueError saying what is wrong)."""
    try:
        data = tomllib.loads(text or "")
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"study: not valid TOML ({err})") from None
    name = (data.get("study") or {}).get("name") if isinstance(data.get("study"), dict) else None
    if not isinstance(name, str) or not name:
        raise ValueError("study: [study] name must be a non-empty string")
    return name


def load_source(source: str | None, store, studies_dir: Path = STUDIES_DIR
                ) -> tuple[str, str | None, str]:
    """(TOML text, study name, message) of a dropdown choice: a shipped file's text or a
    stored study's definition. An unknown choice gives the example and a message."""
    if not source:
        return EXAMPLE_STUDY, None, ""
    try:
        if source.startswith(SHIPPED_PREFIX):
            name = source[len(SHIPPED_PREFIX):]
            path = Path(studies_dir) / name
            if Path(name).name != name or not path.is_file():
                raise ValueError(f"study file {name!r} is not among the shipped studies")
            text = path.read_text(encoding="utf-8")
            return text, study_name(text), ""
        if source.startswith(STORED_PREFIX):
            name = source[len(STORED_PREFIX):]
            try:
                return store.study(name)["definition"], name, ""
            except KeyError:
                raise ValueError(f"study {name!r} is not in the store") from None
        raise ValueError(f"choice {source!r} is neither a shipped nor a stored study")
    except ValueError as err:
        return EXAMPLE_STUDY, None, str(err)


# -- running a study ----------------------------------------------------------------------

def progress_text(done: int, total: int, label: str | None, eta_s: float | None) -> str:
    """The line under the progress bar: `3/12 points · ETA 40s · last: <point>`."""
    parts = [f"{done}/{total} points"]
    if eta_s is not None and done < total:
        parts.append(f"ETA {format_seconds(eta_s)}")
    if label:
        parts.append(f"last: {label}")
    return " · ".join(parts)


def run_study_text(text: str, store, progress: Callable[[int, int, str], None] | None = None,
                   jobs: int | None = None) -> RunOutcome:
    """Parse the study `text` and run its pending points into `store`.

    `progress(done, total, line)` is called before the first point and after each stored
    one. `jobs` defaults to 1 for studies of at most `IN_PROCESS_POINTS` predict/simulate
    points (and for every `run` study, whose points run one at a time anyway), else a pool of
    every core. A study that does not parse, or that clashes with a stored study of the same
    name, gives a message; it never raises ValueError.
    """
    try:
        study = parse(text or "", where="study")
    except ValueError as err:
        return RunOutcome(None, False, str(err))
    total = len(study.points)
    if jobs is None and (total <= IN_PROCESS_POINTS or "run" in study.stages):
        jobs = 1
    done_before = len([p for p, kinds in store.study_points(study.name).items()
                       if study.kinds <= kinds])
    if progress is not None:
        progress(min(done_before, total), total, progress_text(min(done_before, total), total,
                                                               None, None))

    def report_progress(done, total_points, point, eta_s):
        if progress is not None:
            progress(done, total_points, progress_text(done, total_points, point.label, eta_s))

    try:
        summary = run_study(study, store, jobs=jobs, progress=report_progress, quiet=True)
    except ValueError as err:
        return RunOutcome(study.name, False, str(err))
    failed = f", {summary.failed} failed" if summary.failed else ""
    skipped = f"; {summary.skipped} were already stored" if summary.skipped else ""
    return RunOutcome(study.name, True,
                      f"{study.name}: {summary.stored} of {summary.total} points run"
                      f"{failed}{skipped} ({format_seconds(summary.seconds)})")


# -- drawing a study ----------------------------------------------------------------------

def placeholder_figure(title: str, x_title: str, y_title: str, note: str) -> go.Figure:
    """An empty figure with a title, labelled axes and a note in the middle."""
    fig = go.Figure()
    fig.update_layout(title=title, template="plotly_white", height=rf.FIGURE_HEIGHT_PX,
                      xaxis={"title": {"text": x_title}, "visible": True},
                      yaxis={"title": {"text": y_title}, "visible": True},
                      annotations=[{"text": note, "showarrow": False, "xref": "paper",
                                    "yref": "paper", "x": 0.5, "y": 0.5}])
    return fig


_FIGURES = (  # key, title prefix, y title, columns tried, scale
    ("throughput", "Throughput", None, ("tokens_per_s", "samples_per_s"), 1.0),
    ("mfu", "MFU", "MFU (% of dense peak)", ("mfu",), 100.0),
    ("memory", "Peak memory per rank", "memory per rank (GB)", ("memory_peak_bytes",),
     1 / rf.BYTES_PER_GB),
)


def point_url(sp: dict) -> str | None:
    """The explorer URL of a study point (None when it has no resolved plan)."""
    if not sp.get("plan") or sp.get("plan") == "search" or not sp.get("model"):
        return None
    return explorer_url(str(sp["model"]), sp.get("overrides") or {}, str(sp["cluster"]),
                        int(sp["chips"]), str(sp["plan"]))


def attach_links(fig: go.Figure, recs: list[dict], x: str, series: str,
                 columns: tuple[str, ...], scale: float) -> go.Figure:
    """Put each plotted point's explorer URL in its trace's `customdata` (None where the
    point has no plan). Points are matched by (series, x, value), as `_metric_figure` drew
    them from the same records with the same arithmetic."""
    index: dict[tuple, str | None] = {}
    for r in recs:
        if r["status"] == "failed":
            continue
        xv = rf.x_value(r["sp"], x)
        for column in columns:
            if r[column] is not None and xv is not None:
                index.setdefault((rf.series_value(r["sp"], series), xv, r[column] * scale),
                                 point_url(r["sp"]))
    for trace in fig.data:
        if trace.legendgroup is None or trace.x is None:
            continue
        trace.customdata = [index.get((trace.legendgroup, xv, yv))
                            for xv, yv in zip(trace.x, trace.y)]
    return fig


def study_view(store, name: str | None, series: str = AUTO) -> StudyView:
    """The figures, heading and point rows of stored study `name` with legend grouping
    `series` (`AUTO`: the study's `[report] series`, else model). Placeholders and a message
    when the study is unknown or has no results yet."""
    def empty(summary: str, message: str = "") -> StudyView:
        return StudyView({key: placeholder_figure(f"{title} versus chips", "chips",
                                                  y or "tokens/s (whole cluster)", summary)
                          for key, title, y, _, _ in _FIGURES}, summary, [], message)

    if not name:
        return empty("No study chosen: pick one, or write one and press Run.")
    try:
        definition = report.study_definition(store, name)
    except ValueError as err:
        return empty(f"Study {name!r} is not in the store yet: press Run.", str(err))
    head = definition.get("study") or {}
    try:
        frame = report.study_frame(store, name)
    except ValueError:
        return empty(f"Study {name}: no results yet.")
    message = ""
    try:
        cfg = report.report_config(definition, frame)
    except ValueError as err:
        cfg, message = report.ReportConfig(), f"{err} (drawn against chips, by model)"
    if series == AUTO:
        series = cfg.series
    x = cfg.x
    recs = rf.records(frame)
    ok = [r for r in recs if r["status"] != "failed"]
    throughput = rf.throughput_figure(frame, x, series)
    mfu = rf.mfu_figure(frame, x, series)
    memory = rf._metric_figure(ok, x, series, "memory_peak_bytes", _FIGURES[2][4],
                               f"Peak memory per rank versus {x}", _FIGURES[2][2], "GB")
    figures = {"throughput": throughput, "mfu": mfu, "memory": memory}
    for key, _, _, columns, scale in _FIGURES:
        attach_links(figures[key], ok, x, series, columns, scale)
    points = frame["point"].dropna().unique()
    failed = int((frame["status"] == "failed").sum())
    question = head.get("question") or "(no question stated)"
    summary = (f"Study {name}: {question} {len(points)} points stored"
               + (f", {failed} failed results" if failed else "")
               + ". Click a point to open it in the plan explorer.")
    rows = report.summary_table(frame).to_dict("records")
    return StudyView(figures, summary, rows, message)


def clicked_url(click_data: dict | None) -> str | None:
    """The explorer URL a graph click carries (None for a point without one)."""
    points = (click_data or {}).get("points") or []
    url = points[0].get("customdata") if points else None
    if isinstance(url, list):  # plotly may wrap scalar customdata
        url = url[0] if url else None
    return url if isinstance(url, str) and url.startswith("/?") else None


def run_token(name: str | None) -> str:
    """The page's `studies-current` value after a run: the name and a fresh stamp, so that
    the figures redraw even when the same study is shown again."""
    return json.dumps({"name": name, "at": time.time()})


def current_name(token: Any) -> str | None:
    """The study name of a `studies-current` value (`run_token`'s JSON or a bare name)."""
    if not token:
        return None
    try:
        value = json.loads(token)
    except (TypeError, ValueError):
        return str(token)
    return value.get("name") if isinstance(value, dict) else str(value)
