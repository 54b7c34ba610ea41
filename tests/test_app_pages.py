"""The web app's Scaling studies, Validation and Reports pages: their view functions
(workbench/app/studies_view.py, validation_view.py, reports_view.py) without a browser, then
each page walked in headless Chromium.

One store per module, filled by the study runner with two small real studies: Llama 3 8B
under FSDP and under TP=8 x FSDP on 8 and 16 H100s (predicted and simulated, 4 points), and
llama-tiny trained for real on 2 CPU ranks under DP (predicted, simulated, measured).
"""
from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
from pathlib import Path

import pandas as pd
import pytest

from workbench import report
from workbench.app import reports_view, studies_view, validation_view
from workbench.app.urls import from_query
from workbench.store import Store
from workbench.study import parse
from workbench.study_run import run_study

H100_STUDY = """
models = ["llama3-8b"]
cluster = {preset = "dgx-h100"}
sweep = {chips = [8, 16], global_batch_per_chip = 2}
plan = {plans = ["fsdp=*,mb=1", "tp=8,fsdp=*,mb=1"]}
[study]
name = "h100-sweep"
question = "FSDP or TP=8 x FSDP for Llama 3 8B?"
do = ["predict", "simulate"]
"""
CPU_STUDY = """
models = ["llama-tiny"]
cluster = {preset = "cpu"}
sweep = {chips = [2]}
plan = {plans = ["dp=*,gbs=4,mb=2,dtype=fp32"]}
run = {steps = 2, warmup = 1}
[study]
name = "cpu-runs"
question = "How close is the cost model to llama-tiny under DP on 2 CPU ranks?"
do = ["predict", "simulate", "run"]
"""
SMALL_STUDY = """models = ["llama3-8b"]
cluster = {{preset = "dgx-h100"}}
sweep = {{chips = [{chips}], global_batch_per_chip = 2}}
plan = {{plans = ["fsdp=*,mb=1"]}}
[study]
name = "{name}"
do = ["predict"]
"""


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    """A store holding the two studies, as `workbench study run` stores them."""
    path = tmp_path_factory.mktemp("app-pages") / "store.db"
    with Store(path) as store:
        for text in (H100_STUDY, CPU_STUDY):
            summary = run_study(parse(text), store, jobs=1, quiet=True)
            assert summary.failed == 0
    return path


@pytest.fixture(scope="module")
def store(store_path):
    """A connection to the module's store (read only by the view tests)."""
    with Store(store_path) as s:
        yield s


# -- studies_view -------------------------------------------------------------------------

def test_source_options_list_stored_then_shipped_studies(store):
    options = studies_view.source_options(store)
    values = [o["value"] for o in options]
    shipped = sorted(p.name for p in studies_view.STUDIES_DIR.glob("*.toml"))
    assert shipped and "llama3-strong-scaling.toml" in shipped
    # newest stored study first, then every shipped file in name order
    assert values == ["stored:cpu-runs", "stored:h100-sweep"] + [f"shipped:{f}" for f in shipped]
    assert options[1]["label"] == "h100-sweep (stored, 8 results)"  # 4 points x 2 kinds


def test_load_source_gives_the_toml_and_the_study_name(store):
    text, name, message = studies_view.load_source("shipped:llama3-strong-scaling.toml", store)
    path = studies_view.STUDIES_DIR / "llama3-strong-scaling.toml"
    assert (text, name, message) == (path.read_text(), "llama3-strong-scaling", "")
    assert studies_view.load_source("stored:h100-sweep", store) == (H100_STUDY, "h100-sweep", "")
    assert studies_view.load_source(None, store) == (studies_view.EXAMPLE_STUDY, None, "")
    for bad, words in (("shipped:../pyproject.toml", "not among the shipped studies"),
                       ("stored:nope", "study 'nope' is not in the store"),
                       ("other:x", "neither a shipped nor a stored study")):
        text, name, message = studies_view.load_source(bad, store)
        assert (text, name) == (studies_view.EXAMPLE_STUDY, None) and words in message


