"""Study reports: one self-contained HTML page, or every stored field as CSV or Parquet.

`workbench report STUDY --format html|csv|parquet --out PATH`. The HTML page states the
study's question, draws its figures (throughput and MFU against chips or another axis, memory
breakdowns against chip memory, predicted against measured with the y = x line and ±10% / ±20%
bands, timelines of chosen points) and its tables; plotly.js is inlined once, so the file
opens with no network. CSV and Parquet hold one row per stored result: every column of the
store, the payload as JSON text, and the payload flattened (`study_point.<field>` for the study
point, `payload.<key>.<key>` for the rest; lists stay JSON text).

The study definition's optional `[report]` table (top level, or `[study.report]`) chooses
`x` (chips, global_batch, seq, or a model config field such as `experts`), `series` (model,
plan, cluster, any study point field, or an override or variant key) and `timelines` (point
keys whose timeline to draw; default: the first simulated point).
"""
from __future__ import annotations

import argparse
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from . import report_figures as rf
from .store import Store, default_path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

FORMATS = ("html", "csv", "parquet")
"""Report formats `write_report` writes."""
REPORT_KEYS = ("x", "series", "timelines")
"""Keys the `[report]` table of a study definition may hold."""


@dataclass(frozen=True)
class ReportConfig:
    """How a study's report draws it (the study definition's optional `[report]` table)."""

    x: str = "chips"
    """x axis of the throughput and MFU figures: chips, global_batch, seq, or a model config
    field (an override such as `experts`)."""
    series: str = "model"
    """Legend grouping: model, plan, cluster, any study point field, or an override or
    variant key."""
    timelines: tuple[str, ...] | None = None
    """Point keys whose re-simulated timeline to draw; None = the first simulated point."""


def study_definition(store: Store, name: str) -> dict[str, Any]:
    """The parsed TOML definition of study `name`; ValueError naming the stored studies when
    there is none of that name."""
    try:
        text = store.study(name)["definition"]
    except KeyError:
        known = [s["name"] for s in store.studies()]
        raise ValueError(f"report: study {name!r} is not in the store {store.path} (studies: "
                         f"{', '.join(known) if known else 'none saved yet'})") from None
    return tomllib.loads(text)


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    """Nested dicts -> dotted columns; lists and empty dicts -> JSON text; scalars as is."""
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            _flatten(inner, f"{prefix}.{key}", out)
    elif isinstance(value, (dict, list)):
        out[prefix] = json.dumps(value)
    else:
        out[prefix] = value


def study_frame(store: Store, name: str) -> pd.DataFrame:
    """One row per stored result of study `name`, oldest first: every store column
    (`Store.to_dataframe`), `payload` as JSON text, `study_point.*` (the study point's fields,
    nested ones dotted) and `payload.*` (every other payload field, flattened).

    ValueError for an unknown study or one with no results yet."""
    study_definition(store, name)
    df = store.to_dataframe(study=name)
    if df.empty:
        raise ValueError(f"report: study {name!r} has no results yet; run the study first")
    df = df.sort_values("id", kind="stable").reset_index(drop=True)
    flat = []
    for text in df["payload"]:
        payload = json.loads(text)
        row: dict[str, Any] = {}
        if "study_point" in payload:
            _flatten(payload["study_point"], "study_point", row)
        for key, value in payload.items():
            if key != "study_point":
                _flatten(value, f"payload.{key}", row)
        flat.append(row)
    extra = pd.DataFrame(flat, index=df.index)
    point_cols = [c for c in extra.columns if c.startswith("study_point")]
    extra = extra[point_cols + [c for c in extra.columns if c not in point_cols]]
    return pd.concat([df, extra], axis=1)


