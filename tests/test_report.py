"""Study reports (workbench/report.py): frames, figures, HTML, CSV, Parquet, the command, and
the HTML page in a real headless browser.

One small real study per module: Llama 3 8B under FSDP on 8, 16 and 32 H100s (predicted and
simulated), an unsharded plan that does not fit (predicted), a plan the cost model rejects
(a failed prediction), and llama-tiny trained for real on 2 CPU ranks (predicted, simulated,
measured).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil

import pandas as pd
import pytest
from plotly.offline import get_plotlyjs

from workbench import costmodel, hardware, report, report_figures, simulator
from workbench.runner import run
from workbench.store import COLUMNS, Store

STUDY = "llama-scaling"
QUESTION = "How do tokens/s & MFU of Llama 3 8B under FSDP scale from 8 to 32 H100s <really>?"
DEFINITION = f"""
[study]
name = "{STUDY}"
question = "{QUESTION}"
do = ["predict", "simulate", "run"]

[report]
x = "chips"
series = "model"
timelines = ["h100-16-fsdp", "cpu-2-dp"]
"""
H100_POINTS = (("h100-8-fsdp", 8, "fsdp=8,mb=1,gbs=16", ("prediction", "simulation")),
               ("h100-16-fsdp", 16, "fsdp=16,mb=1,gbs=32", ("prediction", "simulation")),
               ("h100-32-fsdp", 32, "fsdp=32,mb=1,gbs=64", ("prediction", "simulation")),
               ("h100-8-ddp", 8, "dp=8,mb=1,gbs=16", ("prediction",)))
BAD_PLAN = "tp=16,gbs=16"  # kv_heads 8 is not divisible by tp 16: the cost model refuses it


def _point(model, cluster, chips, plan, gbs, label):
    return {"model": model, "overrides": {}, "cluster": cluster, "chips": chips,
            "global_batch": gbs, "seq": None, "plan": plan, "plan_request": plan,
            "variant": {}, "label": label}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """(store, measurement) of the module's study, stored as the study runner stores it."""
    path = tmp_path_factory.mktemp("report") / "store.db"
    store = Store(path)
    store.save_study(STUDY, DEFINITION)
    graph = costmodel.graph("llama3-8b")
    for key, chips, plan, kinds in H100_POINTS:
        cl = hardware.cluster("dgx-h100", chips)
        est = costmodel.estimate(graph, plan, cl)
        sp = _point("llama3-8b", "dgx-h100", chips, est.plan, 2 * chips, key)
        pred = store.save("prediction", model="llama3-8b", plan=est.plan, cluster=cl.name,
                          n_chips=chips, payload={**est.to_json(), "study_point": sp},
                          study=STUDY, point=key)
        if "simulation" in kinds:
            sim = simulator.simulate(graph, plan, cl)
            store.save("simulation", model="llama3-8b", plan=sim.plan, cluster=cl.name,
                       n_chips=chips, payload={**sim.to_json(), "study_point": sp},
                       prediction_id=pred, study=STUDY, point=key)
    with pytest.raises(ValueError) as err:
        costmodel.estimate(graph, BAD_PLAN, hardware.cluster("dgx-h100", 16))
    store.save("prediction", model="llama3-8b", plan=BAD_PLAN, cluster="dgx-h100", n_chips=16,
               payload={"study_point": _point("llama3-8b", "dgx-h100", 16, BAD_PLAN, 16,
                                              "h100-16-tp16")},
               status="failed", error=str(err.value), study=STUDY, point="h100-16-tp16")
    out = run("llama-tiny", "dp=2,gbs=2,dtype=fp32", 2, steps=2, warmup=1, timeout_s=60)
    samples = out.pop("samples")
    tiny = costmodel.graph("llama-tiny")
    cpu = hardware.load_cpu_cluster(2)
    sp = _point("llama-tiny", "cpu", 2, out["plan"], 2, "cpu-2-dp")
    common = dict(model="llama-tiny", plan=out["plan"], cluster="cpu", n_chips=2, study=STUDY,
                  point="cpu-2-dp")
    pred = store.save("prediction", payload={**out["predicted"], "study_point": sp}, **common)
    sim = simulator.simulate(tiny, out["plan"], cpu)
    sim_id = store.save("simulation", payload={**sim.to_json(), "study_point": sp},
                        prediction_id=pred, **common)
    store.save("measurement", payload={**out, "study_point": sp}, prediction_id=pred,
               simulation_id=sim_id, device="cpu", samples=samples, **common)
    yield store, out
    store.close()


