"""The plan explorer's pure functions: from the page's inputs to everything it shows.

`explore(state)` is one explorer update (cost model only): the headline numbers, memory per
rank against the chip's memory, the step-time breakdown with the exposed communication split
by hierarchy level, or every rule an impossible plan breaks. `timeline(state)` simulates the
step for the Gantt chart (one representative rank per pipeline stage), `search_table(state)`
ranks every valid plan, and `plan_fields` / `plan_text` (`plan_form.py`) keep the page's plan
controls and its plan text in step. The page (`pages/explorer.py`) only wires these to components.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import plotly.graph_objects as go

from .. import costmodel, hardware, models
from ..cli import si
from ..costmodel import Estimate
from ..plan import Plan, PlanError, Violation
from ..report_figures import BYTES_PER_GB, MEMORY_PARTS
from ..simulator.trace import CATEGORY_COLOURS
from .plan_form import plan_fields, plan_items
from .urls import ExplorerState, to_query

SEARCH_TOP = 20
"""Plans the best-plans table lists."""
FIGURE_HEIGHT_PX = 320
"""Height of the memory and step-time figures."""
_COMM_PARTS = {"tp_comm_s": ("tp", ("tp",), None), "cp_comm_s": ("cp", ("cp",), None),
               "ep_comm_s": ("ep", ("ep",), None), "pp_comm_s": ("pp", ("pp",), None),
               "fsdp_exposed_s": ("fsdp gathers", ("fsdp",), ("all_gather",)),
               "dp_exposed_s": ("dp reduction", ("dp", "fsdp"), ("all_reduce", "reduce_scatter")),
               "zero_gather_s": ("zero gather", ("dp",), ("all_gather",))}
"""Exposed-communication parts of `Estimate.breakdown_s`: (label, groups, kinds) of the
collectives (`Estimate.comm`) whose hierarchy level the part's seconds are charged to."""
_LEVEL_COLOURS = ("#F58518", "#E45756", "#B279A2", "#9D755D")
_PALETTE = ("#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A", "#19D3F3")  # plotly's


@dataclass
class Headline:
    """One headline number (a card on the page)."""

    id: str
    """Element id of the card, e.g. `explorer-step-time`."""
    label: str
    """What it is, e.g. `Step time`."""
    value: str
    """The number with its unit, e.g. `9.685 s`."""
    detail: str = ""
    """A second line (the HFU beside MFU, the capacity beside memory)."""
    good: bool = True
    """False marks a bad value (memory that does not fit)."""


@dataclass
class ExplorerView:
    """Everything one explorer update shows."""

    state: ExplorerState | None
    """The inputs it was made from (None when they could not be read)."""
    messages: list[str] = field(default_factory=list)
    """Input problems (unknown model, bad override, cluster, chips) and the memory verdict."""
    violations: list[Violation] = field(default_factory=list)
    """Every rule the plan breaks (empty when it is possible)."""
    estimate: Estimate | None = None
    """The cost model's estimate (None when the plan or the inputs are impossible)."""
    headlines: list[Headline] = field(default_factory=list)
    """Step time, MFU, HFU, throughput, TFLOP/s per chip and memory."""
    memory_figure: go.Figure | None = None
    """Memory per rank, stacked by part, against the chip's memory."""
    breakdown_figure: go.Figure | None = None
    """Where the step time goes, communication per hierarchy level."""

    @property
    def reasons(self) -> list[str]:
        """One line per problem for the page: every broken plan rule (what is wrong, the rule
        and the field to change), then the input problems and the memory verdict."""
        return ([f"{v.text} (rule: {v.rule}; change {v.field})" for v in self.violations]
                + self.messages)

    @property
    def query(self) -> str | None:
        """The URL query string of the state (None without a state)."""
        return to_query(self.state) if self.state is not None else None


@dataclass
class TimelineView:
    """The simulator's timeline of the plan."""

    figure: go.Figure
    """Gantt chart (an empty, titled figure when there is no timeline)."""
    summary: str = ""
    """Simulated step time beside the cost model's, events and wall time."""
    message: str = ""
    """Why there is no timeline (empty when there is one)."""


@dataclass
class SearchTable:
    """The best plans of a search, as DataTable rows."""

    rows: list[dict] = field(default_factory=list)
    """One row per plan (its `id` is the plan text), fastest first."""
    columns: list[dict] = field(default_factory=list)
    """DataTable column specs (numbers stay numbers, so sorting is numeric)."""
    message: str = ""
    """What was searched, or why nothing was."""


