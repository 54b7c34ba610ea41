"""SQLite results store: round trips of real estimates and simulations, one transaction per
result, validation that names the field, links, studies, migrations, two writer processes."""
import json
import math
import multiprocessing
import re
import sqlite3
from contextlib import closing
from datetime import datetime, timezone

import pytest

from workbench import costmodel, hardware, store
from workbench.plan import Plan
from workbench.simulator import simulate
from workbench.store import Store, StoreVersionError

STUDY_TOML = 'model = "gpt"\nplans = ["tp=2,dp=4", "dp=8"]\n'
# A measurement payload as the runner would write it: 12 ms steps of 8 samples of 32 tokens.
RUN = {"step_time_s": 0.012, "mfu": 0.41, "hfu": 0.5, "samples_per_s": 8 / 0.012,
       "tokens_per_s": 8 * 32 / 0.012, "memory_peak_bytes": 3.5e9, "steps": 3}


def measure(st, plan="tp=2,dp=4", **kw):
    """Save a measurement of gpt on 8 chips with `RUN` as payload."""
    args = dict(model="gpt", plan=plan, cluster="dgx-h100", n_chips=8, payload=RUN)
    args.update(kw)
    return st.save("measurement", **args)


def count(path, table):
    """Rows of `table`, read with a fresh sqlite3 connection (not through the Store)."""
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


@pytest.fixture
def st(tmp_path):
    with Store(tmp_path / "store.db") as s:
        yield s