def test_frame_has_every_stored_column_and_the_flattened_payload(study):
    store, _ = study
    frame = report.study_frame(store, STUDY)
    # 3 FSDP points x 2 kinds + 1 DDP prediction + 1 failed prediction + 3 CPU kinds = 11 rows
    assert len(frame) == 11
    assert list(frame.columns[:len(COLUMNS) + 1]) == [*COLUMNS, "payload"]
    assert list(frame["id"]) == sorted(frame["id"])  # oldest first
    for field in ("model", "overrides", "cluster", "chips", "global_batch", "seq", "plan",
                  "plan_request", "variant", "label"):
        assert f"study_point.{field}" in frame.columns
    row = frame[(frame["point"] == "h100-8-fsdp") & (frame["kind"] == "prediction")].iloc[0]
    payload = json.loads(row["payload"])
    assert row["payload.memory.weights_bytes"] == payload["memory"]["weights_bytes"]
    assert row["payload.breakdown_s.compute_s"] == payload["breakdown_s"]["compute_s"]
    assert json.loads(row["payload.comm"]) == payload["comm"]  # lists stay JSON text
    assert row["study_point.chips"] == 8 and row["study_point.global_batch"] == 16
    measured = frame[frame["kind"] == "measurement"].iloc[0]
    assert measured["payload.predicted.mfu"] == json.loads(measured["payload"])["predicted"]["mfu"]


def test_csv_and_parquet_carry_every_column(study, tmp_path):
    store, _ = study
    frame = report.study_frame(store, STUDY)
    csv = pd.read_csv(report.write_report(store, STUDY, "csv", tmp_path / "s.csv"))
    assert list(csv.columns) == list(frame.columns)
    assert len(csv) == len(frame)
    assert list(csv["id"]) == list(frame["id"])
    assert list(csv["payload"]) == list(frame["payload"])
    pd.testing.assert_series_equal(csv["step_time_s"], frame["step_time_s"])
    parquet = pd.read_parquet(report.write_report(store, STUDY, "parquet", tmp_path / "s.pq"))
    assert list(parquet.columns) == list(frame.columns)
    assert _cells(parquet) == _cells(report._parquet_ready(frame))
    for column in frame.columns:  # floats survive CSV exactly
        if frame[column].dtype == "float64":
            assert _cells(csv[[column]]) == _cells(frame[[column]]), column


def _cells(df):
    """Every cell, with None, NaN and NA all read as None (Parquet and pandas differ there)."""
    return {c: [None if v is None or (not isinstance(v, str) and pd.isna(v)) else v
                for v in df[c].astype(object)] for c in df.columns}