# -- choices --------------------------------------------------------------------------------

def model_options() -> list[dict]:
    """Dropdown options of every model flavour, grouped by family."""
    table = models.flavours()
    return [{"label": f"{name} ({f.family})", "value": name}
            for name, f in sorted(table.items(), key=lambda kv: (kv[1].family, kv[0]))]


def cluster_options() -> list[dict]:
    """Dropdown options of every cluster preset (and `cpu`, this host's calibration)."""
    return [{"label": name, "value": name} for name in hardware.list_presets()["clusters"]]


# -- inputs <-> state -----------------------------------------------------------------------

def parse_overrides(text: str | None) -> dict[str, str]:
    """`seq=2048,layers=4` -> {'seq': '2048', 'layers': '4'} (values are coerced by the model's
    config); ValueError naming `overrides` for an item that is not key=value."""
    out: dict[str, str] = {}
    for item in filter(str.strip, (text or "").split(",")):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise ValueError(f"overrides: {item.strip()!r} is not key=value (rule: overrides "
                             "are key=value items separated by commas, e.g. seq=2048,layers=4)")
        out[key] = value
    return out


def state_from_inputs(model: str | None, overrides: str | None, cluster: str | None,
                      cluster_file: str | None, chips, plan: str | None
                      ) -> tuple[ExplorerState | None, list[str]]:
    """The explorer state the controls describe, or None and a message per unreadable one.

    A cluster file path, when given, wins over the preset."""
    messages = []
    if not model:
        messages.append("model: pick a model")
    try:
        sets = parse_overrides(overrides)
    except ValueError as e:
        messages.append(str(e))
    spec = (cluster_file or "").strip() or cluster
    if not spec:
        messages.append("cluster: pick a preset or give a cluster file (.toml or .json)")
    if isinstance(chips, float) and chips.is_integer():
        chips = int(chips)
    if isinstance(chips, bool) or not isinstance(chips, int) or chips < 1:
        messages.append(f"chips: {chips!r} is not a positive whole number (rule: chips >= 1)")
    if messages:
        return None, messages
    return ExplorerState(model, sets, spec, chips, (plan or "").strip() or "dp=1"), []


def inputs_from_state(state: ExplorerState) -> dict:
    """The controls' values for a state (the inverse of `state_from_inputs`), by control:
    `model`, `overrides`, `cluster`, `cluster_file`, `chips`, `plan` and the plan fields."""
    presets = hardware.list_presets()["clusters"]
    is_preset = state.cluster in presets
    return {"model": state.model,
            "overrides": ",".join(f"{k}={v}" for k, v in state.overrides.items()),
            "cluster": state.cluster if is_preset else ExplorerState.cluster,
            "cluster_file": "" if is_preset else state.cluster, "chips": state.chips,
            "plan": state.plan, **plan_fields(state.plan)}


# -- the cost model -------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _graph(model: str, overrides: tuple[tuple[str, str], ...]):
    return costmodel.graph(model, batch=1, **dict(overrides))


def load_graph(model: str, overrides: dict):
    """The model's layer graph (batch 1) with overrides; cached, so an update with the same
    model costs only the estimate. ValueError for an unknown model or a bad override."""
    return _graph(model, tuple(overrides.items()))


def _inputs(state: ExplorerState):
    """(graph, cluster, messages): the state's model and cluster (a preset, `cpu` or a
    .toml/.json file, at its chip count), or the problems."""
    graph = cluster = None
    messages = []
    try:
        graph = load_graph(state.model, state.overrides)
    except ValueError as e:
        known = state.model in models.flavours()
        messages.append(f"{'overrides' if known else 'model'}: {e}")
    try:
        cluster = hardware.resolve_cluster(state.cluster, state.chips)
    except ValueError as e:
        messages.append(f"cluster: {e}")
    except OSError as e:
        messages.append(f"cluster: cannot read {state.cluster!r}: {e.strerror or e}")
    return graph, cluster, messages


