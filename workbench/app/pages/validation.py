"""Validation page: every measured run beside its prediction and simulation, the predicted
versus measured MFU scatter, the error by family, plan kind and hardware, and one run's step
times and telemetry. Every callback calls `workbench.app.validation_view`."""
from __future__ import annotations

import dash
from dash import Input, Output, callback, dash_table, dcc, html, no_update

from workbench.app import context
from workbench.app import validation_view as view

dash.register_page(__name__, path="/validation", name="Validation", order=2,
                   title="workbench · validation")

_TABLE_STYLE = {"style_table": {"overflowX": "auto"},
                "style_cell": {"textAlign": "right"}}


def _table(table_id: str, rows: list[dict]):
    """A sortable table of display rows."""
    return dash_table.DataTable(id=table_id, data=rows, sort_action="native", page_size=15,
                                columns=[{"name": c, "id": c} for c in (rows[0] if rows else {})],
                                **_TABLE_STYLE)


def layout(**_query):
    """The page over every measurement in the store (read when the page opens)."""
    rows = view.validation_rows(context.store())
    options = view.run_options(rows)
    return html.Div([
        html.H2("Validation: measured against predicted and simulated"),
        html.P(view.count_text(rows), id="validation-count"),
        html.Div(className="grid", children=[
            dcc.Graph(id="validation-scatter", figure=view.accuracy_scatter(rows)),
            html.Div([html.H3("MFU error by model family, plan kind and hardware"),
                      html.P("Error = predicted / measured - 1 (positive: the model is high).",
                             className="muted"),
                      _table("validation-errors", view.error_table(rows))]),
        ]),
        html.H3("Every measured run"),
        _table("validation-runs", view.table_rows(rows)),
        html.H3("One run: step times and telemetry"),
        html.Div(className="controls", children=[html.Label(className="field", children=[
            html.Span("run (or click a point of the scatter)"),
            dcc.Dropdown(id="validation-run", options=options, clearable=False,
                         value=options[0]["value"] if options else None,
                         style={"width": "640px"}, placeholder="no measured run in the store"),
        ])]),
        html.P(id="validation-run-info"),
        html.Div(className="grid", children=[dcc.Graph(id="validation-steps"),
                                             dcc.Graph(id="validation-samples")]),
    ])


@callback(Output("validation-run", "value"), Input("validation-scatter", "clickData"),
          prevent_initial_call=True)
def _pick(click):
    """A clicked scatter point selects its run."""
    run_id = view.clicked_run(click)
    return no_update if run_id is None else run_id


@callback(Output("validation-steps", "figure"), Output("validation-samples", "figure"),
          Output("validation-run-info", "children"), Input("validation-run", "value"))
def _drill(run_id):
    """Step times and telemetry of the chosen run."""
    return view.drilldown(context.store(), run_id)