def test_figures_hold_the_stored_numbers(study):
    store, out = study
    frame = report.study_frame(store, STUDY)
    fig = report_figures.throughput_figure(frame, "chips", "model")
    assert fig.layout.xaxis.type == "log" and list(fig.layout.xaxis.tickvals) == [2, 8, 16, 32]
    line = next(t for t in fig.data if t.name == "llama3-8b · predicted")
    pred = frame[(frame["kind"] == "prediction") & (frame["status"] == "ok")
                 & (frame["model"] == "llama3-8b")]
    fsdp = pred[pred["plan"].str.startswith("fsdp")].sort_values("n_chips")
    assert list(line.x) == [8, 16, 32]  # the line runs through the plan that fits at 8 chips
    assert list(line.y) == list(fsdp["tokens_per_s"])
    other = next(t for t in fig.data if t.name == "llama3-8b · predicted (other plans)")
    assert list(other.x) == [8] and "does NOT fit" in other.hovertext[0]
    measured = next(t for t in fig.data if t.name == "llama-tiny · measured")
    assert list(measured.y) == [out["tokens_per_s"]]
    mfu = report_figures.mfu_figure(frame, "chips", "model")
    tiny = next(t for t in mfu.data if t.name == "llama-tiny · measured")
    assert list(tiny.y) == [out["mfu"] * 100]
    memory = report_figures.memory_figure(frame)
    bars = [t for t in memory.data if t.type == "bar"]
    assert [t.name for t in bars] == ["weights", "grads", "optimizer", "activations",
                                      "fsdp buffer", "framework"]
    # 5 points carry a memory breakdown: 3 FSDP, the DDP one, the CPU one (not the failed one)
    assert list(bars[0].x) == ["h100-8-fsdp", "h100-16-fsdp", "h100-32-fsdp", "h100-8-ddp",
                               "cpu-2-dp"]
    capacity = next(t for t in memory.data if t.name == "chip memory")
    h100 = json.loads(pred.iloc[0]["payload"])["memory"]["capacity_bytes"]
    assert capacity.y[0] == h100 / 1e9
    peak = next(t for t in memory.data if t.name.startswith("measured peak"))
    assert list(peak.y) == [out["memory_peak_bytes"] / 1e9]
    accuracy = report_figures.accuracy_figure(frame)
    cost = [t for t in accuracy.data if t.name == "cost model"]
    # MFU (first subplot): x = measured %, y = the linked prediction's %
    assert list(cost[0].x) == [out["mfu"] * 100]
    assert list(cost[0].y) == [out["predicted"]["mfu"] * 100]
    assert list(cost[1].x) == [out["step_time_s"]]
    bands = [t for t in accuracy.data if t.fill == "toself"]
    assert len(bands) == 4  # ±20% and ±10% on each of the two subplots
    lo, hi = bands[0].x[0], bands[0].x[1]
    assert list(bands[0].y[:4]) == pytest.approx([lo * 0.8, hi * 0.8, hi * 1.2, lo * 1.2])


def test_accuracy_figure_is_absent_without_measurements(study):
    store, _ = study
    frame = report.study_frame(store, STUDY)
    assert report_figures.accuracy_figure(frame[frame["kind"] != "measurement"]) is None


def test_timeline_re_simulates_the_stored_step(study):
    store, _ = study
    frame = report.study_frame(store, STUDY)
    fig, caption = report_figures.timeline_figure(frame, "h100-16-fsdp")
    assert {t.name for t in fig.data} >= {"compute", "comm"}
    assert "(the same)" in caption  # deterministic: the stored simulation's step time again
    with pytest.raises(ValueError, match="report.timelines"):
        report_figures.timeline_figure(frame, "no-such-point")


def test_html_report_is_self_contained(study):
    store, _ = study
    page = report.html_report(store, STUDY)
    assert "How do tokens/s &amp; MFU of Llama 3 8B" in page and "&lt;really&gt;" in page
    # 4 figures + 2 timelines
    for div in ("fig-throughput", "fig-mfu", "fig-memory", "fig-accuracy", "fig-timeline-0",
                "fig-timeline-1"):
        assert f'id="{div}"' in page
    assert page.count("Plotly.newPlot(") == 6
    assert page.count("* plotly.js v") == 1  # the library inlined once
    assert page.count(get_plotlyjs()) == 1
    ours = page.replace(get_plotlyjs(), "")  # the library's own map attribution strings aside
    assert not re.search(r"<script[^>]*\bsrc\s*=", ours, re.I)
    assert not re.search(r"<link\b", ours, re.I)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", ours, re.I)
    assert not re.search(r"url\(\s*[\"']?\s*(https?:)?//", ours, re.I)
    assert "h100-16-tp16" in page and "kv_heads" in page  # the failure table
    assert "<h2>Measured against predicted</h2>" in page


