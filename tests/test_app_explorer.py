"""The plan explorer: its pure view functions, then the page in headless Chromium."""
from __future__ import annotations

import time
from urllib.parse import parse_qs, urlparse

import pytest

from workbench import costmodel, hardware
from workbench.app import explorer_view as view
from workbench.app import plan_form as form
from workbench.app.urls import ExplorerState, from_query, to_query
from workbench.plan import Plan

# Llama 3 8B at sequence 2,048 on two DGX H100 nodes: TP 8 inside each node (NVLink), DP 2
# across the two nodes (one rack).
STATE = ExplorerState("llama3-8b", {"seq": "2048"}, "dgx-h100", 16, "tp=8,dp=2,gbs=32,sp=true")


@pytest.fixture(scope="module")
def reference():
    """The cost model's own estimate of STATE."""
    graph = costmodel.graph("llama3-8b", seq=2048)
    return costmodel.estimate(graph, Plan.parse(STATE.plan), hardware.cluster("dgx-h100", 16))


# -- the cost model's numbers -----------------------------------------------------------------

def test_headlines_come_straight_from_the_estimate(reference):
    v = view.explore(STATE)
    assert v.reasons == [] and v.violations == []
    assert v.estimate.to_json() == reference.to_json()
    cards = {h.id: h for h in v.headlines}
    assert list(cards) == ["explorer-step-time", "explorer-mfu", "explorer-hfu",
                           "explorer-throughput", "explorer-tflops", "explorer-peak-memory"]
    assert cards["explorer-step-time"].value == f"{reference.step_time_s * 1e3:.2f} ms"
    assert cards["explorer-mfu"].value == f"{100 * reference.mfu:.1f}%"
    assert cards["explorer-hfu"].value == f"{100 * reference.hfu:.1f}%"
    assert cards["explorer-tflops"].value == f"{reference.model_tflops_per_chip:.1f}"
    assert cards["explorer-throughput"].value.endswith(" tokens/s")
    # weights per rank: (8,030,261,248 - 266,240 replicated norm weights) / 8 + 266,240
    # = 1,004,015,616 parameters x 2 bytes = 2,008,031,232 bytes -> "2.0 GB"; the 65 norms of
    # 4,096 (2 per block x 32 + the final one) = 266,240 are not split by TP.
    assert reference.memory.weights_bytes == 2_008_031_232
    assert cards["explorer-peak-memory"].value == f"{reference.memory.peak_bytes / 1e9:.1f} GB"
    assert cards["explorer-peak-memory"].detail == "of 80.0 GB: fits"  # H100 SXM: 80 GB
    assert cards["explorer-peak-memory"].good


def test_memory_figure_stacks_each_part_against_the_chip(reference):
    fig = view.explore(STATE).memory_figure
    bars = {t.name: t.x[0] for t in fig.data}
    assert list(bars) == ["weights", "grads", "optimizer", "activations", "fsdp buffer",
                          "framework"]
    assert bars["weights"] == 2_008_031_232 / 1e9          # bf16 weights (above)
    assert bars["grads"] == 2_008_031_232 / 1e9            # bf16 gradients: 2 bytes each
    assert bars["optimizer"] == 12_048_187_392 / 1e9       # Adam: 1,004,015,616 x 12 bytes
    assert bars["framework"] == 2 * 2**30 / 1e9            # the fixed 2 GiB allowance
    assert bars["activations"] == reference.memory.activations_bytes / 1e9
    assert sum(bars.values()) == pytest.approx(reference.memory.peak_bytes / 1e9, rel=1e-12)
    assert fig.layout.shapes[0].x0 == 80.0                 # the chip's 80 GB line
    assert fig.layout.title.text and fig.layout.xaxis.title.text == "memory per rank (GB)"