def explore(state: ExplorerState | None, messages: list[str] | None = None) -> ExplorerView:
    """One explorer update: the estimate of the state's plan and what the page shows of it,
    or the reasons there is none (input problems, every broken plan rule)."""
    view = ExplorerView(state, list(messages or []))
    if state is not None and not view.messages:
        graph, cluster, view.messages = _inputs(state)
        if not view.messages:
            try:
                plan = Plan.parse(state.plan)
                view.estimate = costmodel.estimate(graph, plan, cluster)
            except PlanError as e:
                view.violations = list(e.violations)
            except ValueError as e:  # e.g. a dtype the chip has no peak for
                view.messages.append(str(e))
    est = view.estimate
    if est is None:
        why = "the plan is impossible" if view.violations else "the inputs have problems"
        view.memory_figure = _placeholder(f"Memory per rank: no estimate ({why})",
                                          "memory per rank (GB)")
        view.breakdown_figure = _placeholder(f"Step time: no estimate ({why})",
                                             "time per step (s)")
        return view
    m = est.memory
    if not m.fits:
        view.messages.append(
            f"does not fit: {m.peak_bytes / BYTES_PER_GB:.1f} GB per rank (pipeline stage "
            f"{m.stage}) is over the chip's {m.capacity_bytes / BYTES_PER_GB:.1f} GB by "
            f"{m.over_by_bytes / BYTES_PER_GB:.1f} GB (rule: the busiest rank's memory fits the "
            "chip; try recompute, FSDP, more TP or PP, or a smaller microbatch)")
    view.headlines = headlines(est)
    view.memory_figure = memory_figure(est)
    view.breakdown_figure = breakdown_figure(est, tuple(lv.name for lv in cluster.levels))
    return view


def format_seconds(seconds: float) -> str:
    """`9.685 s`, `12.35 ms` or `87.2 µs`."""
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def _tflops(value: float) -> str:
    """`396.4`, or three significant digits below 10 (`0.0123` on a CPU)."""
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def headlines(est: Estimate) -> list[Headline]:
    """The headline numbers of an estimate."""
    m = est.memory
    rate = (f"{si(est.tokens_per_s)} tokens/s" if est.tokens_per_s
            else f"{si(est.samples_per_s)} samples/s")
    return [
        Headline("explorer-step-time", "Step time", format_seconds(est.step_time_s),
                 f"per optimizer step, {est.n_chips:,} x {est.cluster}"),
        Headline("explorer-mfu", "MFU", f"{100 * est.mfu:.1f}%", "model FLOPs / peak"),
        Headline("explorer-hfu", "HFU", f"{100 * est.hfu:.1f}%", "recomputation counted"),
        Headline("explorer-throughput", "Throughput", rate,
                 f"{si(est.samples_per_s)} samples/s on {est.n_chips:,} chips"),
        Headline("explorer-tflops", "TFLOP/s per chip", _tflops(est.model_tflops_per_chip),
                 f"{_tflops(est.hardware_tflops_per_chip)} with recomputation"),
        Headline("explorer-peak-memory", "Memory per rank",
                 f"{m.peak_bytes / BYTES_PER_GB:.1f} GB",
                 f"of {m.capacity_bytes / BYTES_PER_GB:.1f} GB: "
                 + ("fits" if m.fits else "does not fit"), good=m.fits)]


def memory_figure(est: Estimate) -> go.Figure:
    """One stacked bar of the busiest rank's memory by part (`report_figures.MEMORY_PARTS`,
    in the report's colours), against the chip's memory."""
    m = est.memory
    fig = go.Figure()
    for i, part in enumerate(MEMORY_PARTS):
        label, nbytes = part.replace("_", " "), getattr(m, f"{part}_bytes")
        fig.add_trace(go.Bar(y=[f"stage {m.stage}"], x=[nbytes / BYTES_PER_GB], name=label,
                             orientation="h", marker_color=_PALETTE[i % len(_PALETTE)],
                             hovertemplate=f"{label}: %{{x:.3f}} GB<extra></extra>"))
    cap = m.capacity_bytes / BYTES_PER_GB
    fig.add_vline(x=cap, line={"color": "black", "width": 3, "dash": "dash"},
                  annotation_text=f"chip memory {cap:.0f} GB", annotation_position="top")
    over = m.over_by_bytes / BYTES_PER_GB
    verdict = "fits" if m.fits else f"does not fit (over by {over:.1f} GB)"
    fig.update_layout(barmode="stack", template="plotly_white", height=FIGURE_HEIGHT_PX,
                      title=f"Memory per rank: {m.peak_bytes / BYTES_PER_GB:.1f} GB, {verdict}",
                      xaxis={"title": {"text": "memory per rank (GB)"},
                             "range": [0, 1.08 * max(cap, m.peak_bytes / BYTES_PER_GB)]},
                      yaxis={"title": {"text": "busiest pipeline stage"}},
                      legend={"traceorder": "normal"})
    return fig


