"""The figures of a study report, built from the rows of `report.study_frame`.

Every builder reads the study frame (one row per stored result: the store's columns, the
payload as JSON text, and the flattened `study_point.*` / `payload.*` columns) and returns a
plotly Figure, or None when the study has nothing to draw for it (a study without measurements
has no predicted-versus-measured figure). Units: throughput in tokens/s (samples/s for models
without a sequence), MFU in percent, memory in GB (10^9 bytes), time in seconds.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

KIND_STYLE = {"prediction": ("predicted", "solid", "circle"),
              "simulation": ("simulated", "dash", "diamond"),
              "measurement": ("measured", "dot", "square")}
"""Per result kind: legend word, line dash and marker symbol."""
MEMORY_PARTS = ("weights", "grads", "optimizer", "activations", "fsdp_buffer", "framework")
"""The cost model's per-rank memory parts (`Estimate.memory.<part>_bytes`), stacked in order."""
ERROR_BANDS = (0.2, 0.1)
"""Relative error bands around y = x in the predicted-versus-measured figure (±20%, ±10%)."""
X_BUILTIN = ("chips", "global_batch", "seq")
"""x axes every study has; any model config field (an override such as `experts`) also works."""
BYTES_PER_GB = 1e9
"""Bytes in a GB (SI, as `_GBps` in DESIGN.md)."""
FIGURE_HEIGHT_PX = 460
"""Height of every figure except timelines (those grow with their rows)."""
_PALETTE = qualitative.Plotly
_X_TITLES = {"chips": "chips (log2 scale)", "global_batch": "global batch (samples)",
             "seq": "sequence length (tokens)"}


def record(row: pd.Series) -> dict[str, Any]:
    """One frame row as a dict with `payload` parsed and `sp`, the study point, whose `model`,
    `plan`, `cluster` and `chips` fall back on the stored columns when the payload lacks them."""
    payload = json.loads(row["payload"])
    sp = dict(payload.get("study_point") or {})
    for key, column in (("model", "model"), ("plan", "plan"), ("cluster", "cluster"),
                        ("chips", "n_chips")):
        if sp.get(key) is None:
            sp[key] = None if pd.isna(row[column]) else row[column]
    sp["chips"] = int(sp["chips"])
    out = {c: (None if _missing(row[c]) else row[c]) for c in
           ("id", "kind", "status", "error", "point", "step_time_s", "mfu", "tokens_per_s",
            "samples_per_s", "memory_peak_bytes", "prediction_id", "simulation_id")}
    out.update(payload=payload, sp=sp)
    return out


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """`record` of every row, in frame order."""
    return [record(row) for _, row in frame.iterrows()]


def _missing(value: Any) -> bool:
    """True for None, NaN and pandas NA."""
    return value is None or (not isinstance(value, (str, dict, list)) and bool(pd.isna(value)))


def display_names(recs: list[dict]) -> dict[str, str]:
    """Point key -> the name figures show: the points' labels when every point has one and
    they are distinct, else the point keys."""
    labels: dict[str, str] = {}
    for r in recs:
        labels.setdefault(r["point"], r["sp"].get("label") or "")
    if all(labels.values()) and len(set(labels.values())) == len(labels):
        return labels
    return {p: p for p in labels}


@functools.lru_cache(maxsize=256)
def _config(model: str, overrides_json: str) -> Any:
    """The model config of a study point (None for a model the registry does not know)."""
    from . import models
    try:
        return models.get(model, **json.loads(overrides_json))
    except (ValueError, TypeError):
        return None


def point_config(sp: dict) -> Any:
    """The model config (dataclass) of study point `sp`, or None when it cannot be built."""
    return _config(str(sp["model"]), json.dumps(sp.get("overrides") or {}, sort_keys=True))


def config_fields(sp: dict) -> tuple[str, ...]:
    """Names of the model config fields of study point `sp` (possible x axes)."""
    cfg = point_config(sp)
    return tuple(f.name for f in dataclasses.fields(cfg)) if dataclasses.is_dataclass(cfg) else ()