def test_breakdown_charges_communication_to_the_level_it_crosses(reference):
    parts = view.breakdown_parts(reference, ("node", "rack", "cluster"))
    b = reference.breakdown_s
    assert list(parts) == ["compute", "recompute", "comm: node", "comm: rack", "comm: cluster",
                           "pipeline bubble", "optimizer"]
    assert parts["compute"][0] == b["compute_s"]
    assert parts["comm: node"][0] == b["tp_comm_s"]       # TP 8 = one node's 8 GPUs
    assert parts["comm: rack"][0] == b["dp_exposed_s"]    # DP 2 = two nodes of one rack
    assert parts["comm: cluster"][0] == 0.0
    assert parts["comm: node"][1].startswith("tp ")
    assert parts["pipeline bubble"][0] == 0.0             # no pipeline
    assert sum(s for s, _ in parts.values()) == pytest.approx(reference.step_time_s, rel=1e-12)
    fig = view.explore(STATE).breakdown_figure
    assert [t.name for t in fig.data] == [k for k, (s, _) in parts.items() if s > 0]
    assert fig.layout.xaxis.title.text == "time per step (s)"


def test_a_part_over_two_levels_is_split_by_time_per_step():
    # HSDP: the FSDP reduce-scatter inside a node and the replica all-reduce across nodes
    # share the exposed DP reduction in proportion to seconds x calls.
    graph = costmodel.graph("llama3-8b", seq=2048)
    est = costmodel.estimate(graph, "fsdp=8,dp=2,gbs=16", hardware.cluster("dgx-h100", 16))
    reduction = [c for c in est.comm if c.kind in ("all_reduce", "reduce_scatter")]
    weights = {c.level: c.seconds * c.count_per_step for c in reduction}
    assert set(weights) == {"node", "rack"}
    parts = view.breakdown_parts(est, ("node", "rack", "cluster"))
    gathers = est.breakdown_s["fsdp_exposed_s"]          # FSDP gathers: inside the node
    share = weights["node"] / (weights["node"] + weights["rack"])
    assert parts["comm: node"][0] == pytest.approx(gathers + est.breakdown_s["dp_exposed_s"]
                                                   * share, rel=1e-12)
    assert sum(s for s, _ in parts.values()) == pytest.approx(est.step_time_s, rel=1e-12)


def test_a_plan_that_does_not_fit_says_so():
    v = view.explore(ExplorerState("llama3-70b", {}, "dgx-h100", 8, "tp=8"))
    assert v.estimate is not None and not v.estimate.memory.fits
    assert len(v.reasons) == 1 and v.reasons[0].startswith("does not fit: ")
    assert "over the chip's 80.0 GB" in v.reasons[0]
    assert not {h.id: h for h in v.headlines}["explorer-peak-memory"].good


# -- impossible plans and bad inputs ----------------------------------------------------------

def test_an_impossible_plan_names_every_rule():
    v = view.explore(ExplorerState("llama3-8b", {"seq": "2048"}, "dgx-h100", 8,
                                   "tp=3,pp=4,dp=2,sp=true"))
    assert v.estimate is None and v.headlines == []
    assert [x.rule for x in v.violations] == [
        "degrees multiply to the world size",               # 2 x 3 x 4 = 24 != 8
        "TP divides attention heads",                       # 32 % 3 = 2
        "TP divides key/value heads",                       # 8 % 3 = 2
        "SP splits each sequence (CP shard) over the TP ranks, so tp divides seq / cp"]
    assert v.reasons[1] == "tp=3 must divide heads=32 (rule: TP divides attention heads; change tp)"
    assert "the plan is impossible" in v.memory_figure.layout.title.text
    assert v.breakdown_figure.layout.xaxis.title.text == "time per step (s)"


def test_text_errors_of_the_plan_are_violations_too():
    v = view.explore(ExplorerState("llama3-8b", {}, "dgx-h100", 8, "tp=2.5,foo=1"))
    assert [x.field for x in v.violations] == ["tp", "foo"]
    assert "tp=2.5 is not an integer" in v.reasons[0]


@pytest.mark.parametrize("inputs, expected", [
    (("llama3-8b", "seq=2048", "dgx-h100", "", 0, "dp=1"), "chips: 0 is not a positive"),
    (("llama3-8b", "seq=2048", "dgx-h100", "", None, "dp=1"), "chips: None is not a positive"),
    (("llama3-8b", "seq=2048", "dgx-h100", "", 2.5, "dp=1"), "chips: 2.5 is not a positive"),
    (("llama3-8b", "seq", "dgx-h100", "", 8, "dp=8"), "overrides: 'seq' is not key=value"),
    (("llama3-8b", "", None, "", 8, "dp=8"), "cluster: pick a preset"),
    ((None, "", "dgx-h100", "", 8, "dp=8"), "model: pick a model"),
])
def test_unreadable_controls_are_messages(inputs, expected):
    state, messages = view.state_from_inputs(*inputs)
    assert state is None and messages[0].startswith(expected)
    v = view.explore(state, messages)
    assert v.estimate is None and v.reasons == messages and v.query is None