def test_study_name_reads_only_the_name_and_says_what_is_wrong():
    study = parse(studies_view.EXAMPLE_STUDY)
    assert study.name == "example-sweep" and len(study.points) == 4  # 2 chip counts x 2 plans
    assert studies_view.study_name(H100_STUDY) == "h100-sweep"
    with pytest.raises(ValueError, match="not valid TOML"):
        studies_view.study_name("[study")
    with pytest.raises(ValueError, match=r"\[study\] name must be a non-empty string"):
        studies_view.study_name("[study]\nquestion = 'q'")


def test_progress_text():
    assert studies_view.progress_text(0, 4, None, None) == "0/4 points"
    assert studies_view.progress_text(1, 4, "p1", 125.0) == "1/4 points · ETA 2m05s · last: p1"
    assert studies_view.progress_text(4, 4, "p4", 0.0) == "4/4 points · last: p4"


def test_run_study_text_reports_progress_and_resumes(tmp_path):
    calls = []
    with Store(tmp_path / "s.db") as s:
        text = SMALL_STUDY.format(name="two", chips="8, 16")
        out = studies_view.run_study_text(text, s, progress=lambda *a: calls.append(a))
        assert out.ok and out.name == "two"
        assert out.message.startswith("two: 2 of 2 points run (")
        assert [c[:2] for c in calls] == [(0, 2), (1, 2), (2, 2)]
        assert calls[0][2] == "0/2 points" and calls[2][2].startswith("2/2 points · last: ")
        assert len(s.results(study="two")) == 2  # 2 points x 1 kind
        calls.clear()
        again = studies_view.run_study_text(text, s, progress=lambda *a: calls.append(a))
        assert again.message.startswith("two: 0 of 2 points run; 2 were already stored")
        assert calls == [(2, 2, "2/2 points")]


def test_run_study_text_turns_bad_input_into_messages(tmp_path):
    with Store(tmp_path / "s.db") as s:
        bad_toml = studies_view.run_study_text("[study", s)
        assert (bad_toml.ok, bad_toml.name) == (False, None)
        assert bad_toml.message.startswith("study: not valid TOML")
        unknown = studies_view.run_study_text(
            SMALL_STUDY.format(name="u", chips="8").replace("llama3-8b", "llama-nope"), s)
        assert not unknown.ok and "llama-nope" in unknown.message
        assert studies_view.run_study_text(SMALL_STUDY.format(name="c", chips="8"), s).ok
        clash = studies_view.run_study_text(SMALL_STUDY.format(name="c", chips="16"), s)
        assert not clash.ok and "already saved with another definition" in clash.message
        assert s.results(study="c") and not s.results(model="llama-nope")


def _trace(fig, name):
    return next(t for t in fig.data if t.name == name)


def test_study_view_draws_throughput_mfu_and_memory_with_explorer_links(store):
    view = studies_view.study_view(store, "h100-sweep", "plan_request")
    assert view.message == ""
    assert view.summary.startswith("Study h100-sweep: FSDP or TP=8 x FSDP for Llama 3 8B? "
                                   "4 points stored.")
    assert len(view.rows) == 4
    preds = {(r["n_chips"], r["point"].rsplit("plan=", 1)[1]): r
             for r in store.results(study="h100-sweep", kind="prediction")}
    titles = {"throughput": ("Throughput versus chips", "tokens/s (whole cluster)"),
              "mfu": ("MFU versus chips", "MFU (% of dense peak)"),
              "memory": ("Peak memory per rank versus chips", "memory per rank (GB)")}
    for key, (title, y_title) in titles.items():
        fig = view.figures[key]
        assert fig.layout.title.text == title
        assert fig.layout.xaxis.title.text == "chips (log2 scale)"
        assert fig.layout.yaxis.title.text == y_title
    for template in ("fsdp=*,mb=1", "tp=8,fsdp=*,mb=1"):
        for key, column, scale in (("throughput", "tokens_per_s", 1.0), ("mfu", "mfu", 100.0),
                                   ("memory", "memory_peak_bytes", 1e-9)):
            line = _trace(view.figures[key], f"{template} · predicted")
            assert list(line.x) == [8, 16]
            for chips, y, url in zip(line.x, line.y, line.customdata):
                pred = preds[(chips, template)]
                assert y == pred[column] * scale  # the figure multiplies by the same scale
                state, problems = from_query(url[1:])
                assert problems == []
                assert (state.model, state.cluster, state.chips, state.plan) == \
                    ("llama3-8b", "dgx-h100", chips, pred["plan"])


