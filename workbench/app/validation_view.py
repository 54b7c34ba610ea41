"""What the Validation page shows: every measured run beside its prediction and simulation.

One row per measurement in the store (`validation_rows`), with the cost model's numbers
(the linked prediction, else the `predicted` estimate the runner stored in the measurement)
and the simulator's (the linked simulation); a scatter of predicted against measured MFU with
the y = x line and ±10% / ±20% bands; the MFU error grouped by model family, plan kind and
hardware; and a drill-down into one run's step times and sampled telemetry (NVML on GPUs,
/proc and RAPL on CPUs).

Errors are relative: predicted / measured - 1, in percent (+10% = the model is 10% high).
"""
from __future__ import annotations

import statistics
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .. import report_figures as rf
from ..plan import Plan
from ..profiler.base import STEP_END, STEP_START

PLAN_KINDS = ("single", "dp", "fsdp", "tp", "pp", "cp", "ep", "hybrid")
"""Plan kinds the error table groups by (`plan_kind`)."""
GROUPINGS = (("family", "model family"), ("plan_kind", "plan kind"), ("hardware", "hardware"))
"""(row key, label) of the error table's groupings, in order."""
PREDICTORS = (("predicted", "cost model"), ("simulated", "simulator"))
"""(row key prefix, label) of the two models compared with the measurement."""
_UNITS = (("_pct", "%", 1.0), ("_bytes", "GB", 1 / rf.BYTES_PER_GB), ("_w", "W", 1.0),
          ("_j", "J", 1.0), ("_mhz", "MHz", 1.0), ("_c", "°C", 1.0), ("_s", "s", 1.0),
          ("load_avg_1m", "processes", 1.0))
"""Metric-name suffix -> axis unit and scale (bytes are drawn in GB; the load average counts
runnable processes)."""


def plan_kind(plan: str | None) -> str:
    """The kind of parallelism of a compact plan: `single` (one rank), the one dimension in
    use (`dp`, `fsdp`, `tp`, `pp`, `cp`, `ep`), or `hybrid` for two or more. Expert
    parallelism borrows the FSDP ranks (torchtitan), so `ep=k,fsdp=k` is `ep`. A plan that
    does not parse is `unknown`."""
    try:
        p = Plan.parse(plan or "")
    except ValueError:
        return "unknown"
    used = [k for k, v in (("dp", p.dp_replicate), ("fsdp", p.dp_shard), ("tp", p.tp),
                           ("pp", p.pp), ("cp", p.cp), ("ep", p.ep)) if v > 1]
    if "ep" in used and p.ep == p.dp_shard:
        used.remove("fsdp")
    if not used:
        return "single"
    return used[0] if len(used) == 1 else "hybrid"


def hardware_label(cluster: str | None, device: str | None) -> str:
    """`cluster (device)`, or one of them when the other is missing or the same."""
    if cluster and device and device != cluster:
        return f"{cluster} ({device})"
    return cluster or device or "unknown"


def _error(predicted: float | None, measured: float | None) -> float | None:
    """predicted / measured - 1 (None when either is missing or measured is 0)."""
    if predicted is None or not measured:
        return None
    return predicted / measured - 1