def report_config(definition: dict[str, Any], frame: pd.DataFrame) -> ReportConfig:
    """The `[report]` table of a parsed study definition, checked against the study's points.

    ValueError naming `report.<key>` for an unknown key, an axis no point has, a series field
    no point has, or a timeline point that is not in the study."""
    study = definition.get("study") or {}
    if "report" in definition and "report" in study:
        raise ValueError("report: give the report table once, as [report] or [study.report]")
    table = definition.get("report", study.get("report")) or {}
    if not isinstance(table, dict):
        raise ValueError("report: [report] must be a table")
    unknown = sorted(set(table) - set(REPORT_KEYS))
    if unknown:
        raise ValueError(f"report.{unknown[0]}: unknown key; allowed: {', '.join(REPORT_KEYS)}")
    recs = rf.records(frame)
    x = table.get("x", "chips")
    fields = sorted({f for r in recs for f in rf.config_fields(r["sp"])})
    if not isinstance(x, str) or (x not in rf.X_BUILTIN and x not in fields):
        raise ValueError(f"report.x: {x!r} must be one of {', '.join(rf.X_BUILTIN)} or a model "
                         f"config field of the study's models ({', '.join(fields)})")
    series = table.get("series", "model")
    allowed = sorted({"model", "plan", "cluster"} | {k for r in recs for k in r["sp"]}
                     | {k for r in recs for g in ("overrides", "variant")
                        for k in (r["sp"].get(g) or {})})
    if not isinstance(series, str) or series not in allowed:
        raise ValueError(f"report.series: {series!r} must be one of {', '.join(allowed)}")
    timelines = table.get("timelines")
    if timelines is not None:
        points = set(frame["point"].dropna())
        if not isinstance(timelines, list) or not all(isinstance(t, str) for t in timelines):
            raise ValueError("report.timelines must be a list of point keys (strings)")
        missing = [t for t in timelines if t not in points]
        if missing:
            raise ValueError(f"report.timelines: point {missing[0]!r} is not in the study "
                             f"(points: {', '.join(sorted(points))})")
        timelines = tuple(timelines)
    return ReportConfig(x=x, series=series, timelines=timelines)


def _fmt(value: Any, scale: float = 1.0) -> str:
    """A table cell: 4 significant digits for numbers (whole numbers with thousands
    separators from 10,000 on), '' for missing."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, (int, float)):
        scaled = value * scale
        return f"{scaled:,.0f}" if abs(scaled) >= 1e4 else f"{scaled:.4g}"
    return str(value)


def summary_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per study point: what it is, then step time, throughput, MFU and memory as
    predicted, simulated and measured (display strings)."""
    recs = rf.records(frame)
    names = rf.display_names(recs)
    rate, rate_title = rf._rate([r for r in recs if r["status"] != "failed"])
    rate_unit = rate_title.split(" ")[0]
    rows: dict[str, dict[str, str]] = {}
    for r in recs:
        sp = r["sp"]
        row = rows.setdefault(r["point"], {
            "point": names[r["point"]], "model": sp.get("model"), "cluster": sp.get("cluster"),
            "chips": sp["chips"], "global batch": _fmt(sp.get("global_batch")),
            "plan": sp.get("plan"), "status": ""})
        word = rf.KIND_STYLE[r["kind"]][0]
        row["status"] = " ".join(filter(None, [row["status"], f"{word}:{r['status']}"]))
        if r["status"] == "failed":
            continue
        row[f"step {word} (s)"] = _fmt(r["step_time_s"])
        row[f"{rate_unit} {word}"] = _fmt(r[rate])
        row[f"MFU {word} (%)"] = _fmt(r["mfu"], 100.0)
        row[f"memory {word} (GB)"] = _fmt(r["memory_peak_bytes"], 1 / rf.BYTES_PER_GB)
        if r["payload"].get("fits") is not None:
            row["fits"] = _fmt(r["payload"]["fits"])
    table = pd.DataFrame(list(rows.values())).fillna("")
    order = [c for c in table.columns if not c.startswith(("step ", rate_unit, "MFU", "memory"))]
    metrics = [c for c in table.columns if c not in order]
    kinds = [w for w, _, _ in rf.KIND_STYLE.values()]
    metrics.sort(key=lambda c: (["step", rate_unit, "MFU", "memory"].index(c.split(" ")[0]),
                                next(i for i, w in enumerate(kinds) if w in c)))
    return table[[c for c in order if c != "status"] + metrics + ["status"]]