def breakdown_parts(est: Estimate, levels: tuple[str, ...] = ()) -> dict[str, tuple[float, str]]:
    """Where the step goes: {label: (seconds, what is in it)}, summing to the step time.

    Compute, recompute, the pipeline bubble and the optimizer come straight from
    `Estimate.breakdown_s`; each exposed-communication part (tp, cp, ep, pp, FSDP gathers,
    DP reduction, ZeRO gathers) is charged to the hierarchy levels its collectives cross, split
    by their time per step (seconds x calls) when they cross several. `levels` orders the
    communication labels (`comm: node`, `comm: rack`, ...), innermost first."""
    seconds: dict[str, float] = {}
    what: dict[str, list[str]] = {}
    for key, label in (("compute_s", "compute"), ("recompute_s", "recompute")):
        seconds[label] = est.breakdown_s[key]
    comm_s: dict[str, float] = {lv: 0.0 for lv in levels}
    for key, (name, groups, kinds) in _COMM_PARTS.items():
        part_s = est.breakdown_s.get(key, 0.0)
        if part_s <= 0:
            continue
        share: dict[str, float] = {}
        for c in est.comm:
            if c.group in groups and (kinds is None or c.kind in kinds):
                share[c.level] = share.get(c.level, 0.0) + c.seconds * c.count_per_step
        total = sum(share.values())
        if total <= 0:  # no collective on record: charge the outermost level
            share, total = {levels[-1] if levels else "unknown": 1.0}, 1.0
        for level, w in share.items():
            comm_s[level] = comm_s.get(level, 0.0) + part_s * w / total
            what.setdefault(level, []).append(f"{name} {format_seconds(part_s * w / total)}")
    for level, s in comm_s.items():
        seconds[f"comm: {level}"] = s
    bubble_s = est.breakdown_s["bubble_s"]
    if bubble_s < 0:  # ranks that share cores: a stage alone on a core beats its busy time
        what["pipeline bubble"] = ["below 0: stages ran alone on shared cores, faster than "
                                   "with every rank busy"]
    seconds["pipeline bubble"] = bubble_s
    seconds["optimizer"] = est.breakdown_s["optimizer_s"]
    return {label: (s, ", ".join(what.get(label.removeprefix("comm: "), [])))
            for label, s in seconds.items()}


def breakdown_figure(est: Estimate, levels: tuple[str, ...] = ()) -> go.Figure:
    """One stacked bar of the step time by part (`breakdown_parts`; empty parts left out, a
    negative pipeline bubble of ranks sharing cores drawn leftwards, so the bar ends at the
    step time)."""
    fig = go.Figure()
    colours = {"compute": CATEGORY_COLOURS["compute"], "recompute": "#9ECAE9",
               "pipeline bubble": CATEGORY_COLOURS["wait"],
               "optimizer": CATEGORY_COLOURS["optimizer"]}
    comm_i = 0
    for label, (s, detail) in breakdown_parts(est, levels).items():
        if s == 0 or (s < 0 and label != "pipeline bubble"):
            continue
        colour = colours.get(label)
        if colour is None:
            colour, comm_i = _LEVEL_COLOURS[comm_i % len(_LEVEL_COLOURS)], comm_i + 1
        hover = f"{label}: %{{x:.4f}} s" + (f"<br>{detail}" if detail else "")
        fig.add_trace(go.Bar(y=["cost model"], x=[s], name=label, orientation="h",
                             marker_color=colour, hovertemplate=hover + "<extra></extra>"))
    fig.update_layout(barmode="relative", template="plotly_white", height=FIGURE_HEIGHT_PX,
                      title=f"Step time: {format_seconds(est.step_time_s)} "
                            f"({est.n_chips:,} chips, {est.cluster})",
                      xaxis={"title": {"text": "time per step (s)"}},
                      yaxis={"title": {"text": "predictor"}},
                      legend={"traceorder": "normal"})
    return fig


def _placeholder(title: str, x_title: str, y_title: str = "") -> go.Figure:
    """An empty figure that says why it is empty (titled, axes labelled)."""
    fig = go.Figure()
    fig.update_layout(template="plotly_white", height=FIGURE_HEIGHT_PX, title=title,
                      xaxis={"title": {"text": x_title}, "showticklabels": False},
                      yaxis={"title": {"text": y_title}, "showticklabels": False})
    return fig