def x_value(sp: dict, x: str) -> float | None:
    """The study point's value on axis `x`: chips, global_batch, seq (the model's own when
    the point leaves it out), an override, or the model config's value of that field."""
    if x == "chips":
        return sp["chips"]
    if x == "global_batch":
        return sp.get("global_batch")
    if x == "seq" and sp.get("seq") is not None:
        return sp["seq"]
    overrides = sp.get("overrides") or {}
    if x in overrides:
        value = overrides[x]
    else:
        value = getattr(point_config(sp), x, None)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def series_value(sp: dict, series: str) -> str:
    """The legend group of study point `sp`: the text of its field `series`, or
    `series=value` for an override or variant key of that name."""
    if series in sp:
        value = sp[series]
    else:
        for group in ("overrides", "variant"):
            if series in (sp.get(group) or {}):
                return f"{series}={sp[group][series]}"
        return f"{series} not set"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items())) or "none"
    return "none" if value is None else str(value)


def _colours(keys: list[str]) -> dict[str, str]:
    """A stable colour per series, in order of first appearance."""
    return {k: _PALETTE[i % len(_PALETTE)] for i, k in enumerate(dict.fromkeys(keys))}


def _log2_axis(values: list[float], x: str) -> bool:
    """Chips always; other axes when every value is a power of two and there are 3 or more."""
    distinct = sorted(set(values))
    if x == "chips":
        return all(v > 0 for v in distinct)
    return len(distinct) >= 3 and all(
        v > 0 and float(v).is_integer() and int(v) & (int(v) - 1) == 0 for v in distinct)


def _x_axis(fig: go.Figure, values: list[float], x: str, **where: Any) -> None:
    """Title the x axis with its unit; a log axis ticked at the values for powers of two."""
    title = _X_TITLES.get(x, x)
    if _log2_axis(values, x):
        ticks = sorted(set(values))
        fig.update_xaxes(type="log", tickvals=ticks, ticktext=[f"{v:g}" for v in ticks],
                         title_text=title if x == "chips" else f"{title} (log2 scale)", **where)
    else:
        fig.update_xaxes(title_text=title, **where)


def _rate(recs: list[dict]) -> tuple[str, str]:
    """Throughput column and its axis title: tokens/s when every result has it."""
    if recs and all(r["tokens_per_s"] is not None for r in recs):
        return "tokens_per_s", "tokens/s (whole cluster)"
    return "samples_per_s", "samples/s (whole cluster)"


def _hover(r: dict, name: str, what: str, value: float, unit: str) -> str:
    """Hover text of one result: point, plan, value, whether it fits."""
    fits = r["payload"].get("fits")
    note = "" if fits is None else ("<br>fits memory" if fits else "<br>does NOT fit memory")
    return (f"{name}<br>{KIND_STYLE[r['kind']][0]} {what}: {value:.4g} {unit}"
            f"<br>plan {r['sp'].get('plan')}<br>{r['sp']['chips']} x {r['sp'].get('cluster')}"
            + note)


def _metric_figure(recs: list[dict], x: str, series: str, column: str, scale: float,
                   title: str, y_title: str, unit: str) -> go.Figure:
    """One line per (series, kind) of `column` x `scale` against x. Where a series has several
    results at one x (several plans), the line runs through the best that fits memory and the
    others are drawn as faint markers."""
    names = display_names(recs)
    groups: dict[tuple[str, str], list[tuple[float, dict]]] = {}
    for r in recs:
        xv = x_value(r["sp"], x)
        if r["status"] != "failed" and xv is not None and r[column] is not None:
            groups.setdefault((series_value(r["sp"], series), r["kind"]), []).append((xv, r))
    colours = _colours([s for s, _ in groups])
    fig = go.Figure()
    xs_all, ys_all = [], []
    order = {key: (list(colours).index(key[0]), list(KIND_STYLE).index(key[1])) for key in groups}
    for (s, kind), items in sorted(groups.items(), key=lambda kv: order[kv[0]]):
        word, dash, symbol = KIND_STYLE[kind]
        best: dict[float, dict] = {}
        for xv, r in items:
            key = (r["payload"].get("fits") is not False, r[column])
            if xv not in best or key > (best[xv]["payload"].get("fits") is not False,
                                        best[xv][column]):
                best[xv] = r
        line = sorted(best.items())
        others = [(xv, r) for xv, r in items if best[xv] is not r]
        for part, extra in ((line, False), (others, True)):
            if not part:
                continue
            ys = [r[column] * scale for _, r in part]
            xs_all += [xv for xv, _ in part]
            ys_all += ys
            fig.add_trace(go.Scatter(
                x=[xv for xv, _ in part], y=ys,
                name=f"{s} · {word}" + (" (other plans)" if extra else ""),
                mode="markers" if extra else "lines+markers", legendgroup=s,
                opacity=0.45 if extra else 1.0,
                line={"color": colours[s], "dash": dash}, marker={"symbol": symbol, "size": 9,
                                                                   "color": colours[s]},
                hovertext=[_hover(r, names[r["point"]], title.split(" versus")[0], y, unit)
                           for (_, r), y in zip(part, ys)], hoverinfo="text"))
    _x_axis(fig, xs_all, x)
    positive = [y for y in ys_all if y > 0]
    wide = len(positive) == len(ys_all) and positive and max(positive) / min(positive) > 100
    fig.update_yaxes(title_text=y_title, type="log" if wide else "linear",
                     rangemode="normal" if wide else "tozero")
    fig.update_layout(title=title, height=FIGURE_HEIGHT_PX, template="plotly_white",
                      legend={"title": {"text": f"{series} · kind"}}, hovermode="closest")
    return fig