def comparison_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Measured against predicted per measured point: step time and MFU with errors (%)."""
    rows = [{"point": c["name"], "plan": c["plan"],
             "predicted by": "cost model" if c["by"] == "prediction" else "simulator",
             "measured step (s)": _fmt(c["measured_step_time_s"]),
             "predicted step (s)": _fmt(c["predicted_step_time_s"]),
             "step error (%)":
                 f"{100 * (c['predicted_step_time_s'] / c['measured_step_time_s'] - 1):+.1f}",
             "measured MFU (%)": _fmt(c["measured_mfu"], 100.0),
             "predicted MFU (%)": _fmt(c["predicted_mfu"], 100.0)}
            for c in rf.comparisons(frame)]
    return pd.DataFrame(rows)


def failures_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Every failed result: point, kind, plan and the error."""
    failed = frame[frame["status"] == "failed"]
    return pd.DataFrame({"point": failed["point"], "kind": failed["kind"],
                         "plan": failed["plan"], "error": failed["error"]})


def timeline_points(frame: pd.DataFrame, cfg: ReportConfig) -> tuple[str, ...]:
    """The points whose timelines the report draws: the configured ones, else the first
    point with a simulation that did not fail (none when nothing was simulated)."""
    if cfg.timelines is not None:
        return cfg.timelines
    sims = frame[(frame["kind"] == "simulation") & (frame["status"] != "failed")]
    return tuple(sims["point"].head(1))


def _figure_html(fig, div_id: str) -> str:
    """One figure as a div and its Plotly.newPlot call (no plotly.js: the page has it once)."""
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                       default_height=f"{fig.layout.height or rf.FIGURE_HEIGHT_PX}px",
                       config={"displaylogo": False, "responsive": True})