def validation_rows(store) -> list[dict[str, Any]]:
    """One row per measurement in the store (newest first): what ran, on what, and the
    measured, predicted (cost model) and simulated step time and MFU with the errors."""
    linked = {r["id"]: r for kind in ("prediction", "simulation")
              for r in store.results(kind=kind, with_payload=False)}
    rows = []
    for m in store.results(kind="measurement"):
        pred = linked.get(m["prediction_id"]) if m["prediction_id"] else None
        sim = linked.get(m["simulation_id"]) if m["simulation_id"] else None
        fallback = m["payload"].get("predicted") if isinstance(m["payload"], dict) else None
        pred_step, pred_mfu = ((pred["step_time_s"], pred["mfu"]) if pred else
                               ((fallback or {}).get("step_time_s"), (fallback or {}).get("mfu")))
        row = {"id": m["id"], "study": m["study"] or "", "model": m["model"],
               "family": m["family"] or "unknown", "plan": m["plan"],
               "plan_kind": plan_kind(m["plan"]), "chips": m["n_chips"],
               "hardware": hardware_label(m["cluster"], m["device"]), "status": m["status"],
               "error": m["error"] or "", "measured_step_s": m["step_time_s"],
               "measured_mfu": m["mfu"], "predicted_step_s": pred_step,
               "predicted_mfu": pred_mfu,
               "simulated_step_s": sim["step_time_s"] if sim else None,
               "simulated_mfu": sim["mfu"] if sim else None}
        for key, _ in PREDICTORS:
            row[f"{key}_mfu_error"] = _error(row[f"{key}_mfu"], row["measured_mfu"])
            row[f"{key}_step_error"] = _error(row[f"{key}_step_s"], row["measured_step_s"])
        rows.append(row)
    return rows


def _pct(value: float | None, signed: bool = False) -> str:
    """A fraction as percent text ('' when missing)."""
    if value is None:
        return ""
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.2f}"


def _num(value: float | None) -> str:
    """4 significant digits ('' when missing)."""
    return "" if value is None else f"{value:.4g}"


def table_rows(rows: list[dict]) -> list[dict[str, Any]]:
    """The runs table: display strings of every run."""
    return [{"id": r["id"], "study": r["study"], "model": r["model"], "plan": r["plan"],
             "kind": r["plan_kind"], "hardware": r["hardware"], "chips": r["chips"],
             "status": r["status"], "measured step (s)": _num(r["measured_step_s"]),
             "measured MFU (%)": _pct(r["measured_mfu"]),
             "cost model MFU (%)": _pct(r["predicted_mfu"]),
             "simulator MFU (%)": _pct(r["simulated_mfu"]),
             "cost model error (%)": _pct(r["predicted_mfu_error"], signed=True),
             "simulator error (%)": _pct(r["simulated_mfu_error"], signed=True)}
            for r in rows]


def error_table(rows: list[dict]) -> list[dict[str, Any]]:
    """MFU error by model family, plan kind and hardware: per group, the measured runs and,
    for the cost model and the simulator, the mean absolute and mean signed error (%)."""
    out = []
    for key, label in GROUPINGS:
        groups: dict[str, list[dict]] = {}
        for r in rows:
            if r["status"] != "failed" and r["measured_mfu"]:
                groups.setdefault(r[key], []).append(r)
        for group in sorted(groups):
            runs = groups[group]
            row = {"grouped by": label, "group": group, "runs": len(runs)}
            for prefix, who in PREDICTORS:
                errors = [r[f"{prefix}_mfu_error"] for r in runs
                          if r[f"{prefix}_mfu_error"] is not None]
                row[f"{who} mean |error| (%)"] = \
                    _pct(statistics.fmean(abs(e) for e in errors)) if errors else ""
                row[f"{who} mean error (%)"] = \
                    _pct(statistics.fmean(errors), signed=True) if errors else ""
            out.append(row)
    return out