def test_study_view_series_auto_is_the_model_without_a_report_table(store):
    view = studies_view.study_view(store, "h100-sweep", studies_view.AUTO)
    names = [t.name for t in view.figures["mfu"].data]
    # one model: its best plan at each chip count is the line, the other plan faint markers
    assert names == ["llama3-8b · predicted", "llama3-8b · predicted (other plans)",
                     "llama3-8b · simulated", "llama3-8b · simulated (other plans)"]


def test_study_view_placeholders_for_unknown_and_unrun_studies(store, tmp_path):
    for name, words in ((None, "No study chosen"), ("nope", "'nope' is not in the store yet")):
        view = studies_view.study_view(store, name)
        assert words in view.summary and view.rows == []
        for fig in view.figures.values():
            assert fig.layout.title.text and fig.layout.xaxis.title.text \
                and fig.layout.yaxis.title.text and fig.data == ()
    with Store(tmp_path / "s.db") as s:
        s.save_study("empty", SMALL_STUDY.format(name="empty", chips="8"))
        assert studies_view.study_view(s, "empty").summary == "Study empty: no results yet."


def test_study_view_says_when_the_report_table_is_wrong(tmp_path):
    with Store(tmp_path / "s.db") as s:
        text = SMALL_STUDY.format(name="r", chips="8") + '[report]\nx = "nope"\n'
        assert studies_view.run_study_text(text, s).ok
        view = studies_view.study_view(s, "r")
    assert view.message.startswith("report.x: 'nope' must be one of chips, global_batch, seq")
    assert view.message.endswith("(drawn against chips, by model)")
    assert [t.name for t in view.figures["mfu"].data] == ["llama3-8b · predicted"]


def test_clicked_url_and_run_token():
    url = "/?model=llama3-8b&cluster=dgx-h100&chips=8&plan=fsdp%3D8"
    assert studies_view.clicked_url({"points": [{"customdata": url}]}) == url
    assert studies_view.clicked_url({"points": [{"customdata": [url]}]}) == url
    assert studies_view.clicked_url({"points": [{"x": 8}]}) is None
    assert studies_view.clicked_url({"points": [{"customdata": "javascript:x"}]}) is None
    assert studies_view.clicked_url(None) is None
    assert studies_view.current_name(studies_view.run_token("s1")) == "s1"
    assert studies_view.current_name("bare") == "bare"
    assert studies_view.current_name(None) is None


# -- validation_view ----------------------------------------------------------------------

@pytest.mark.parametrize("plan, kind", [
    ("dp=1", "single"), ("dp=2", "dp"), ("fsdp=8", "fsdp"), ("tp=8", "tp"), ("pp=4", "pp"),
    ("cp=2", "cp"), ("fsdp=4,ep=4", "ep"), ("fsdp=4,ep=2", "hybrid"), ("tp=2,dp=2", "hybrid"),
    ("dp=2,fsdp=2", "hybrid"), ("banana=3", "unknown")])
def test_plan_kind(plan, kind):
    assert validation_view.plan_kind(plan) == kind


@pytest.mark.parametrize("cluster, device, label", [
    ("dgx-h100", "NVIDIA H100 80GB HBM3", "dgx-h100 (NVIDIA H100 80GB HBM3)"),
    ("cpu", "cpu", "cpu"), ("cpu", None, "cpu"), (None, None, "unknown")])
def test_hardware_label(cluster, device, label):
    assert validation_view.hardware_label(cluster, device) == label