def _table_html(table: pd.DataFrame) -> str:
    """A table as escaped HTML in a box that scrolls sideways when it is wider than the page."""
    return f'<div class="wide">{table.to_html(index=False, escape=True, border=0)}</div>'


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } .question { font-size: 1.2em; font-style: italic; }
table { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; white-space: nowrap; }
.wide { overflow-x: auto; }
th { background: #f0f0f0; } td:first-child { text-align: left; }
.note { color: #555; } pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
"""


def html_report(store: Store, name: str) -> str:
    """The study's report as one self-contained HTML page (plotly.js inlined once; nothing
    is fetched over the network when it opens)."""
    from plotly.offline import get_plotlyjs

    definition = study_definition(store, name)
    frame = study_frame(store, name)
    cfg = report_config(definition, frame)
    study = definition.get("study") or {}
    question = study.get("question")
    kinds = frame["kind"].value_counts()
    parts = [f"<h1>Study {html.escape(name)}</h1>",
             f'<p class="question">{html.escape(question)}</p>' if question else
             '<p class="note">The study definition states no question.</p>',
             f'<p class="note">{len(frame["point"].dropna().unique())} points; '
             + ", ".join(f"{n} {k}{'' if n == 1 else 's'}" for k, n in kinds.items())
             + f"; {int((frame['status'] == 'failed').sum())} failed. Steps: "
             + html.escape(", ".join(study.get("do", [])) or "not stated") + ".</p>"]
    figures = [("throughput", "Throughput", rf.throughput_figure(frame, cfg.x, cfg.series), ""),
               ("mfu", "MFU", rf.mfu_figure(frame, cfg.x, cfg.series), ""),
               ("memory", "Memory", rf.memory_figure(frame),
                "No result of this study carries a memory breakdown."),
               ("accuracy", "Predicted versus measured", rf.accuracy_figure(frame),
                "Nothing in this study was measured, so there is nothing to compare.")]
    for key, title, fig, missing in figures:
        parts.append(f"<h2>{title}</h2>")
        parts.append(_figure_html(fig, f"fig-{key}") if fig is not None
                     else f'<p class="note">{missing}</p>')
    parts.append("<h2>Timelines</h2>")
    timelines = timeline_points(frame, cfg)
    if not timelines:
        parts.append('<p class="note">No point of this study was simulated.</p>')
    for i, point in enumerate(timelines):
        try:
            fig, caption = rf.timeline_figure(frame, point)
        except ValueError as err:
            parts.append(f'<p class="note">Timeline of {html.escape(point)} could not be drawn: '
                         f"{html.escape(str(err))}</p>")
            continue
        parts += [_figure_html(fig, f"fig-timeline-{i}"),
                  f'<p class="note">{html.escape(caption)}</p>']
    parts.append("<h2>Points</h2>")
    parts.append(_table_html(summary_table(frame)))
    comparison = comparison_table(frame)
    if not comparison.empty:
        parts += ["<h2>Measured against predicted</h2>", _table_html(comparison)]
    failures = failures_table(frame)
    if not failures.empty:
        parts += ["<h2>Failures</h2>", _table_html(failures)]
    definition_text = store.study(name)["definition"]
    parts.append(f"<details><summary>Study definition (TOML)</summary><pre>"
                 f"{html.escape(definition_text)}</pre></details>")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>Study {html.escape(name)}</title><style>{_STYLE}</style>"
            f'<script type="text/javascript">{get_plotlyjs()}</script></head>\n<body>\n'
            + "\n".join(parts) + "\n</body></html>\n")


def _parquet_ready(frame: pd.DataFrame) -> pd.DataFrame:
    """Columns whose values mix types (say a number in one row, text in another) become JSON
    text, which Parquet's one type per column can hold."""
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype != object:
            continue
        values = out[column].dropna()
        types = {bool if isinstance(v, bool) else float if isinstance(v, (int, float)) else type(v)
                 for v in values}
        if len(types) > 1:
            out[column] = [None if v is None or (isinstance(v, float) and pd.isna(v))
                           else json.dumps(v) for v in out[column]]
    return out


def write_report(store: Store, name: str, fmt: str, out_path: str | Path) -> Path:
    """Write study `name`'s report as `fmt` (html, csv or parquet) to `out_path`; return it."""
    if fmt not in FORMATS:
        raise ValueError(f"report: format {fmt!r} must be one of {', '.join(FORMATS)}")
    out = Path(out_path)
    if fmt == "html":
        text = html_report(store, name)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        return out
    frame = study_frame(store, name)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        frame.to_csv(out, index=False)
    else:
        _parquet_ready(frame).to_parquet(out, index=False, engine="pyarrow")
    return out


def cmd_report(args: argparse.Namespace) -> int:
    """`workbench report STUDY`: write the study's report; print where it went."""
    path = Path(args.store).expanduser() if args.store else default_path()
    if not path.exists():
        raise ValueError(f"--store: no store at {path}")
    if args.format not in FORMATS:
        raise ValueError(f"--format: {args.format!r} must be one of {', '.join(FORMATS)}")
    with Store(path) as store:
        out = write_report(store, args.study, args.format,
                           args.out or f"{args.study}.{args.format}")
    print(f"wrote {out}")
    return 0


def add_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add `report STUDY --format --out --store` to the `workbench` subcommands."""
    p = subparsers.add_parser("report", help="write a study's HTML, CSV or Parquet report")
    p.add_argument("study", help="study name (as saved in the store)")
    p.add_argument("--format", default="html", help=f"one of {', '.join(FORMATS)} (default html)")
    p.add_argument("--out", help="output file (default STUDY.FORMAT in the current folder)")
    p.add_argument("--store", help="SQLite store (default $WORKBENCH_STORE or ~/.local/share)")
    p.set_defaults(func=cmd_report)
    return p