def test_report_config_errors(study):
    store, _ = study
    frame = report.study_frame(store, STUDY)
    with pytest.raises(ValueError, match=r"report\.x: 'layerz'"):
        report.report_config({"report": {"x": "layerz"}}, frame)
    assert report.report_config({"report": {"x": "layers"}}, frame).x == "layers"
    with pytest.raises(ValueError, match=r"report\.series: 'colour'"):
        report.report_config({"report": {"series": "colour"}}, frame)
    with pytest.raises(ValueError, match=r"report\.timelines: point 'nope'"):
        report.report_config({"report": {"timelines": ["nope"]}}, frame)
    default = report.report_config({"study": {"question": "?"}}, frame)
    assert default == report.ReportConfig(x="chips", series="model", timelines=None)
    assert report.timeline_points(frame, default) == ("h100-8-fsdp",)  # first simulated point
    assert report.timeline_points(frame[frame["kind"] != "simulation"], default) == ()
    with pytest.raises(ValueError, match=r"report\.width: unknown key"):
        report.report_config({"report": {"width": 3}}, frame)


def test_bad_format_unknown_and_empty_study(study, tmp_path):
    store, _ = study
    with pytest.raises(ValueError, match="format 'pdf' must be one of html, csv, parquet"):
        report.write_report(store, STUDY, "pdf", tmp_path / "x.pdf")
    with pytest.raises(ValueError, match=f"study 'nope' is not in the store .*{STUDY}"):
        report.write_report(store, "nope", "csv", tmp_path / "x.csv")
    with Store(tmp_path / "empty.db") as empty:
        empty.save_study("empty", '[study]\nname = "empty"\nquestion = "?"\ndo = ["predict"]\n')
        with pytest.raises(ValueError, match="'empty' has no results yet"):
            report.html_report(empty, "empty")


def test_command(study, tmp_path, capsys):
    store, _ = study
    parser = argparse.ArgumentParser(prog="workbench")
    report.add_command(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "r.csv"
    args = parser.parse_args(["report", STUDY, "--format", "csv", "--out", str(out),
                              "--store", str(store.path)])
    assert args.func(args) == 0 and f"wrote {out}" in capsys.readouterr().out
    assert len(pd.read_csv(out)) == 11
    bad = parser.parse_args(["report", STUDY, "--format", "xls", "--store", str(store.path)])
    with pytest.raises(ValueError, match="--format: 'xls'"):
        bad.func(bad)
    missing = parser.parse_args(["report", STUDY, "--store", str(tmp_path / "none.db")])
    with pytest.raises(ValueError, match="--store: no store"):
        missing.func(missing)
    assert not (tmp_path / "none.db").exists()


@pytest.mark.browser
def test_every_figure_renders_in_headless_chromium(study, tmp_path):
    """Open the report from a file with the network off; every plotly div draws its traces."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    for binary in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        if shutil.which(binary) is None:
            pytest.skip(f"{binary} is not installed")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    store, _ = study
    page = report.write_report(store, STUDY, "html", tmp_path / "report.html")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.set_network_conditions(offline=True, latency=0, download_throughput=0,
                                      upload_throughput=0)
        driver.get(page.resolve().as_uri())
        script = """return Array.from(document.querySelectorAll('.js-plotly-plot')).map(d =>
            [d.id, d.querySelectorAll('svg.main-svg').length,
             d.querySelectorAll('g.trace').length, (d.data || []).length])"""
        WebDriverWait(driver, 60).until(lambda d: len(d.execute_script(script)) == 6)
        plots = driver.execute_script(script)
        assert sorted(p[0] for p in plots) == sorted(
            ["fig-throughput", "fig-mfu", "fig-memory", "fig-accuracy", "fig-timeline-0",
             "fig-timeline-1"])
        for div, svgs, traces, data in plots:
            assert svgs >= 1, div
            assert data >= 1 and traces >= 1, div
        requests = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
        urls = [m["params"]["request"]["url"] for m in requests
                if m["method"] == "Network.requestWillBeSent"]
        assert [u for u in urls if not u.startswith(("file:", "data:", "blob:"))] == []
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
    finally:
        driver.quit()


def test_log2_axis_rule():
    assert report_figures._log2_axis([2, 8, 32], "chips")
    assert report_figures._log2_axis([256, 512, 1024], "global_batch")
    assert not report_figures._log2_axis([256, 512], "global_batch")  # fewer than 3 values
    assert not report_figures._log2_axis([256, 384, 512], "seq")  # 384 is not a power of two
    assert math.isclose(report_figures.BYTES_PER_GB, 1e9)