def test_validation_rows_pair_each_run_with_its_prediction_and_simulation(store):
    rows = validation_view.validation_rows(store)
    assert len(rows) == 1
    row = rows[0]
    m = store.results(kind="measurement")[0]
    pred, sim = store.get(m["prediction_id"]), store.get(m["simulation_id"])
    assert (row["id"], row["model"], row["family"], row["plan"], row["plan_kind"],
            row["hardware"], row["chips"], row["study"]) == \
        (m["id"], "llama-tiny", "llama", "dp=2,mb=2,dtype=fp32", "dp", "cpu", 2, "cpu-runs")
    assert row["predicted_mfu"] == pred["mfu"] and row["simulated_mfu"] == sim["mfu"]
    assert row["measured_step_s"] == m["step_time_s"]
    assert row["predicted_mfu_error"] == pred["mfu"] / m["mfu"] - 1
    assert row["simulated_step_error"] == sim["step_time_s"] / m["step_time_s"] - 1
    assert validation_view.count_text(rows) == \
        "1 measured run, 1 with a cost-model prediction, 1 with a simulation"


def test_validation_rows_fall_back_on_the_runners_own_prediction(tmp_path, store):
    m = store.results(kind="measurement")[0]
    with Store(tmp_path / "s.db") as s:
        s.save("measurement", model=m["model"], plan=m["plan"], cluster="cpu", n_chips=2,
               payload=m["payload"], device="cpu")
        s.save("measurement", model=m["model"], plan=m["plan"], cluster="cpu", n_chips=2,
               payload={"study_point": {}}, status="failed", error="rank 1 died")
        failed, ok = validation_view.validation_rows(s)  # newest first
    assert ok["predicted_mfu"] == m["payload"]["predicted"]["mfu"]
    assert ok["simulated_mfu"] is None and ok["simulated_mfu_error"] is None
    assert (failed["status"], failed["measured_mfu"], failed["predicted_mfu"]) == \
        ("failed", None, None)
    assert validation_view.count_text([failed, ok]) == \
        "2 measured runs (1 failed), 1 with a cost-model prediction, 0 with a simulation"
    table = validation_view.error_table([failed, ok])  # the failed run is left out
    assert [r["runs"] for r in table] == [1, 1, 1] and table[0]["simulator mean error (%)"] == ""


def test_error_table_groups_by_family_plan_kind_and_hardware(store):
    rows = validation_view.validation_rows(store)
    e = rows[0]["predicted_mfu_error"]
    table = validation_view.error_table(rows)
    assert [(r["grouped by"], r["group"], r["runs"]) for r in table] == \
        [("model family", "llama", 1), ("plan kind", "dp", 1), ("hardware", "cpu", 1)]
    assert table[0]["cost model mean |error| (%)"] == f"{100 * abs(e):.2f}"
    assert table[0]["cost model mean error (%)"] == f"{100 * e:+.1f}"


def test_accuracy_scatter_has_bands_the_diagonal_and_clickable_runs(store):
    rows = validation_view.validation_rows(store)
    fig = validation_view.accuracy_scatter(rows)
    assert [t.name for t in fig.data] == ["±20% error", "±10% error", "y = x (exact)",
                                          "cost model", "simulator"]
    assert fig.layout.xaxis.title.text == "measured MFU (% of dense peak)"
    assert fig.layout.yaxis.title.text == "predicted MFU (% of dense peak)"
    cost = _trace(fig, "cost model")
    assert list(cost.x) == [100 * rows[0]["measured_mfu"]]
    assert list(cost.y) == [100 * rows[0]["predicted_mfu"]]
    assert list(cost.customdata) == [rows[0]["id"]]
    diagonal = _trace(fig, "y = x (exact)")
    assert list(diagonal.x) == list(diagonal.y)
    empty = validation_view.accuracy_scatter([])
    assert empty.layout.title.text.endswith("no measured run has a prediction yet")
    assert validation_view.clicked_run({"points": [{"customdata": 7}]}) == 7
    assert validation_view.clicked_run({"points": [{"x": 1}]}) is None


