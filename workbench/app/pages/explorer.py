"""Plan explorer (`/`): a model, a cluster and a plan in; memory, step time, MFU, the
simulated timeline and the best plans out. Callbacks only call `explorer_view`.

The inputs live in the URL (`urls.to_query` / `urls.from_query`): the page's layout reads the
query the router hands it, and a clientside callback writes the current state back with
`history.replaceState`. (A `dcc.Location(refresh=False)` would also move Dash's own pages
location, which re-renders the whole page on every change and loses the focused input.)
"""
from __future__ import annotations

from urllib.parse import urlencode

import dash
from dash import Input, Output, State, callback, clientside_callback, ctx, dash_table, dcc, html

from workbench.app import explorer_view as view
from workbench.app import plan_form as form
from workbench.app.urls import from_query

dash.register_page(__name__, path="/", name="Plan explorer", order=0,
                   title="workbench: plan explorer")

_PLAN_IDS = {key: f"explorer-plan-{key}" for key in form.FIELD_KEYS}
_CHOICES = {"recompute": ("none", "selective", "full"),
            "schedule": (form.AUTO_SCHEDULE, "gpipe", "1f1b", "interleaved-1f1b"),
            "dtype": ("bf16", "fp16", "fp32", "fp8")}
_NUMBER_TIPS = {"dp": "replicated data parallel", "fsdp": "sharded data parallel (FSDP)",
                "tp": "tensor parallel", "pp": "pipeline stages", "vpp": "chunks per stage",
                "cp": "context parallel", "ep": "expert parallel", "mb": "microbatch size",
                "gbs": "global batch (empty: mb x dp x fsdp x pp)", "zero": "ZeRO stage"}


def _field(label: str, control, tip: str = "") -> html.Label:
    """A labelled control of the controls bar."""
    return html.Label([html.Span(label, title=tip), control], className="field")


def _plan_control(key: str, value):
    """The control of one plan key."""
    if key == "sp":
        return dcc.Checklist(id=_PLAN_IDS[key], value=value, className="check",
                             options=[{"label": "sp", "value": form.SP_ON}])
    if key in _CHOICES:
        return _field(key, dcc.Dropdown(id=_PLAN_IDS[key], value=value, clearable=False,
                                        options=list(_CHOICES[key]), className="small-dropdown"))
    return _field(key, dcc.Input(id=_PLAN_IDS[key], type="number", min=0, step=1, value=value,
                                 debounce=0.4, className="number",
                                 placeholder="auto" if key == "gbs" else ""),
                  _NUMBER_TIPS[key])


def layout(**query):
    """The page, its controls filled from the URL query."""
    state, problems = from_query("?" + urlencode(query, doseq=True))
    values = view.inputs_from_state(state)
    return html.Div([
        dcc.Store(id="explorer-query"), dcc.Store(id="explorer-url-sink"),
        html.Div([html.Div(p) for p in problems], id="explorer-url-messages",
                 className="error" if problems else "hidden"),
        html.Div([
            _field("model", dcc.Dropdown(id="explorer-model", options=view.model_options(),
                                         value=values["model"], clearable=False,
                                         className="wide-dropdown")),
            _field("overrides", dcc.Input(id="explorer-overrides", value=values["overrides"],
                                          debounce=True, placeholder="e.g. seq=4096,layers=8"),
                   "model config fields, key=value,key=value (Enter to apply)"),
            _field("cluster", dcc.Dropdown(id="explorer-cluster", options=view.cluster_options(),
                                           value=values["cluster"], clearable=False,
                                           className="small-dropdown")),
            _field("or cluster file", dcc.Input(id="explorer-cluster-file", debounce=True,
                                                value=values["cluster_file"],
                                                placeholder="e.g. my-cluster.toml"),
                   "a .toml or .json cluster file on the server; wins over the preset"),
            _field("chips", dcc.Input(id="explorer-chips", type="number", min=1, step=1,
                                      value=values["chips"], debounce=0.4, className="number")),
        ], className="controls"),
        html.Div([_plan_control(key, values[key]) for key in form.FIELD_KEYS],
                 className="controls plan-controls"),
        html.Div([
            _field("plan", dcc.Input(id="explorer-plan", value=values["plan"], debounce=True,
                                     className="plan-text"),
                   "the whole plan as text (Enter to apply); the controls above follow it"),
            html.Button("Find best plans", id="explorer-search", n_clicks=0, className="button"),
            html.Span(id="explorer-search-running", className="muted"),
        ], className="controls"),
        html.Div(id="explorer-errors", className="hidden"),
        html.Div(id="explorer-cards", className="cards"),
        html.Div([dcc.Graph(id="explorer-memory-figure", config={"displaylogo": False}),
                  dcc.Graph(id="explorer-breakdown-figure", config={"displaylogo": False})],
                 className="grid"),
        html.Div([
            html.H3("Simulated timeline"),
            html.Div([html.Span(id="explorer-timeline-running", className="muted"),
                      html.Span(id="explorer-timeline-status")]),
            dcc.Graph(id="explorer-timeline-figure", config={"displaylogo": False}),
        ], className="card"),
        html.Div([
            html.H3("Best plans"),
            html.Div(id="explorer-search-status", className="muted"),
            dash_table.DataTable(id="explorer-top-plans", data=[], columns=[],
                                 sort_action="native", page_size=view.SEARCH_TOP,
                                 style_as_list_view=True, style_cell={"textAlign": "right"},
                                 style_cell_conditional=[{"if": {"column_id": "plan"},
                                                          "textAlign": "left"}]),
        ], className="card"),
    ], className="explorer")


