"""Reports page: choose a study (HTML, CSV or Parquet report) or runs (CSV or Parquet rows)
and download the export. The callback calls `workbench.app.reports_view`."""
from __future__ import annotations

import dash
from dash import Input, Output, State, callback, dash_table, dcc, html, no_update

from workbench.app import context
from workbench.app import reports_view as view

dash.register_page(__name__, path="/reports", name="Reports", order=3,
                   title="workbench · reports")


def _field(label: str, control) -> html.Label:
    """A labelled control of the controls bar."""
    return html.Label([html.Span(label), control], className="field")


def layout(**_query):
    """The page over the studies and runs in the store (read when the page opens)."""
    store = context.store()
    studies = view.study_options(store)
    table = view.studies_table(store)
    return html.Div([
        html.H2("Reports"),
        html.P("A study's report is one self-contained HTML page (figures, tables, its "
               "definition) or every stored result as CSV or Parquet rows. Runs export as "
               "rows with the same columns.", className="muted"),
        html.Div(className="controls", children=[
            _field("study", dcc.Dropdown(id="reports-study", options=studies,
                                         value=studies[0]["value"] if studies else None,
                                         className="wide-dropdown",
                                         placeholder="no study with results")),
            _field("or runs (measurements, and results outside a study)", dcc.Dropdown(
                id="reports-runs", options=view.run_options(store), multi=True,
                style={"width": "520px"}, placeholder="choose runs (clear the study first)")),
            _field("format", dcc.RadioItems(
                id="reports-format", value="html", inline=True, className="check",
                options=[{"label": f.upper(), "value": f} for f in view.FORMATS])),
            html.Button("Download", id="reports-download-button", n_clicks=0,
                        className="button"),
        ]),
        html.Div(id="reports-message", className="hidden"),
        dcc.Download(id="reports-download"),
        html.H3("Studies in the store"),
        dash_table.DataTable(id="reports-studies", data=table, sort_action="native",
                             page_size=20, style_table={"overflowX": "auto"},
                             style_cell={"textAlign": "left"},
                             columns=[{"name": c, "id": c} for c in (table[0] if table else {})]),
    ])


@callback(Output("reports-download", "data"), Output("reports-message", "children"),
          Output("reports-message", "className"),
          Input("reports-download-button", "n_clicks"), State("reports-study", "value"),
          State("reports-runs", "value"), State("reports-format", "value"),
          prevent_initial_call=True)
def _download(_clicks, study, runs, fmt):
    """Build the export and hand it to the browser; a message when the choice is invalid."""
    try:
        name, data = view.export(context.store(), study, runs, fmt)
    except ValueError as err:
        return no_update, str(err), "error"
    return dcc.send_bytes(data, name), view.describe(name, data), "muted"