def test_metric_units():
    units = {m: validation_view.metric_unit(m) for m in (
        "rss_bytes", "power_w", "energy_j", "cpu_process_pct", "sm_clock_mhz", "temperature_c",
        "load_avg_1m", "odd")}
    assert units == {"rss_bytes": ("GB", 1e-9), "power_w": ("W", 1.0), "energy_j": ("J", 1.0),
                     "cpu_process_pct": ("%", 1.0), "sm_clock_mhz": ("MHz", 1.0),
                     "temperature_c": ("°C", 1.0), "load_avg_1m": ("processes", 1.0),
                     "odd": ("value", 1.0)}


def test_drilldown_draws_step_times_and_every_sampled_metric(store):
    m = store.results(kind="measurement")[0]
    samples = store.samples(m["id"])
    steps, telemetry, line = validation_view.drilldown(store, m["id"])
    assert line.startswith(f"Run {m['id']}: llama-tiny dp=2,mb=2,dtype=fp32 on 2 x cpu, "
                           "status ok; median step ")
    bars = steps.data[0]
    step_samples = [s for s in samples if s["metric"] == "step_time_s"]
    assert len(step_samples) == 2  # [run] steps = 2
    assert list(bars.x) == [s["step"] for s in step_samples]
    assert list(bars.y) == [s["value"] for s in step_samples]
    assert steps.layout.yaxis.title.text == "step time (s)"
    metrics = sorted({s["metric"] for s in samples} - {"step_time_s", "step_start", "step_end"})
    assert "rss_bytes" in metrics
    assert [t.name for t in telemetry.data] == metrics
    rss = _trace(telemetry, "rss_bytes")
    assert list(rss.y) == [s["value"] * 1e-9 for s in samples if s["metric"] == "rss_bytes"]
    panel = metrics.index("rss_bytes") + 1
    axis = "yaxis" if panel == 1 else f"yaxis{panel}"
    assert telemetry.layout[axis].title.text == "GB"
    assert "rss_bytes (GB)" in [a.text for a in telemetry.layout.annotations]  # panel title
    for bad, words in ((m["prediction_id"], "is a prediction, not a measurement"),
                       (99999, "no result with id 99999"), (None, "choose a measured run")):
        steps, telemetry, line = validation_view.drilldown(store, bad)
        assert words in line and steps.layout.title.text and telemetry.layout.title.text


# -- reports_view -------------------------------------------------------------------------

def test_export_a_study_as_html_csv_and_parquet(store, tmp_path):
    name, data = reports_view.export(store, "h100-sweep", None, "html")
    assert name == "h100-sweep.html" and data.startswith(b"<!DOCTYPE html>")
    assert b"FSDP or TP=8 x FSDP for Llama 3 8B?" in data
    name, data = reports_view.export(store, "h100-sweep", [], "csv")
    frame = report.study_frame(store, "h100-sweep")
    got = pd.read_csv(io.BytesIO(data))
    assert name == "h100-sweep.csv" and list(got.columns) == list(frame.columns)
    assert list(got["id"]) == list(frame["id"])
    name, data = reports_view.export(store, "h100-sweep", None, "parquet")
    assert name == "h100-sweep.parquet" and data[:4] == b"PAR1"


def test_export_runs_as_csv(store):
    ids = [r["id"] for r in store.results(kind="measurement")]
    options = reports_view.run_options(store)
    assert [o["value"] for o in options] == ids  # only the measurement: the rest are in studies
    name, data = reports_view.export(store, None, ids, "csv")
    assert name == f"runs-{ids[0]}.csv"
    rows = list(csv.DictReader(io.StringIO(data.decode())))
    assert [int(r["id"]) for r in rows] == ids
    assert json.loads(rows[0]["payload"])["plan"] == "dp=2,mb=2,dtype=fp32"
    assert float(rows[0]["payload.predicted.mfu"]) == \
        store.get(ids[0])["payload"]["predicted"]["mfu"]