@pytest.mark.parametrize("state, expected", [
    (ExplorerState("llama9", {}, "dgx-h100", 8, "dp=8"), "model: unknown model 'llama9'"),
    (ExplorerState("llama3-8b", {"depth": "4"}, "dgx-h100", 8, "dp=8"),
     "overrides: LlamaConfig has no field 'depth'"),
    (ExplorerState("llama3-8b", {}, "dgx-x", 8, "dp=8"), "cluster: unknown cluster preset"),
    (ExplorerState("llama3-8b", {}, "/nonexistent/c.toml", 8, "dp=8"),
     "cluster: cannot read '/nonexistent/c.toml'"),
    (ExplorerState("llama-tiny", {}, "cpu", 4096, "dp=4096"), "cluster: cpu cluster: n_chips"),
])
def test_a_model_or_cluster_that_cannot_load_is_a_message(state, expected):
    v = view.explore(state)
    assert v.estimate is None and v.violations == []
    assert v.reasons[0].startswith(expected), v.reasons
    assert view.timeline(state).message.startswith("no timeline: " + expected)
    assert view.search_table(state).message.startswith("no search: " + expected)


# -- the URL and the plan controls ------------------------------------------------------------

def test_controls_to_url_and_back():
    state, messages = view.state_from_inputs("llama3-8b", "seq=2048, layers=8", "dgx-h100", "",
                                             16.0, " tp=8,dp=2,gbs=32 ")
    assert messages == []
    assert state == ExplorerState("llama3-8b", {"seq": "2048", "layers": "8"}, "dgx-h100", 16,
                                  "tp=8,dp=2,gbs=32")
    query = view.explore(state).query
    assert query == to_query(state)
    assert parse_qs(query[1:])["set"] == ["seq=2048,layers=8"]
    assert from_query(query) == (state, [])
    controls = view.inputs_from_state(state)
    again, _ = view.state_from_inputs(*(controls[k] for k in (
        "model", "overrides", "cluster", "cluster_file", "chips", "plan")))
    assert again == state
    assert controls["tp"] == 8 and controls["dp"] == 2 and controls["gbs"] == 32


def test_a_cluster_file_wins_over_the_preset_and_survives_the_url(tmp_path):
    path = tmp_path / "mine.toml"
    hardware.save_cluster(hardware.cluster("dgx-a100", 16), path)
    state, _ = view.state_from_inputs("llama3-8b", "seq=2048", "dgx-h100", str(path), 16,
                                      "tp=8,dp=2,gbs=32,sp=true")
    assert state.cluster == str(path)
    v = view.explore(state)
    assert v.estimate.cluster == "dgx-a100" and v.estimate.memory.capacity_bytes == 80e9
    controls = view.inputs_from_state(from_query(v.query)[0])
    assert controls["cluster_file"] == str(path) and controls["cluster"] == "dgx-h100"


def test_plan_controls_and_text_follow_each_other():
    text = "tp=8,pp=4,dp=32,gbs=1024,sp=true,recompute=selective,order=tp-cp-dp-fsdp-pp"
    fields = form.plan_fields(text)
    assert fields == {"dp": 32, "fsdp": 1, "tp": 8, "pp": 4, "vpp": 1, "cp": 1, "ep": 1,
                      "mb": 1, "gbs": 1024, "zero": 0, "recompute": "selective",
                      "schedule": "auto", "dtype": "bf16", "sp": ["on"]}
    fields.update(tp=4.0, dp=64, sp=[])
    # KEYS order, defaults left out, the key with no control (order) kept from the old text
    assert form.plan_text(fields, text) == \
        "dp=64,tp=4,pp=4,gbs=1024,recompute=selective,order=tp-cp-dp-fsdp-pp"
    assert form.plan_text(form.FIELD_DEFAULTS, "") == "dp=1"
    assert form.plan_text({**form.FIELD_DEFAULTS, "tp": 2.5}, "") == "tp=2.5"  # Plan.parse names it
    assert "tp" not in form.plan_fields("tp=x,pp=2")     # a malformed value leaves the control
    assert form.plan_fields("tp=x,pp=2")["pp"] == 2
    assert Plan.parse(form.plan_text(form.plan_fields(text), text)) == Plan.parse(text)