def test_default_path_comes_from_the_environment_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_STORE", str(tmp_path / "deep" / "er" / "x.db"))
    with Store() as s:
        assert s.path == tmp_path / "deep" / "er" / "x.db" and s.path.exists()
    monkeypatch.delenv("WORKBENCH_STORE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert store.default_path() == tmp_path / "home" / ".local/share/workbench/store.db"


def test_a_new_store_is_wal_with_foreign_keys_and_the_latest_schema(st):
    pragma = lambda name: st._read(f"PRAGMA {name}")[0][0]  # noqa: E731
    assert pragma("journal_mode") == "wal"
    assert pragma("foreign_keys") == 1
    assert pragma("busy_timeout") == 30_000  # BUSY_TIMEOUT_S = 30 s, in ms
    assert pragma("application_id") == store.APPLICATION_ID
    assert st.schema_version == len(store.MIGRATIONS) == 1


def test_real_estimate_and_simulation_round_trip_with_their_metric_columns(st):
    cl = hardware.cluster("dgx-h100", 8)
    g = costmodel.graph("gpt", layers=2, hidden=64, heads=4, vocab=256, seq=32)
    est, sim = costmodel.estimate(g, "tp=2,dp=4", cl), simulate(g, "tp=2,dp=4", cl)
    before = datetime.now(timezone.utc)
    pid = st.save("prediction", model=est.model, plan=est.plan, cluster=est.cluster,
                  n_chips=est.n_chips, payload=est.to_json(), family="gpt")
    sid = st.save("simulation", model=sim.model, plan=sim.plan, cluster=sim.cluster,
                  n_chips=sim.n_chips, payload=sim.to_json(), prediction_id=pid)
    got = st.get(pid)
    assert got["payload"] == json.loads(json.dumps(est.to_json()))
    assert (got["kind"], got["model"], got["plan"], got["family"], got["status"]) == (
        "prediction", "gpt", "dp=4,tp=2", "gpt", "ok")
    for m in store.METRICS:
        assert got[m] == est.to_json()[m]
    assert before <= datetime.fromisoformat(got["created_at"]) <= datetime.now(timezone.utc)
    sim_row = st.get(sid)
    assert sim_row["prediction_id"] == pid and sim_row["step_time_s"] == sim.step_time_s
    assert sim_row["payload"]["events"] == sim.events


def test_results_filter_and_come_newest_first(st):
    st.save_study("s", STUDY_TOML)
    a = measure(st)
    b = measure(st, plan="dp=8", status="failed", error="CUDA out of memory", payload={})
    c = measure(st, model="llama", study="s", point="p0")
    assert [r["id"] for r in st.results()] == [c, b, a]
    assert [r["id"] for r in st.results(limit=2)] == [c, b]
    assert [r["id"] for r in st.results(status="failed")] == [b]
    assert [r["id"] for r in st.results(model="gpt", kind="measurement")] == [b, a]
    assert [r["id"] for r in st.results(study="s")] == [c]
    assert st.results(kind="prediction") == []
    failed = st.results(status="failed", with_payload=False)[0]
    assert "payload" not in failed and failed["step_time_s"] is None
    assert failed["error"] == "CUDA out of memory"


def test_samples_come_back_in_time_order_by_metric(st):
    rid = measure(st, samples=[(0.5, None, "power_w", 300.0), (0.0, None, "power_w", 250.0),
                               (0.012, 0, "step_time_s", 0.012), (0.024, 1, "step_time_s", 0.011)])
    assert [s["value"] for s in st.samples(rid, "power_w")] == [250.0, 300.0]
    assert st.samples(rid, "step_time_s")[1] == {"t_s": 0.024, "step": 1,
                                                 "metric": "step_time_s", "value": 0.011}
    assert [s["t_s"] for s in st.samples(rid)] == [0.0, 0.012, 0.024, 0.5]
    with pytest.raises(KeyError, match="no result with id 99"):
        st.samples(99)


def test_a_failure_in_the_middle_of_a_write_stores_nothing(st):
    keep = measure(st, samples=[(0.0, 0, "power_w", 1.0)])

    def stream(bad):
        yield (0.0, 0, "power_w", 200.0)
        yield (0.1, 1, "power_w", 210.0)
        if bad == "value":
            yield (0.2, 2, "power_w", "n/a")
        raise RuntimeError("sampler died")

    with pytest.raises(ValueError, match=r"samples\[2\]\.value must be a finite number"):
        measure(st, samples=stream("value"))
    with pytest.raises(RuntimeError, match="sampler died"):
        measure(st, samples=stream("crash"))
    assert [r["id"] for r in st.results()] == [keep]
    assert count(st.path, "samples") == 1 and count(st.path, "results") == 1


@pytest.mark.parametrize("change, field", [
    (dict(kind="guess"), "kind"),
    (dict(model=""), "model"),
    (dict(model=None), "model"),
    (dict(plan="tp=two"), "plan"),
    (dict(cluster=3), "cluster"),
    (dict(n_chips=0), "n_chips"),
    (dict(n_chips=True), "n_chips"),
    (dict(status="done"), "status"),
    (dict(status="failed"), "error"),
    (dict(payload=[1, 2]), "payload"),
    (dict(payload={**RUN, "mfu": math.nan}), "payload['mfu']"),
    (dict(payload={**RUN, "step_time_s": 0.0}), "payload['step_time_s'] must be > 0"),
    (dict(payload={**RUN, "breakdown_s": {"bubble_s": math.inf}}),
     "payload['breakdown_s']['bubble_s']"),
    (dict(payload={"x": object()}), "payload"),
    (dict(point="p0"), "point needs study"),
    (dict(study="nope"), "study 'nope' is not saved"),
    (dict(samples=[(0.0, 0, "power_w")]), "samples[0]"),
    (dict(samples=[(-1.0, 0, "power_w", 1.0)]), "samples[0].t_s"),
    (dict(samples=[(0.0, -1, "power_w", 1.0)]), "samples[0].step"),
    (dict(samples=[(0.0, 0, "", 1.0)]), "samples[0].metric"),
    (dict(samples=[(0.0, 0, "power_w", math.nan)]), "samples[0].value"),
    (dict(samples=5), "samples must be an iterable"),
])
def test_bad_input_names_the_field_and_changes_nothing(st, change, field):
    keep = measure(st, samples=[(0.0, 0, "power_w", 1.0)])
    kind = change.pop("kind", "measurement")
    args = dict(model="gpt", plan="dp=8", cluster="dgx-h100", n_chips=8, payload=RUN)
    args.update(change)
    with pytest.raises(ValueError, match=re.escape(field)):
        st.save(kind, **args)
    assert [r["id"] for r in st.results()] == [keep]
    assert count(st.path, "samples") == 1


def test_plans_are_stored_in_compact_form(st):
    # tp=1 and pp=1 are defaults: the compact text of either plan leaves them out.
    a = measure(st, plan="pp=1, dp=8, tp=1")
    b = measure(st, plan=Plan.parse("dp=8"))
    assert st.get(a)["plan"] == st.get(b)["plan"] == "dp=8"


def test_links_check_kind_model_and_plan_and_survive_deletion_as_null(st):
    pid = st.save("prediction", model="gpt", plan="tp=2,dp=4", cluster="dgx-h100", n_chips=8,
                  payload=RUN)
    sid = st.save("simulation", model="gpt", plan="tp=2,dp=4", cluster="dgx-h100", n_chips=8,
                  payload=RUN, prediction_id=pid)
    mid = measure(st, prediction_id=pid, simulation_id=sid,
                  samples=[(0.0, 0, "step_time_s", 0.012)])
    with pytest.raises(ValueError, match="simulation_id 1 is not a stored simulation"):
        measure(st, simulation_id=pid)
    with pytest.raises(ValueError, match="prediction_id .* not the same model and plan"):
        measure(st, plan="dp=8", prediction_id=pid)
    with pytest.raises(ValueError, match="simulation_id links only measurement"):
        st.save("simulation", model="gpt", plan="tp=2,dp=4", cluster="dgx-h100", n_chips=8,
                payload=RUN, simulation_id=sid)
    st.delete(pid)
    assert st.get(mid)["prediction_id"] is None and st.get(sid)["prediction_id"] is None
    assert st.get(mid)["simulation_id"] == sid
    st.delete(mid)
    assert count(st.path, "samples") == 0  # samples go with their result
    with pytest.raises(KeyError):
        st.get(mid)
    with pytest.raises(KeyError):
        st.delete(mid)


def test_studies_resume_by_point(st):
    st.save_study("sweep", STUDY_TOML)
    st.save_study("sweep", STUDY_TOML)  # the same definition again: resuming, a no-op
    with pytest.raises(ValueError, match="already saved with another definition"):
        st.save_study("sweep", STUDY_TOML + "seed = 1\n")
    with pytest.raises(ValueError, match="definition of study 'bad' is not TOML"):
        st.save_study("bad", "model = ")
    assert not st.has_point("sweep", "tp=2,dp=4")
    measure(st, study="sweep", point="tp=2,dp=4", status="failed", error="OOM", payload={})
    assert st.has_point("sweep", "tp=2,dp=4") and st.has_point("sweep", "tp=2,dp=4", "measurement")
    assert not st.has_point("sweep", "tp=2,dp=4", kind="prediction")
    with pytest.raises(ValueError, match="already has a measurement"):
        measure(st, study="sweep", point="tp=2,dp=4")
    st.save("prediction", model="gpt", plan="dp=8", cluster="dgx-h100", n_chips=8,
            payload=RUN, study="sweep", point="tp=2,dp=4")
    st.save_study("later", "model = 'vit'\n")
    got = st.study("sweep")
    assert (got["definition"], got["n_results"]) == (STUDY_TOML, 2)
    assert [s["name"] for s in st.studies()] == ["later", "sweep"]
    with pytest.raises(KeyError, match="no study named 'x'"):
        st.study("x")


def test_dataframe_has_metric_columns_and_payload_json(st):
    import pandas as pd

    assert list(st.to_dataframe().columns) == [*store.COLUMNS, "payload"]
    st.save_study("s", STUDY_TOML)
    a = measure(st, study="s", point="a")
    b = measure(st, study="s", point="b", payload={**RUN, "step_time_s": 0.024})
    st.save("prediction", model="gpt", plan="dp=8", cluster="dgx-h100", n_chips=8, payload=RUN)
    df = st.to_dataframe(kind="measurement", study="s")
    assert list(df["id"]) == [b, a]
    assert list(df["step_time_s"]) == [0.024, 0.012]
    assert json.loads(df["payload"].iloc[1]) == RUN
    assert df["prediction_id"].isna().all() and str(df["prediction_id"].dtype) == "Int64"
    assert isinstance(df["created_at"].dtype, pd.DatetimeTZDtype)
    assert len(st.to_dataframe()) == 3


def test_closed_store_refuses_work(tmp_path):
    with Store(tmp_path / "s.db") as s:
        measure(s)
    with pytest.raises(sqlite3.ProgrammingError):
        s.results()


def test_opening_an_older_store_upgrades_it_in_one_transaction_per_step(tmp_path, monkeypatch):
    path = tmp_path / "s.db"
    with Store(path) as s:
        rid = measure(s)
    v2 = ("ALTER TABLE results ADD COLUMN energy_j REAL",
          "CREATE INDEX results_energy ON results(energy_j)")
    broken = ("CREATE TABLE half_done (x)", "ALTER TABLE no_such_table ADD COLUMN y")
    monkeypatch.setattr(store, "MIGRATIONS", [*store.MIGRATIONS, broken])
    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        Store(path)
    with closing(sqlite3.connect(path)) as conn:  # the failed step left nothing behind
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        assert not conn.execute("SELECT 1 FROM sqlite_master WHERE name='half_done'").fetchall()
    monkeypatch.setattr(store, "MIGRATIONS", [*store.MIGRATIONS[:1], v2])
    with Store(path) as s:
        assert s.schema_version == 2
        assert s.get(rid)["payload"] == RUN
        assert s._read("SELECT energy_j FROM results")[0][0] is None


def test_a_newer_or_foreign_database_is_refused(tmp_path):
    newer = tmp_path / "newer.db"
    Store(newer).close()
    with closing(sqlite3.connect(newer)) as conn:
        conn.execute("PRAGMA user_version = 7")
    with pytest.raises(StoreVersionError, match="schema version 7, but this workbench knows "
                                                "versions up to 1"):
        Store(newer)
    foreign = tmp_path / "foreign.db"
    with closing(sqlite3.connect(foreign, isolation_level=None)) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(ValueError, match="not a workbench store"):
        Store(foreign)
    (tmp_path / "notes.db").write_text("just some text, long enough to be read as a header " * 4)
    with pytest.raises(ValueError, match="not a usable SQLite database"):
        Store(tmp_path / "notes.db")


def _writer(path: str, tag: str, start) -> None:
    """Child process: wait for the start signal, then save 50 measurements with samples."""
    start.wait(10)
    with Store(path) as s:
        for i in range(50):
            measure(s, device=tag, samples=[(0.0, i, "power_w", 100.0), (0.1, i, "power_w", 1.0)])


def test_two_processes_writing_at_once_store_every_result(tmp_path):
    path = tmp_path / "new" / "shared.db"  # both create it too: schema and WAL switch race
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(str(path), tag, start)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    with Store(path) as s:
        rows = s.results(with_payload=False)
        assert len(rows) == 100  # 2 processes x 50
        assert sorted(r["device"] for r in rows) == ["a"] * 50 + ["b"] * 50
    assert count(path, "samples") == 200  # 100 results x 2 samples
