"""Studies: parsing and checks, grid expansion, storing, resuming, executors."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workbench import study as studies
from workbench.store import Store
from workbench.study_run import pending_points, run_study

ROOT = Path(__file__).resolve().parents[1]

SMALL = """
[study]
name = "small"
question = "How does Llama 3 8B scale on 8 to 32 H100s?"
do = ["predict", "simulate"]

[[models]]
name = "llama3-8b"

[[models]]
name = "llama3-8b"
set = { layers = 8 }

[cluster]
preset = "dgx-h100"

[sweep]
chips = [8, 16, 32]
global_batch = [64]
seq = [2048, 4096]

[plan]
search = true
"""


def test_a_grid_expands_to_every_combination_with_stable_keys():
    s = studies.parse(SMALL)
    assert len(s.points) == 2 * 3 * 2  # models x chips x seq
    assert s.stages == ("predict", "simulate")
    p = s.points[0]
    assert p.key == "model=llama3-8b;cluster=dgx-h100;chips=8;gbs=64;seq=2048;plan=search"
    assert s.points[6].key.startswith('model=llama3-8b;set={"layers":8};')
    assert s.points[6].overrides == {"layers": 8, "seq": 2048}
    assert studies.parse(SMALL).points == s.points  # same text, same keys: resume finds them


def test_plan_templates_fill_the_free_degree_and_the_batch():
    s = studies.parse(SMALL.replace("search = true", 'plans = ["fsdp=*,tp=2", "dp=*,mb=2"]')
                      .replace("[2048, 4096]", "[2048]"))
    plans = [(p.chips, p.plan) for p in s.points if "layers" not in p.overrides]
    # fsdp = chips / tp = 8/2, 16/2, 32/2; dp = chips; the compact form leaves out gbs when
    # it is one microbatch per DP rank (32 x 2 = 64)
    assert plans == [(8, "fsdp=4,tp=2,gbs=64"), (8, "dp=8,mb=2,gbs=64"),
                     (16, "fsdp=8,tp=2,gbs=64"), (16, "dp=16,mb=2,gbs=64"),
                     (32, "fsdp=16,tp=2,gbs=64"), (32, "dp=32,mb=2")]


def test_weak_scaling_grows_the_batch_with_the_chips():
    text = SMALL.replace("global_batch = [64]", "global_batch_per_chip = 0.5")
    assert [p.global_batch for p in studies.parse(text).points][:6:2] == [4, 8, 16]  # 0.5 x chips


@pytest.mark.parametrize("change, message", [
    (("[plan]", "[plan]\nbogus = 1"), r"\[plan\]: unknown key\(s\) bogus"),
    (('name = "llama3-8b"\n\n[[models]]', 'name = "llama9"\n\n[[models]]'), "unknown model 'llama9'"),
    (("layers = 8", "layerz = 8"), "has no field 'layerz'"),
    (('preset = "dgx-h100"', 'preset = "dgx-z"'), "preset 'dgx-z' is unknown"),
    (("search = true", 'plans = ["tp=3,dp=*"]'), "the other degrees use 3 chips"),
    (("search = true", 'plans = ["tp=64"]'), r"plan 'tp=64' at 8 chips .*world_size"),
    (("global_batch = [64]", "global_batch = [64]\nglobal_batch_per_chip = 2"), "not both"),
    (('do = ["predict", "simulate"]', 'do = ["guess"]'), "do must be a non-empty list"),
    (('do = ["predict", "simulate"]', 'do = ["run"]'), "needs \\[cluster\\] preset = 'cpu'"),
    (("seq = [2048, 4096]", 'seq = [2048]\nattention = ["flashy"]'), "attention='flashy'"),
    (("seq = [2048, 4096]", "seq = [2048]\noverlap_dp = [true, 3]"), "cost options"),
    (("[sweep]\nchips = [8, 16, 32]", "[sweep]\nchips = [0]"), "chips must be a list of integers"),
])
def test_bad_studies_are_clear_errors_before_anything_runs(change, message):
    text = SMALL.replace(*change)
    assert text != SMALL
    with pytest.raises(ValueError, match=message):
        studies.parse(text)


def test_every_shipped_study_parses():
    files = sorted((ROOT / "studies").glob("*.toml"))
    names = {f.stem for f in files}
    assert {"llama3-strong-scaling", "llama3-weak-scaling", "vit-moe-experts",
            "resnet50-dp-scaling", "i3d-clip-memory", "lstm-seq-pipeline", "detr-resolution",
            "cpu-validation"} <= names
    for f in files:
        s = studies.load(f)
        assert s.name == f.stem and s.question and s.points


def test_a_study_stores_every_point_whole_and_skips_them_when_run_again(tmp_path):
    s = studies.parse(SMALL.replace("[8, 16, 32]", "[8, 16]"))
    store = Store(tmp_path / "s.db")
    first = run_study(s, store, jobs=1, quiet=True)
    assert (first.total, first.stored, first.skipped, first.failed) == (8, 8, 0, 0)
    points = store.study_points("small")
    assert len(points) == 8 and all(k == {"prediction", "simulation"} for k in points.values())
    sims = store.results(kind="simulation", study="small")
    assert all(r["prediction_id"] for r in sims)  # linked to the point's prediction
    pred = store.get(sims[0]["prediction_id"])
    assert pred["point"] == sims[0]["point"] and pred["plan"] == sims[0]["plan"]
    assert pred["payload"]["study_point"]["plan_request"] == "search"
    assert pred["payload"]["search"]["evaluated"] > 10
    again = run_study(s, store, jobs=1, quiet=True)
    assert (again.stored, again.skipped) == (0, 8)
    assert len(store.results(study="small")) == 16


def test_an_interrupted_study_loses_nothing_and_repeats_nothing(tmp_path):
    s = studies.parse(SMALL.replace("[8, 16, 32]", "[8, 16]"))
    store = Store(tmp_path / "s.db")
    seen = []

    def stop_after_three(done, total, point, eta):
        seen.append(point.key)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_study(s, store, jobs=1, progress=stop_after_three)
    assert set(store.study_points("small")) == set(seen)  # the three finished points
    left = pending_points(s, store)
    assert len(left) == 5 and not set(p.key for p in left) & set(seen)
    evaluated = []
    summary = run_study(s, store, jobs=1,
                        progress=lambda d, t, p, e: evaluated.append(p.key))
    assert (summary.skipped, summary.stored) == (3, 5)
    assert evaluated == [p.key for p in left]  # exactly the rest, each once
    assert len(store.results(study="small")) == 16


def test_a_killed_study_keeps_whole_points_and_resumes(tmp_path):
    # A real crash: kill -9 the CLI mid-study. Every stored point has both of its results
    # (one transaction per point); the rerun does the rest, each point once.
    path = tmp_path / "s.toml"
    path.write_text(SMALL)
    db = tmp_path / "s.db"
    cmd = [sys.executable, "-m", "workbench.cli", "study", "run", str(path), "--store",
           str(db), "--jobs", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if db.exists() and 2 <= len(Store(db).study_points("small")) < 12:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = Store(db).study_points("small")
    assert 2 <= len(before) < 12
    assert all(kinds == {"prediction", "simulation"} for kinds in before.values())
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{len(before)} of 12 points already stored: resuming" in done.stderr
    assert f"{12 - len(before)} points stored (0 failed), {len(before)} already stored" \
        in done.stdout
    assert len(Store(db).results(study="small")) == 24


def test_local_processes_give_the_same_results_as_one_process(tmp_path):
    s = studies.parse(SMALL.replace("[8, 16, 32]", "[8]"))
    serial, pooled = Store(tmp_path / "a.db"), Store(tmp_path / "b.db")
    run_study(s, serial, jobs=1, quiet=True)
    summary = run_study(s, pooled, jobs=2, quiet=True)
    assert summary.stored == 4

    def by_point(store):
        return {(r["point"], r["kind"]): (r["plan"], r["step_time_s"])
                for r in store.results(study="small")}
    assert by_point(serial) == by_point(pooled)


def test_a_point_where_nothing_fits_is_stored_as_failed_with_the_reason(tmp_path):
    text = SMALL.replace('name = "llama3-8b"\n\n[[models]]\nname = "llama3-8b"\n'
                         'set = { layers = 8 }', 'name = "llama3-405b"') \
        .replace("[8, 16, 32]", "[8]").replace("[2048, 4096]", "[2048]")
    s = studies.parse(text)
    store = Store(tmp_path / "s.db")
    summary = run_study(s, store, jobs=1, quiet=True)
    assert (summary.stored, summary.failed) == (1, 1)
    r = store.results(study="small", kind="prediction")[0]
    assert r["status"] == "failed" and "no plan fits memory" in r["error"]


TINY_RUN = """
[study]
name = "tiny-run"
question = "Does a real run land beside its prediction?"
do = ["predict", "run"]
[[models]]
name = "llama-tiny"
[cluster]
preset = "cpu"
[sweep]
chips = [2]
[plan]
plans = ["dp=*,gbs=4,dtype=fp32"]
[run]
steps = 2
warmup = 1
"""


def test_a_run_study_trains_for_real_and_links_the_measurement(tmp_path):
    text = TINY_RUN
    s = studies.parse(text)
    store = Store(tmp_path / "s.db")
    assert run_study(s, store, quiet=True).stored == 1
    m = store.results(study="tiny-run", kind="measurement")[0]
    assert m["status"] == "ok" and m["step_time_s"] > 0 and m["n_chips"] == 2
    assert store.get(m["prediction_id"])["kind"] == "prediction"
    assert m["payload"]["predicted"]["step_time_s"] > 0
    assert [x["metric"] for x in store.samples(m["id"], "step_time_s")] == ["step_time_s"] * 2


def test_run_settings_take_a_minimum_timed_duration_and_check_it():
    assert studies.parse(TINY_RUN).run.min_timed_s == 0.0
    assert studies.parse(TINY_RUN + "min_timed_s = 1.5\n").run.min_timed_s == 1.5
    for bad in ("-1", "true", '"long"'):
        with pytest.raises(ValueError, match=r"\[run\] min_timed_s must be a number of seconds"):
            studies.parse(TINY_RUN + f"min_timed_s = {bad}\n")


@pytest.mark.slow
def test_the_ray_executor_stores_the_same_points(tmp_path):
    ray = pytest.importorskip("ray")
    s = studies.parse(SMALL.replace("[8, 16, 32]", "[8]").replace("[2048, 4096]", "[2048]"))
    local, remote = Store(tmp_path / "a.db"), Store(tmp_path / "b.db")
    run_study(s, local, jobs=1, quiet=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_study(s, remote, executor="ray", quiet=True)
    finally:
        ray.shutdown()
    assert summary.stored == 2
    assert {(r["point"], r["kind"], r["plan"]) for r in local.results(study="small")} == \
        {(r["point"], r["kind"], r["plan"]) for r in remote.results(study="small")}


def test_save_point_is_all_or_nothing(tmp_path):
    store = Store(tmp_path / "s.db")
    store.save_study("x", '[study]\nname = "x"\n')
    good = {"kind": "prediction", "model": "m", "plan": "dp=2", "cluster": "c", "n_chips": 2,
            "payload": {"step_time_s": 1.0}}
    bad = {**good, "kind": "simulation", "payload": {"step_time_s": -1.0}}
    with pytest.raises(ValueError, match="step_time_s"):
        store.save_point("x", "p1", [good, bad])
    assert store.study_points("x") == {}
    ids = store.save_point("x", "p1", [good, {**bad, "payload": {"step_time_s": 2.0}}])
    assert store.get(ids["simulation"])["prediction_id"] == ids["prediction"]
