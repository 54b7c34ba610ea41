"""Scaling studies page: pick a shipped or stored study or write one, run it in the background
with a progress bar, see throughput, MFU and memory against chips; a click opens the point in
the plan explorer. Every callback calls `workbench.app.studies_view`."""
from __future__ import annotations

import os

import dash
from dash import Input, Output, State, callback, ctx, dash_table, dcc, html, no_update

from workbench.app import context
from workbench.app import studies_view as view

dash.register_page(__name__, path="/studies", name="Scaling studies", order=1,
                   title="workbench · scaling studies")

_GRAPHS = ("studies-throughput", "studies-mfu", "studies-memory")


def _field(label: str, control) -> html.Label:
    """A labelled control of the controls bar."""
    return html.Label([html.Span(label), control], className="field")


def layout(**_query):
    """The page, showing the newest stored study with results."""
    store = context.store()
    return html.Div([
        html.H2("Scaling studies"),
        html.Div(className="controls", children=[
            _field("study", dcc.Dropdown(
                id="studies-source", options=view.source_options(store),
                className="wide-dropdown", placeholder="load a study into the editor")),
            _field("one line per", dcc.Dropdown(
                id="studies-series", value=view.AUTO, clearable=False, className="wide-dropdown",
                options=[{"label": label, "value": value}
                         for value, label in view.SERIES_CHOICES])),
            html.Div(style={"flexBasis": "100%"}, children=[
                dcc.Textarea(id="studies-toml", value=view.EXAMPLE_STUDY, spellCheck=False,
                             style={"height": "300px"},
                             placeholder="a study in TOML (see the README's Studies)")]),
            html.Button("Run", id="studies-run", n_clicks=0, className="button"),
            html.Button("Cancel", id="studies-cancel", n_clicks=0, disabled=True,
                        className="button"),
            html.Progress(id="studies-progress", value="0", max="1",
                          style={"width": "260px", "alignSelf": "center"}),
            html.Span(id="studies-progress-text", className="muted",
                      style={"alignSelf": "center"}),
            html.Div(id="studies-message", style={"flexBasis": "100%"}),
        ]),
        dcc.Store(id="studies-current", data=view.newest_study(store)),
        dcc.Store(id="studies-done"),
        dcc.Interval(id="studies-poll", interval=1000, disabled=True),
        dcc.Location(id="studies-location", refresh=True),
        html.P(id="studies-summary"),
        html.Div(id="studies-problem", className="hidden"),
        html.Div(id="studies-open"),
        html.Div(className="grid", children=[dcc.Graph(id=g) for g in _GRAPHS]),
        html.H3("Points"),
        dash_table.DataTable(id="studies-points", sort_action="native", page_size=20,
                             style_table={"overflowX": "auto"},
                             style_cell={"textAlign": "right"}),
    ])


@callback(Output("studies-toml", "value"), Output("studies-current", "data"),
          Output("studies-message", "children"),
          Input("studies-source", "value"), Input("studies-run", "n_clicks"),
          State("studies-toml", "value"), prevent_initial_call=True)
def _choose(source, _clicks, text):
    """Loading a study shows it; pressing Run shows the study being run."""
    if ctx.triggered_id == "studies-run":
        try:
            return no_update, view.run_token(view.study_name(text)), "Running…"
        except ValueError:  # the run's own callback reports what is wrong
            return no_update, no_update, no_update
    text, name, message = view.load_source(source, context.store())
    return text, (view.run_token(name) if name else no_update), message


@callback(Output("studies-done", "data"), Output("studies-message", "children",
                                                 allow_duplicate=True),
          Output("studies-source", "options"),
          Input("studies-run", "n_clicks"), State("studies-toml", "value"),
          background=True, prevent_initial_call=True,
          progress=[Output("studies-progress", "value"), Output("studies-progress", "max"),
                    Output("studies-progress-text", "children")],
          running=[(Output("studies-run", "disabled"), True, False),
                   (Output("studies-cancel", "disabled"), False, True),
                   (Output("studies-poll", "disabled"), False, True)],
          cancel=[Input("studies-cancel", "n_clicks")])
def _run(set_progress, _clicks, text):
    """Run the study in a background worker (its own connection to the store)."""
    from workbench.store import Store

    with Store(os.environ.get("WORKBENCH_STORE") or None) as store:
        outcome = view.run_study_text(
            text, store, progress=lambda done, total, line: set_progress(
                (str(done), str(max(total, 1)), line)))
        return view.run_token(outcome.name), outcome.message, view.source_options(store)


@callback(*(Output(g, "figure") for g in _GRAPHS), Output("studies-summary", "children"),
          Output("studies-problem", "children"), Output("studies-problem", "className"),
          Output("studies-points", "data"),
          Output("studies-points", "columns"),
          Input("studies-current", "data"), Input("studies-done", "data"),
          Input("studies-poll", "n_intervals"), Input("studies-series", "value"))
def _draw(current, done, _tick, series):
    """Draw the shown study (redrawn while a run is going and when it ends)."""
    name = view.current_name(done) if ctx.triggered_id == "studies-done" else None
    shown = view.study_view(context.store(), name or view.current_name(current), series)
    columns = [{"name": c, "id": c} for c in (shown.rows[0] if shown.rows else {})]
    return (shown.figures["throughput"], shown.figures["mfu"], shown.figures["memory"],
            shown.summary, shown.message, "error" if shown.message else "hidden", shown.rows,
            columns)


@callback(Output("studies-location", "href"), Output("studies-open", "children"),
          *(Input(g, "clickData") for g in _GRAPHS), prevent_initial_call=True)
def _open(*clicks):
    """A clicked point opens in the plan explorer."""
    url = view.clicked_url(ctx.triggered[0]["value"] if ctx.triggered else None)
    if url is None:
        return no_update, "That point has no plan to open."
    return url, dcc.Link("Open this point in the plan explorer", href=url)