def accuracy_scatter(rows: list[dict]) -> go.Figure:
    """Predicted (cost model, simulator) against measured MFU (%) on log axes, with the
    y = x line and ±10% / ±20% bands; each point's `customdata` is its measurement id."""
    fig = go.Figure()
    pairs = [(r, prefix, who) for r in rows for prefix, who in PREDICTORS
             if r["status"] != "failed" and r["measured_mfu"] and r[f"{prefix}_mfu"]]
    values = [100 * v for r, prefix, _ in pairs for v in (r["measured_mfu"], r[f"{prefix}_mfu"])]
    if values:
        lo, hi = min(values) / 1.5, max(values) * 1.5
        for i, band in enumerate(rf.ERROR_BANDS):
            fig.add_trace(go.Scatter(
                x=[lo, hi, hi, lo, lo],
                y=[lo * (1 - band), hi * (1 - band), hi * (1 + band), lo * (1 + band),
                   lo * (1 - band)], fill="toself", mode="lines", line={"width": 0},
                fillcolor=f"rgba(44, 160, 44, {0.12 + 0.1 * i})", hoverinfo="skip",
                name=f"±{band:.0%} error"))
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x (exact)",
                                 line={"color": "black", "dash": "dash"}, hoverinfo="skip"))
    for i, (prefix, who) in enumerate(PREDICTORS):
        mine = [r for r, p, _ in pairs if p == prefix]
        if not mine:
            continue
        symbol = rf.KIND_STYLE["prediction" if prefix == "predicted" else "simulation"][2]
        fig.add_trace(go.Scatter(
            x=[100 * r["measured_mfu"] for r in mine], y=[100 * r[f"{prefix}_mfu"] for r in mine],
            mode="markers", name=who, customdata=[r["id"] for r in mine],
            marker={"symbol": f"{symbol}-open", "size": 12 + 4 * i, "line": {"width": 2}},
            hovertext=[f"run {r['id']}: {r['model']} {r['plan']} on {r['hardware']}<br>"
                       f"measured {100 * r['measured_mfu']:.3g}%, {who} "
                       f"{100 * r[f'{prefix}_mfu']:.3g}% "
                       f"({100 * r[f'{prefix}_mfu_error']:+.1f}%)" for r in mine],
            hoverinfo="text"))
    fig.update_xaxes(type="log", title_text="measured MFU (% of dense peak)")
    fig.update_yaxes(type="log", title_text="predicted MFU (% of dense peak)")
    title = "Predicted versus measured MFU (shaded: ±10% and ±20% of measured)"
    if not pairs:
        title += ": no measured run has a prediction yet"
    fig.update_layout(title=title, height=rf.FIGURE_HEIGHT_PX, template="plotly_white",
                      hovermode="closest")
    return fig


def run_options(rows: list[dict]) -> list[dict[str, Any]]:
    """Drill-down dropdown options: one per measured run."""
    return [{"label": f"run {r['id']}: {r['model']} {r['plan']} x{r['chips']} on "
                      f"{r['hardware']}" + (" (failed)" if r["status"] == "failed" else ""),
             "value": r["id"]} for r in rows]


def metric_unit(metric: str) -> tuple[str, float]:
    """(unit, scale) of a sampled metric from its name's suffix (`rss_bytes` -> GB)."""
    for suffix, unit, scale in _UNITS:
        if metric.endswith(suffix):
            return unit, scale
    return "value", 1.0


def step_figure(samples: list[dict], run_id: int) -> go.Figure:
    """Each timed step's time (s) against its index, with the median as a line."""
    steps = [(s["step"], s["value"]) for s in samples if s["metric"] == "step_time_s"]
    fig = go.Figure(go.Bar(x=[k for k, _ in steps], y=[v for _, v in steps], name="step time",
                           hovertemplate="step %{x}: %{y:.4g} s<extra></extra>"))
    if steps:
        median = statistics.median(v for _, v in steps)
        fig.add_hline(y=median, line_dash="dash", annotation_text=f"median {median:.4g} s")
    fig.update_xaxes(dtick=1 if len(steps) <= 20 else None)  # whole steps only
    fig.update_layout(title=f"Step times of run {run_id}" + ("" if steps else ": none stored"),
                      xaxis_title="timed step (index)", yaxis_title="step time (s)",
                      template="plotly_white", height=rf.FIGURE_HEIGHT_PX)
    return fig