# -- the simulator and the search -------------------------------------------------------------

def test_timeline_is_the_simulated_step():
    t = view.timeline(STATE)
    assert t.message == "" and t.summary.startswith("simulated step ")
    assert {tr.name for tr in t.figure.data} >= {"compute", "comm"}
    assert t.figure.layout.xaxis.title.text == "time (ms)"
    assert "one rank per pipeline stage" in t.figure.layout.title.text
    bad = view.timeline(ExplorerState("llama3-8b", {}, "dgx-h100", 8, "tp=3"))
    assert bad.message == "no timeline: the plan is impossible (see above)"
    assert view.timeline(None).message == "no timeline: the inputs have problems"


def test_search_table_lists_the_fastest_plans_that_fit():
    state = ExplorerState("llama3-8b", {"seq": "2048"}, "dgx-h100", 8, "tp=2,dp=4,gbs=32")
    table = view.search_table(state, top=5)
    graph = costmodel.graph("llama3-8b", seq=2048)
    best = costmodel.search(graph, hardware.cluster("dgx-h100", 8), 8, 32).top(5)
    assert [r["step_time_s"] for r in table.rows] == [b["step_time_s"] for b in best]
    assert [r["rank"] for r in table.rows] == [1, 2, 3, 4, 5]
    for row, b in zip(table.rows, best):
        plan = Plan.parse(row["plan"])
        assert row["id"] == row["plan"] and plan.global_batch_size == 32  # gbs pinned
        assert plan == Plan.parse(b["plan"]) and plan.world_size == 8
        assert row["mfu_percent"] == 100 * b["mfu"]
        assert row["memory_gb"] == b["memory_peak_bytes"] / 1e9 and row["memory_gb"] <= 80
    assert [c["id"] for c in table.columns] == ["rank", "plan", "step_time_s", "throughput",
                                                "mfu_percent", "tflops_per_chip", "memory_gb"]
    assert table.columns[3]["name"] == "tokens/s"
    assert "valid plans evaluated" in table.message


def test_search_keeps_the_batch_of_an_impossible_plan_or_asks_for_one():
    impossible = ExplorerState("llama3-8b", {"seq": "2048"}, "dgx-h100", 8, "tp=3,gbs=16")
    assert all(Plan.parse(r["plan"]).global_batch_size == 16
               for r in view.search_table(impossible, top=3).rows)
    unreadable = ExplorerState("llama3-8b", {}, "dgx-h100", 8, "tp=3,foo=2")
    assert view.search_table(unreadable).message.startswith("no search: the plan text has no "
                                                            "readable global batch")
    too_big = ExplorerState("llama3-70b", {}, "dgx-h100", 8, "dp=8,gbs=8")
    assert view.search_table(too_big).message.startswith("no plan fits")


# -- the page in headless Chromium ------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """(driver, base URL) of the app served over an empty store (the explorer needs none)."""
    from browser_support import app_server, chrome
    driver = chrome(height=1600)
    try:
        with app_server(tmp_path_factory.mktemp("explorer") / "store.db") as url:
            yield driver, url
    finally:
        driver.quit()


def _text(driver, css: str) -> str:
    from selenium.webdriver.common.by import By
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0].text if found else ""


def _until(driver, condition, timeout_s: float = 30.0):
    """Wait for `condition(driver)` to be truthy; its value."""
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout_s, poll_frequency=0.2).until(condition)