@pytest.mark.parametrize("study, runs, fmt, words", [
    (None, None, "csv", "choose a study or runs"),
    ("h100-sweep", [1], "csv", "choose a study or runs"),
    (None, [1], "html", "runs export as csv or parquet"),
    ("h100-sweep", None, "pdf", "format: 'pdf' must be one of html, csv, parquet"),
    (None, [99999], "csv", "no result with id 99999"),
    ("nope", None, "csv", "study 'nope' is not in the store")])
def test_export_refuses_bad_choices(store, study, runs, fmt, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        reports_view.export(store, study, runs, fmt)


def test_studies_table(store):
    rows = reports_view.studies_table(store)
    assert [r["study"] for r in rows] == ["cpu-runs", "h100-sweep"]  # newest first
    assert {k: rows[1][k] for k in ("question", "does", "results")} == \
        {"question": "FSDP or TP=8 x FSDP for Llama 3 8B?", "does": "predict, simulate",
         "results": 8}  # 4 points x (prediction, simulation)
    assert rows[0]["results"] == 3  # 1 point x (prediction, simulation, measurement)


def test_study_options_list_studies_with_results(store, tmp_path):
    assert [o["value"] for o in reports_view.study_options(store)] == ["cpu-runs", "h100-sweep"]
    with Store(tmp_path / "s.db") as s:
        s.save_study("empty", SMALL_STUDY.format(name="empty", chips="8"))
        assert reports_view.study_options(s) == []


# -- the pages in headless Chromium -------------------------------------------------------

@pytest.fixture(scope="module")
def app(store_path, tmp_path_factory):
    """(base URL, download folder) of `workbench app` over a copy of the module's store."""
    from browser_support import app_server

    folder = tmp_path_factory.mktemp("app-served")
    copy = folder / "store.db"
    src, dst = sqlite3.connect(store_path), sqlite3.connect(copy)
    src.backup(dst)
    src.close()
    dst.close()
    with app_server(copy) as url:
        yield url, folder / "downloads"


@pytest.fixture(scope="module")
def driver(app):
    """One headless Chromium for the module's browser tests (downloads into the app's
    download folder)."""
    from browser_support import chrome

    d = chrome(download_dir=app[1])
    yield d
    d.quit()


def _wait(driver, condition, timeout_s=60):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout_s, poll_frequency=0.2).until(condition)


def _plot_points(driver, graph_id):
    """[(trace name, number of points)] of a dcc.Graph, or None before it draws."""
    return driver.execute_script(
        f"const g = document.querySelector('#{graph_id} .js-plotly-plot');"
        "return g && g.data ? g.data.map(t => [t.name, (t.x || []).length]) : null;")