def throughput_figure(frame: pd.DataFrame, x: str = "chips", series: str = "model") -> go.Figure:
    """Throughput (tokens/s, or samples/s) of every predicted, simulated and measured point
    against `x`, one line per `series` value and kind."""
    recs = [r for r in records(frame) if r["status"] != "failed"]
    column, y_title = _rate(recs)
    unit = y_title.split(" ")[0]
    return _metric_figure(recs, x, series, column, 1.0, f"Throughput versus {x}", y_title, unit)


def mfu_figure(frame: pd.DataFrame, x: str = "chips", series: str = "model") -> go.Figure:
    """Model FLOPs utilisation (percent of the chips' dense peak) against `x`, one line per
    `series` value and kind."""
    return _metric_figure(records(frame), x, series, "mfu", 100.0, f"MFU versus {x}",
                          "MFU (% of dense peak)", "%")


def memory_figure(frame: pd.DataFrame) -> go.Figure | None:
    """Stacked per-rank memory of each point as the cost model predicts it (weights, grads,
    optimizer, activations, FSDP buffers, framework) against the chip's memory, with the
    measured peak where the point was run. None when no result carries a memory breakdown."""
    recs = records(frame)
    names = display_names(recs)
    memory: dict[str, tuple[dict, dict]] = {}  # point -> (memory dict, the result holding it)
    measured: dict[str, float] = {}
    for r in recs:
        if r["status"] == "failed":
            continue
        if r["kind"] == "prediction" and isinstance(r["payload"].get("memory"), dict):
            memory[r["point"]] = (r["payload"]["memory"], r)
        if r["kind"] == "measurement":
            predicted = (r["payload"].get("predicted") or {}).get("memory")
            if isinstance(predicted, dict):
                memory.setdefault(r["point"], (predicted, r))
            if r["memory_peak_bytes"] is not None:
                measured[r["point"]] = r["memory_peak_bytes"]
    if not memory:
        return None
    points = [p for p in dict.fromkeys(r["point"] for r in recs) if p in memory]
    cats = [names[p] for p in points]
    fig = go.Figure()
    for i, part in enumerate(MEMORY_PARTS):
        gb = [memory[p][0].get(f"{part}_bytes", 0.0) / BYTES_PER_GB for p in points]
        fig.add_trace(go.Bar(
            x=cats, y=gb, name=part.replace("_", " "), marker_color=_PALETTE[i % len(_PALETTE)],
            hovertext=[f"{names[p]}<br>plan {memory[p][1]['sp'].get('plan')}<br>{part}: {v:.3f} GB"
                       for p, v in zip(points, gb)], hoverinfo="text"))
    capacity = [memory[p][0].get("capacity_bytes") for p in points]
    if any(c is not None for c in capacity):
        fig.add_trace(go.Scatter(
            x=cats, y=[None if c is None else c / BYTES_PER_GB for c in capacity],
            name="chip memory", mode="markers",
            marker={"symbol": "line-ew-open", "size": 46, "color": "black", "line": {"width": 3}},
            hovertext=[f"{names[p]}: chip memory {c / BYTES_PER_GB:.1f} GB" if c else ""
                       for p, c in zip(points, capacity)], hoverinfo="text"))
    if measured:
        got = [p for p in points if p in measured]
        fig.add_trace(go.Scatter(
            x=[names[p] for p in got], y=[measured[p] / BYTES_PER_GB for p in got],
            name="measured peak (tensors, no framework allowance)", mode="markers",
            marker={"symbol": "x", "size": 12, "color": "#d62728"},
            hovertext=[f"{names[p]}: measured {measured[p] / BYTES_PER_GB:.4f} GB" for p in got],
            hoverinfo="text"))
    fig.update_layout(barmode="stack",
                      title="Peak memory per rank (cost model) against chip memory",
                      height=FIGURE_HEIGHT_PX, template="plotly_white",
                      xaxis_title="study point", yaxis_title="memory per rank (GB)",
                      legend={"title": {"text": "memory part"}})
    return fig