def _type(driver, element_id: str, text: str) -> None:
    """Replace an input's text (select all, type), as a user would."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    box = driver.find_element(By.ID, element_id)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(text)


@pytest.mark.browser
def test_page_changes_with_the_plan_and_explains_an_impossible_one(browser):
    from browser_support import wait_for
    from selenium.webdriver.common.by import By
    driver, url = browser
    driver.get(url + "/" + to_query(STATE))
    first = wait_for(driver, "#explorer-step-time .value", 60).text
    assert first.endswith(" ms") and _text(driver, "#explorer-peak-memory .detail") == \
        "of 80.0 GB: fits"
    assert driver.find_element(By.ID, "explorer-plan-tp").get_attribute("value") == "8"
    _type(driver, "explorer-plan-tp", "4")                      # 4 x 2 = 8 ranks, not 16
    errors = wait_for(driver, "#explorer-errors", 20, text="must equal world_size=16")
    assert "This plan is impossible" in errors.text and "degrees multiply" in errors.text
    assert driver.find_element(By.ID, "explorer-plan").get_attribute("value") == \
        "dp=2,tp=4,gbs=32,sp=true"
    _type(driver, "explorer-plan-dp", "4")                      # 4 x 4 = 16: possible again
    second = _until(driver, lambda d: (t := _text(d, "#explorer-step-time .value")) != first
                    and t)
    assert not driver.find_element(By.ID, "explorer-errors").is_displayed()
    assert second.endswith(" ms")
    query = parse_qs(urlparse(driver.current_url).query)      # the URL follows the inputs
    assert query["plan"] == ["dp=4,tp=4,gbs=32,sp=true"] and query["set"] == ["seq=2048"]
    driver.get(driver.current_url)                             # a copied URL reopens the view
    assert wait_for(driver, "#explorer-step-time .value", 30).text == second
    assert driver.find_element(By.ID, "explorer-plan-dp").get_attribute("value") == "4"


@pytest.mark.browser
def test_timeline_renders_and_best_plans_load_into_the_page(browser):
    from browser_support import wait_for
    from selenium.webdriver.common.by import By
    driver, url = browser
    driver.get(url + "/" + to_query(ExplorerState("llama3-8b", {"seq": "2048"}, "dgx-h100", 8,
                                                  "tp=8,gbs=8,recompute=full")))
    wait_for(driver, "#explorer-timeline-figure .bars path", 60)
    assert _text(driver, "#explorer-timeline-status").startswith("simulated step ")
    plan_box = driver.find_element(By.ID, "explorer-plan")
    assert plan_box.get_attribute("value") == "tp=8,gbs=8,recompute=full"
    driver.find_element(By.ID, "explorer-search").click()
    cell = wait_for(driver, "#explorer-top-plans td[data-dash-column='plan']", 60)
    rows = driver.find_elements(By.CSS_SELECTOR, "#explorer-top-plans tbody tr")
    assert len(rows) > 5 and "valid plans evaluated" in _text(driver, "#explorer-search-status")
    best = cell.text
    assert "gbs=8" in best and best != plan_box.get_attribute("value")
    mfu = "#explorer-top-plans td[data-dash-column='mfu_percent']"
    values = lambda d: [float(c.text) for c in d.find_elements(By.CSS_SELECTOR, mfu)]  # noqa
    assert values(driver) == sorted(values(driver), reverse=True)   # fastest first
    sort = "#explorer-top-plans th[data-dash-column='mfu_percent'] .column-header--sort"
    driver.find_element(By.CSS_SELECTOR, sort).click()            # native sort: ascending
    _until(driver, lambda d: values(d) == sorted(values(d)) and values(d)[0] < values(d)[-1])
    driver.find_element(By.CSS_SELECTOR, sort).click()            # and back: descending
    _until(driver, lambda d: values(d) == sorted(values(d), reverse=True))
    cell = driver.find_element(By.CSS_SELECTOR, "#explorer-top-plans td[data-dash-column='plan']")
    best = cell.text
    start = time.monotonic()
    cell.click()
    _until(driver, lambda d: d.find_element(By.ID, "explorer-plan").get_attribute("value") == best)
    assert time.monotonic() - start < 30
    _until(driver, lambda d: best in parse_qs(urlparse(d.current_url).query)["plan"])


def test_a_pipeline_on_shared_cores_draws_its_negative_bubble_leftwards():
    # FCN at pp=4 on the 4-rank CPU profile: its big first stage mostly runs alone on a core
    est = costmodel.estimate(costmodel.graph("fcn-tiny"), "pp=4,mb=2,dtype=fp32",
                             hardware.load_cpu_cluster(4))
    parts = view.breakdown_parts(est)
    assert parts["pipeline bubble"][0] < 0 and "shared cores" in parts["pipeline bubble"][1]
    assert sum(s for s, _ in parts.values()) == pytest.approx(est.step_time_s, rel=1e-12)
    fig = view.breakdown_figure(est)
    assert fig.layout.barmode == "relative"
    assert sum(t.x[0] for t in fig.data) == pytest.approx(est.step_time_s, rel=1e-12)