_FIELD_OUTPUTS = [Output(_PLAN_IDS[k], "value") for k in form.FIELD_KEYS]


@callback(*_FIELD_OUTPUTS, Output("explorer-plan", "value"),
          *[Input(_PLAN_IDS[k], "value") for k in form.FIELD_KEYS],
          Input("explorer-plan", "value"), Input("explorer-top-plans", "active_cell"),
          prevent_initial_call=True)
def sync_plan(*args):
    """Keep the plan controls and the plan text in step (either way), and load a clicked
    row of the best plans."""
    *fields, text, cell = args
    if ctx.triggered_id in ("explorer-plan", "explorer-top-plans"):
        if ctx.triggered_id == "explorer-top-plans":
            if not cell or not cell.get("row_id"):
                return [dash.no_update] * (len(fields) + 1)
            text = cell["row_id"]
        values = form.plan_fields(text)
        out = [values.get(k, dash.no_update) for k in form.FIELD_KEYS]
        return out + [text if ctx.triggered_id == "explorer-top-plans" else dash.no_update]
    new = form.plan_text(dict(zip(form.FIELD_KEYS, fields)), text)
    return [dash.no_update] * len(fields) + [new]


def _card(h: view.Headline) -> html.Div:
    """A headline number as a card."""
    return html.Div([html.Div(h.label, className="label"), html.Div(h.value, className="value"),
                     html.Div(h.detail, className="detail")],
                    id=h.id, className="card metric" + ("" if h.good else " bad"))


@callback(Output("explorer-errors", "children"), Output("explorer-errors", "className"),
          Output("explorer-cards", "children"), Output("explorer-memory-figure", "figure"),
          Output("explorer-breakdown-figure", "figure"), Output("explorer-query", "data"),
          Input("explorer-model", "value"), Input("explorer-overrides", "value"),
          Input("explorer-cluster", "value"), Input("explorer-cluster-file", "value"),
          Input("explorer-chips", "value"), Input("explorer-plan", "value"))
def update(model, overrides, cluster, cluster_file, chips, plan):
    """The cost model's view of the inputs: numbers and figures, or why there are none."""
    state, messages = view.state_from_inputs(model, overrides, cluster, cluster_file, chips, plan)
    v = view.explore(state, messages)
    reasons = v.reasons
    heading = ("This plan is impossible:" if v.violations else
               "Check the inputs:" if v.estimate is None else "Warning:")
    errors = [html.Strong(heading), html.Ul([html.Li(r) for r in reasons])] if reasons else []
    return (errors, "error" if reasons else "hidden", [_card(h) for h in v.headlines],
            v.memory_figure, v.breakdown_figure, v.query or "")


clientside_callback(
    """function(query) {
        if (query && window.location.search !== query) {
            window.history.replaceState(window.history.state, "",
                                        window.location.pathname + query);
        }
        return query;
    }""",
    Output("explorer-url-sink", "data"), Input("explorer-query", "data"))


@callback(Output("explorer-timeline-figure", "figure"),
          Output("explorer-timeline-status", "children"),
          Input("explorer-query", "data"), background=True, interval=250,
          running=[(Output("explorer-timeline-running", "children"),
                    "simulating the step... ", "")])
def show_timeline(query):
    """The simulator's Gantt chart of the plan (a background job: big plans take seconds)."""
    t = view.timeline(from_query(query)[0] if query else None)
    return t.figure, t.summary or t.message


@callback(Output("explorer-top-plans", "data"), Output("explorer-top-plans", "columns"),
          Output("explorer-search-status", "children"), Input("explorer-search", "n_clicks"),
          State("explorer-model", "value"), State("explorer-overrides", "value"),
          State("explorer-cluster", "value"), State("explorer-cluster-file", "value"),
          State("explorer-chips", "value"), State("explorer-plan", "value"),
          background=True, interval=250, prevent_initial_call=True,
          running=[(Output("explorer-search", "disabled"), True, False),
                   (Output("explorer-search-running", "children"),
                    "searching every valid plan...", "")])
def find_best_plans(_clicks, model, overrides, cluster, cluster_file, chips, plan):
    """The fastest plans that fit (a background job: seconds for big models)."""
    state, messages = view.state_from_inputs(model, overrides, cluster, cluster_file, chips, plan)
    table = view.search_table(state)
    return table.rows, table.columns, (("no search: " + "; ".join(messages)) if messages
                                       else table.message)