def _linked(recs: list[dict], m: dict, kind: str) -> dict | None:
    """The measurement's prediction or simulation: by its link id, else the same point's."""
    link = m["prediction_id" if kind == "prediction" else "simulation_id"]
    for r in recs:
        if r["kind"] == kind and r["status"] != "failed" and (
                r["id"] == link if link is not None else r["point"] == m["point"]):
            return r
    return None


def comparisons(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Per measured point and per model (cost model, simulator): measured and predicted MFU
    and step time. The cost model's numbers come from the linked prediction, else from the
    measurement's own `predicted` payload."""
    recs = records(frame)
    names = display_names(recs)
    out = []
    for m in recs:
        if m["kind"] != "measurement" or m["status"] == "failed" or m["step_time_s"] is None:
            continue
        for kind in ("prediction", "simulation"):
            other = _linked(recs, m, kind)
            values = (other["step_time_s"], other["mfu"]) if other else (None, None)
            if other is None and kind == "prediction" and m["payload"].get("predicted"):
                values = (m["payload"]["predicted"].get("step_time_s"),
                          m["payload"]["predicted"].get("mfu"))
            if values[0] is None:
                continue
            out.append({"point": m["point"], "name": names[m["point"]], "by": kind,
                        "plan": m["sp"].get("plan"), "measured_step_time_s": m["step_time_s"],
                        "predicted_step_time_s": values[0], "measured_mfu": m["mfu"],
                        "predicted_mfu": values[1]})
    return out


def _bands(fig: go.Figure, lo: float, hi: float, col: int) -> None:
    """±20% and ±10% bands and the y = x line between lo and hi on subplot `col`."""
    for i, band in enumerate(ERROR_BANDS):
        fig.add_trace(go.Scatter(
            x=[lo, hi, hi, lo, lo], y=[lo * (1 - band), hi * (1 - band), hi * (1 + band),
                                       lo * (1 + band), lo * (1 - band)],
            fill="toself", mode="lines", line={"width": 0}, hoverinfo="skip",
            fillcolor=f"rgba(44, 160, 44, {0.12 + 0.1 * i})", name=f"±{band:.0%} error",
            legendgroup=f"band{band}", showlegend=col == 1), row=1, col=col)
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x (exact)",
                             line={"color": "black", "dash": "dash"}, hoverinfo="skip",
                             legendgroup="exact", showlegend=col == 1), row=1, col=col)