# -- the simulator and the search -----------------------------------------------------------

def timeline(state: ExplorerState | None) -> TimelineView:
    """The simulated step of the state's plan as a Gantt chart (symmetric mode: one
    representative rank per pipeline stage, which is what keeps 16,384 chips fast)."""
    empty = _placeholder("Simulated step timeline", "time (ms)", "rank")
    if state is None:
        return TimelineView(empty, message="no timeline: the inputs have problems")
    graph, cluster, messages = _inputs(state)
    if messages:
        return TimelineView(empty, message="no timeline: " + "; ".join(messages))
    from ..simulator import simulate
    try:
        r = simulate(graph, state.plan, cluster, mode="symmetric")
    except PlanError:
        return TimelineView(empty, message="no timeline: the plan is impossible (see above)")
    except ValueError as e:
        return TimelineView(empty, message=f"no timeline: {e}")
    fig = r.gantt()
    rows = len({ev.rank for ev in r.timeline})
    fig.update_layout(title=f"Simulated step: {r.model} {r.plan} on {r.n_chips:,} x "
                            f"{r.cluster} (one rank per pipeline stage)",
                      template="plotly_white", height=max(300, 140 + 48 * rows))
    diff = 100 * (r.step_time_s / r.predicted_step_time_s - 1)
    summary = (f"simulated step {format_seconds(r.step_time_s)} (cost model "
               f"{format_seconds(r.predicted_step_time_s)}, {diff:+.1f}%), MFU "
               f"{100 * r.mfu:.1f}%; {r.events:,} events simulated in {r.wall_s:.2f} s")
    return TimelineView(fig, summary)


def search_table(state: ExplorerState | None, top: int = SEARCH_TOP) -> SearchTable:
    """The `top` fastest plans that fit, for the state's model, cluster and chips, at the
    global batch and dtype of its plan (which itself may be impossible)."""
    if state is None:
        return SearchTable(message="no search: the inputs have problems")
    graph, cluster, messages = _inputs(state)
    if messages:
        return SearchTable(message="no search: " + "; ".join(messages))
    try:
        plan = Plan.parse(state.plan)
        gbs, dtype = plan.global_batch_size, plan.dtype
    except PlanError:
        items = plan_items(state.plan)
        if not items.get("gbs", "").isdigit():
            return SearchTable(message="no search: the plan text has no readable global batch; "
                                       "set gbs (rule: the search keeps the plan's global batch)")
        gbs, dtype = int(items["gbs"]), items.get("dtype", "bf16")
    try:
        result = costmodel.search(graph, cluster, state.chips, gbs, dtype=dtype)
    except ValueError as e:
        return SearchTable(message=f"no search: {e}")
    rate = "tokens_per_s" if graph.seq else "samples_per_s"
    pinned = lambda text: text if "gbs=" in text else f"{text},gbs={gbs}"  # noqa: E731
    rows = [{"id": pinned(r["plan"]), "rank": i + 1, "plan": pinned(r["plan"]),
             "step_time_s": r["step_time_s"], "throughput": r[rate],
             "mfu_percent": 100 * r["mfu"], "tflops_per_chip": r["model_tflops_per_chip"],
             "memory_gb": r["memory_peak_bytes"] / BYTES_PER_GB}
            for i, r in enumerate(result.top(top))]
    spec = (("#", "rank", ""), ("plan", "plan", ""), ("step time (s)", "step_time_s", ".4f"),
            (rate.replace("_per_s", "/s"), "throughput", ".4s"), ("MFU (%)", "mfu_percent", ".1f"),
            ("TFLOP/s per chip", "tflops_per_chip", ".1f"),
            ("memory per rank (GB)", "memory_gb", ".1f"))
    columns = [{"name": name, "id": key, "type": "text" if key == "plan" else "numeric",
                **({"format": {"specifier": f}} if f else {})} for name, key, f in spec]
    message = (f"{result.evaluated:,} valid plans evaluated in {result.seconds:.2f} s, "
               f"{len(result.ranking):,} fit memory; global batch {gbs}, {dtype}. "
               "Click a row to load its plan.")
    if not rows:
        message = (f"no plan fits: {result.evaluated:,} valid plans evaluated, none fits the "
                   "chip's memory; try more chips or a smaller global batch")
    return SearchTable(rows, columns, message)