def samples_figure(samples: list[dict], run_id: int) -> go.Figure:
    """One panel per sampled metric (power, clocks, utilisation, memory, ...) against the
    sampler's clock, with dotted lines where each step began."""
    series: dict[str, list[tuple[float, float]]] = {}
    starts = []
    for s in samples:
        if s["metric"] == STEP_START:
            starts.append((s["t_s"], int(s["value"])))
        elif s["metric"] not in (STEP_END, "step_time_s"):
            series.setdefault(s["metric"], []).append((s["t_s"], s["value"]))
    if not series:
        fig = go.Figure()
        fig.update_layout(title=f"Telemetry of run {run_id}: no samples stored",
                          xaxis_title="time since the sampler started (s)",
                          yaxis_title="value", template="plotly_white")
        return fig
    names = sorted(series)
    titles = [f"{metric} ({metric_unit(metric)[0]})" for metric in names]
    fig = make_subplots(rows=len(names), cols=1, shared_xaxes=True, subplot_titles=titles,
                        vertical_spacing=min(0.3 / len(names), 0.08))
    for i, metric in enumerate(names, start=1):
        unit, scale = metric_unit(metric)
        points = series[metric]
        fig.add_trace(go.Scatter(x=[t for t, _ in points], y=[v * scale for _, v in points],
                                 mode="lines+markers", name=metric,
                                 hovertemplate=f"{metric}: %{{y:.4g}} {unit} at %{{x:.3f}} s"
                                               "<extra></extra>"), row=i, col=1)
        fig.update_yaxes(title_text=unit, row=i, col=1)
        for t, _ in starts:
            fig.add_vline(x=t, line_dash="dot", line_color="#999", row=i, col=1)
    fig.update_xaxes(title_text="time since the sampler started (s)", row=len(names), col=1)
    fig.update_layout(title=f"Telemetry of run {run_id} (dotted: a step begins)",
                      template="plotly_white", height=max(rf.FIGURE_HEIGHT_PX, 170 * len(names)),
                      showlegend=False)
    return fig


def drilldown(store, run_id: Any) -> tuple[go.Figure, go.Figure, str]:
    """(step-time figure, telemetry figure, one line about the run) of measurement `run_id`;
    a message instead (and empty figures) for an unknown id or another kind of result."""
    try:
        run_id = int(run_id)
        result = store.get(run_id)
        if result["kind"] != "measurement":
            raise ValueError(f"result {run_id} is a {result['kind']}, not a measurement")
        samples = store.samples(run_id)
    except (TypeError, ValueError, KeyError) as err:
        why = err.args[0] if err.args else str(err)
        note = "choose a measured run" if run_id is None else f"choose a measured run ({why})"
        return step_figure([], 0), samples_figure([], 0), note
    p = result["payload"]
    line = (f"Run {run_id}: {result['model']} {result['plan']} on {result['n_chips']} x "
            f"{hardware_label(result['cluster'], result['device'])}, status {result['status']}")
    if result["status"] == "failed":
        line += f": {result['error']}"
    elif result["step_time_s"] is not None:
        line += (f"; median step {result['step_time_s']:.4g} s (p10 "
                 f"{_num(p.get('step_time_p10_s'))}, p90 {_num(p.get('step_time_p90_s'))}), "
                 f"MFU {_pct(result['mfu'])}%")
    if p.get("sampler_message"):
        line += f". Sampler: {p['sampler_message']}"
    return step_figure(samples, run_id), samples_figure(samples, run_id), line


def clicked_run(click_data: dict | None) -> int | None:
    """The measurement id of a clicked scatter point (None for the bands and the y = x line)."""
    points = (click_data or {}).get("points") or []
    value = points[0].get("customdata") if points else None
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def count_text(rows: list[dict]) -> str:
    """`N measured runs (k failed), m with a prediction, s with a simulation`."""
    failed = sum(r["status"] == "failed" for r in rows)
    with_pred = sum(r["predicted_mfu"] is not None for r in rows)
    with_sim = sum(r["simulated_mfu"] is not None for r in rows)
    return (f"{len(rows)} measured run{'' if len(rows) == 1 else 's'}"
            + (f" ({failed} failed)" if failed else "")
            + f", {with_pred} with a cost-model prediction, {with_sim} with a simulation")