def _console_errors(driver) -> list[str]:
    """Severe browser-console messages since the last call (a failed callback logs one)."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "favicon" not in e["message"]]


def _type(driver, element_id, text):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    box = driver.find_element(By.ID, element_id)
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(text)


@pytest.mark.browser
def test_studies_page_runs_a_sweep_and_opens_a_point_in_the_explorer(app, driver):
    from browser_support import wait_for
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    url, _ = app
    driver.get(url + "/studies")
    wait_for(driver, "#studies-summary", 60, "Study cpu-runs")  # the newest stored study
    _type(driver, "studies-toml", "[study]\nname = ")
    driver.find_element(By.ID, "studies-run").click()
    wait_for(driver, "#studies-message", 60, "not valid TOML")  # in the page, no traceback
    _wait(driver, lambda d: d.find_element(By.ID, "studies-run").is_enabled())
    _type(driver, "studies-toml", SMALL_STUDY.format(name="browser-sweep", chips="8, 16, 32"))
    driver.find_element(By.ID, "studies-run").click()
    wait_for(driver, "#studies-progress-text", 60, "3/3 points")
    progress = driver.find_element(By.ID, "studies-progress")
    assert progress.get_attribute("value") == progress.get_attribute("max") == "3"
    wait_for(driver, "#studies-message", 60, "browser-sweep: 3 of 3 points run")
    _wait(driver, lambda d: _plot_points(d, "studies-throughput")
          == [["llama3-8b · predicted", 3]])
    assert _plot_points(driver, "studies-mfu") == [["llama3-8b · predicted", 3]]
    assert "Study browser-sweep" in driver.find_element(By.ID, "studies-summary").text
    points = driver.find_elements(By.CSS_SELECTOR, "#studies-mfu .scatterlayer .points path")
    assert len(points) == 3
    assert _console_errors(driver) == []
    ActionChains(driver).move_to_element(points[1]).click().perform()
    _wait(driver, lambda d: "model=" in d.current_url)
    state, problems = from_query(driver.current_url.split("?", 1)[1])
    assert (state.model, state.cluster, state.chips, state.plan, problems) == \
        ("llama3-8b", "dgx-h100", 16, "fsdp=16,gbs=32", [])
    driver.get_log("browser")  # the explorer page's own messages are its tests' business


@pytest.mark.browser
def test_validation_page_shows_the_stored_cpu_run(app, driver):
    from browser_support import wait_for
    from selenium.webdriver.common.by import By

    url, _ = app
    driver.get(url + "/validation")
    wait_for(driver, "#validation-count", 60,
             "1 measured run, 1 with a cost-model prediction, 1 with a simulation")
    _wait(driver, lambda d: _plot_points(d, "validation-scatter") is not None)
    drawn = dict(map(tuple, _plot_points(driver, "validation-scatter")))
    assert (drawn["cost model"], drawn["simulator"], drawn["y = x (exact)"]) == (1, 1, 2)
    wait_for(driver, "#validation-run-info", 60, "llama-tiny dp=2,mb=2,dtype=fp32 on 2 x cpu")
    _wait(driver, lambda d: (_plot_points(d, "validation-steps") or [[None, 0]])[0][1] == 2)
    _wait(driver, lambda d: "rss_bytes" in dict(map(tuple, _plot_points(
        d, "validation-samples") or [])))
    cells = driver.find_elements(By.CSS_SELECTOR, "#validation-errors td")
    assert {"llama", "dp", "cpu"} <= {c.text for c in cells}
    assert _console_errors(driver) == []


@pytest.mark.browser
def test_reports_page_downloads_a_report_and_a_csv(app, driver):
    from browser_support import wait_for
    from selenium.webdriver.common.by import By

    url, downloads = app
    driver.get(url + "/reports")
    chosen = wait_for(driver, "#reports-study", 60, " results)")  # the newest study
    study = chosen.text.split(" (")[0]
    assert study in ("cpu-runs", "h100-sweep", "browser-sweep")
    driver.find_element(By.ID, "reports-download-button").click()
    wait_for(driver, "#reports-message", 60, f"Downloaded {study}.html")
    page = _wait(driver, lambda d: _downloaded(downloads / f"{study}.html"))
    assert page.read_bytes().startswith(b"<!DOCTYPE html>")
    driver.find_element(By.CSS_SELECTOR, "#reports-format input[value='csv']").click()
    driver.find_element(By.ID, "reports-download-button").click()
    table = _wait(driver, lambda d: _downloaded(downloads / f"{study}.csv"))
    rows = list(csv.DictReader(io.StringIO(table.read_text())))
    assert rows and {r["study"] for r in rows} == {study}
    driver.find_element(By.CSS_SELECTOR, "#reports-study .dash-dropdown-clear").click()
    driver.find_element(By.ID, "reports-download-button").click()
    wait_for(driver, "#reports-message", 60, "choose a study or runs")
    assert driver.find_element(By.ID, "reports-message").get_attribute("class") == "error"
    assert _console_errors(driver) == []


def _downloaded(path: Path) -> Path | bool:
    """The file once Chromium has finished writing it (non-empty, no partial file left)."""
    partial = path.with_name(path.name + ".crdownload")
    if path.is_file() and path.stat().st_size > 0 and not partial.exists():
        time.sleep(0.1)  # one more look: the size must have settled
        return path if path.stat().st_size > 0 and not partial.exists() else False
    return False