def accuracy_figure(frame: pd.DataFrame) -> go.Figure | None:
    """Predicted (cost model, simulator) against measured MFU and step time, on log axes,
    with the y = x line and ±10% / ±20% error bands. None when nothing was measured."""
    rows = comparisons(frame)
    if not rows:
        return None
    fig = make_subplots(rows=1, cols=2, subplot_titles=("MFU (%)", "step time (s)"),
                        horizontal_spacing=0.12)
    for col, (what, scale, unit) in enumerate((("mfu", 100.0, "%"), ("step_time_s", 1.0, "s")),
                                              start=1):
        pairs = [(r[f"measured_{what}"] * scale, r[f"predicted_{what}"] * scale, r) for r in rows
                 if r[f"measured_{what}"] and r[f"predicted_{what}"]]
        if not pairs:
            continue
        values = [v for a, b, _ in pairs for v in (a, b)]
        _bands(fig, min(values) / 1.5, max(values) * 1.5, col)
        for kind in ("prediction", "simulation"):
            mine = [p for p in pairs if p[2]["by"] == kind]
            if not mine:
                continue
            word, _, symbol = KIND_STYLE[kind]
            who = "cost model" if kind == "prediction" else "simulator"
            fig.add_trace(go.Scatter(  # open symbols: a simulation on its prediction shows both
                x=[a for a, _, _ in mine], y=[b for _, b, _ in mine], mode="markers",
                name=who, legendgroup=kind, showlegend=col == 1,
                marker={"symbol": f"{symbol}-open", "size": 12 if kind == "prediction" else 16,
                        "line": {"width": 2},
                        "color": _PALETTE[0] if kind == "prediction" else _PALETTE[1]},
                hovertext=[f"{r['name']}<br>plan {r['plan']}<br>measured {a:.4g} {unit}<br>"
                           f"{word} {b:.4g} {unit} ({100 * (b / a - 1):+.1f}%)"
                           for a, b, r in mine], hoverinfo="text"), row=1, col=col)
        label = "MFU (%)" if what == "mfu" else "step time (s)"
        fig.update_xaxes(type="log", title_text=f"measured {label}", row=1, col=col)
        fig.update_yaxes(type="log", title_text=f"predicted {label}", row=1, col=col)
    fig.update_layout(title="Predicted versus measured (shaded: ±10% and ±20% of measured)",
                      height=FIGURE_HEIGHT_PX, template="plotly_white")
    return fig


def timeline_figure(frame: pd.DataFrame, point: str) -> tuple[go.Figure, str]:
    """Re-simulate `point` (deterministic) and return its Gantt figure and a caption that
    compares the step time with the stored simulation's. Variant keys that are cost-model
    options (`CostOptions` fields) are applied; the stored simulation's `mode` is reused."""
    from . import costmodel, simulator
    from .costmodel import CostOptions

    recs = [r for r in records(frame) if r["point"] == point]
    if not recs:
        raise ValueError(f"report.timelines: point {point!r} is not in the study")
    stored = next((r for r in recs if r["kind"] == "simulation" and r["status"] != "failed"), None)
    sp = (stored or recs[0])["sp"]
    overrides = dict(sp.get("overrides") or {})
    if sp.get("seq") is not None and "seq" in config_fields(sp):
        overrides.setdefault("seq", sp["seq"])
    from .study_run import cluster_for

    option_names = {f.name for f in dataclasses.fields(CostOptions)}
    variant = sp.get("variant") or {}
    if sp.get("options") is not None:  # every cost option of the point (fixed and swept)
        options, ignored = CostOptions(**sp["options"]), []
    else:
        options = CostOptions(**{k: v for k, v in variant.items() if k in option_names})
        ignored = sorted(k for k in variant if k not in option_names and k != "mode")
    cluster = cluster_for(str(sp["cluster"]), sp["chips"])
    mode = (stored["payload"].get("mode") if stored else None) or variant.get("mode", "symmetric")
    result = simulator.simulate(costmodel.graph(sp["model"], **overrides), sp["plan"], cluster,
                                options, mode=mode)
    fig = result.gantt()
    name = display_names(records(frame))[point]
    fig.update_layout(title=f"Timeline of {name}: {sp['model']}, plan {sp['plan']} on "
                            f"{sp['chips']} x {sp['cluster']} ({mode}, re-simulated)",
                      template="plotly_white",
                      height=max(FIGURE_HEIGHT_PX,
                                 140 + 28 * len(fig.layout.yaxis.categoryarray or ())))
    caption = f"Re-simulated step: {result.step_time_s:.6g} s."
    if stored is not None:
        diff = result.step_time_s / stored["step_time_s"] - 1
        caption += (f" Stored simulation: {stored['step_time_s']:.6g} s"
                    + (" (the same)." if math.isclose(diff, 0.0, abs_tol=1e-9)
                       else f" ({100 * diff:+.2f}%: the study's settings differ from these).")
                    )
    if ignored:
        caption += f" Variant keys not applied here: {', '.join(ignored)}."
    return fig, caption
