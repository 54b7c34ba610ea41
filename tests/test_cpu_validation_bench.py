"""The CPU validation benchmark's bookkeeping (the runs themselves are the benchmark): rounds
over the whole set, and a point's row from its runs."""
import importlib.util
import json
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_validation.py"


@pytest.fixture()
def bench():
    spec = importlib.util.spec_from_file_location("cpu_validation", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_row_is_the_median_of_its_runs_beside_the_prediction(bench):
    point = {"model": "m", "overrides": {}, "plan": "dp=2", "world": 2}
    runs = [{"step_time_s": t, "steps": 10, "predicted_s": 0.012, "breakdown_s": {}}
            for t in (0.010, 0.016, 0.011)]
    row = bench.combine(point, runs)
    assert row["measured_s"] == 0.011                    # median of 10, 16, 11 ms
    assert row["error_rel"] == pytest.approx(0.012 / 0.011 - 1)
    assert row["run_medians_s"] == [0.010, 0.016, 0.011] and row["timed_steps"] == [10] * 3
    assert bench.combine(point, runs[:1] + [{"error": "rank 1 failed"}])["error"] == \
        "rank 1 failed"


def test_repeats_run_in_rounds_over_the_whole_set(bench, monkeypatch, tmp_path, capsys):
    chosen = [{"model": name, "overrides": {}, "plan": "dp=2", "world": 2}
              for name in ("a", "b", "c")]
    monkeypatch.setattr(bench, "points", lambda worlds: chosen)
    calls = []

    def fake_run(point, steps, warmup, min_timed_s, probe=False):
        calls.append(point["model"])
        if point["model"] == "c":
            return {"error": "impossible"}
        return {"step_time_s": 0.01 * len(calls), "steps": steps, "predicted_s": 0.02,
                "breakdown_s": {}}
    monkeypatch.setattr(bench, "run_once", fake_run)
    monkeypatch.setattr(bench, "host_check", lambda profile=None: "host check: not timed here")
    out = tmp_path / "rows.json"
    assert bench.main(["--repeat", "3", "--json", str(out)]) == 0
    # round by round over the set; a point that failed is not run again
    assert calls == ["a", "b", "c", "a", "b", "a", "b"]
    rows = json.loads(out.read_text())
    assert [r["run_medians_s"] for r in rows[:2]] == [[0.01, 0.04, 0.06], [0.02, 0.05, 0.07]]
    assert rows[2]["error"] == "impossible"
    printed = capsys.readouterr().out
    assert printed.startswith("host check: not timed here") and "2 points (1 failed)" in printed
    # a: 10, 40, 60 ms -> 60 / 10 - 1 = 500%; b: 20, 50, 70 ms -> 70 / 20 - 1 = 250%
    assert ("run-to-run spread of the 2 points run more than once: median 375.0%, largest "
            "500.0%, 2 whose own runs differ by more than 15%") in printed


def test_each_round_can_be_predicted_with_its_own_calibration(bench, monkeypatch, tmp_path):
    chosen = [{"model": "a", "overrides": {}, "plan": "dp=2", "world": 2}]
    monkeypatch.setattr(bench, "points", lambda worlds: chosen)
    monkeypatch.setattr(bench, "run_once", lambda point, steps, warmup, min_timed_s,
                        probe=False: {"step_time_s": 0.010, "steps": steps,
                                      "predicted_s": 1.0, "breakdown_s": {}})
    made = []

    def fake_calibrate(out):
        made.append(out.name)
        return str(out)
    monkeypatch.setattr(bench, "calibrate_now", fake_calibrate)
    # round N's profile predicts N x 4 ms
    monkeypatch.setattr(bench, "predict", lambda point, profile: {
        "predicted_s": 0.004 * int(Path(profile).stem.split("-")[1]), "breakdown_s": {}})
    out = tmp_path / "rows.json"
    assert bench.main(["--repeat", "3", "--calibrate-each-round", str(tmp_path / "cal"),
                       "--json", str(out)]) == 0
    assert made == ["round-1.json", "round-2.json", "round-3.json"]
    row = json.loads(out.read_text())[0]
    assert row["run_predictions_s"] == [0.004, 0.008, 0.012]
    assert row["predicted_s"] == 0.008                   # the median of 4, 8 and 12 ms
    assert row["error_rel"] == pytest.approx(0.008 / 0.010 - 1)


def test_repredict_keeps_the_measurement_and_predicts_again(bench, tmp_path, capsys):
    from workbench import costmodel, models
    from workbench.runner import prediction_cluster
    point = {"model": "lstm-tiny", "overrides": {"dropout": 0.0},
             "plan": "dp=2,mb=2,gbs=8,dtype=fp32", "world": 2}
    rows = [{**point, "measured_s": 0.010, "predicted_s": 1.0, "error_rel": 99.0},
            {**point, "plan": "tp=3", "error": "impossible"}]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    assert bench.main(["--repredict", str(path)]) == 0
    want = costmodel.estimate(costmodel.graph(models.get("lstm-tiny", dropout=0.0)),
                              point["plan"], prediction_cluster("cpu", 2)).step_time_s
    again = bench.repredict(rows)
    assert again[0]["measured_s"] == 0.010 and again[0]["predicted_s"] == want
    assert again[0]["error_rel"] == pytest.approx(want / 0.010 - 1)
    assert again[1] == rows[1]
    assert "1 points (1 failed)" in capsys.readouterr().out


def test_repredict_with_the_rounds_profiles_predicts_each_run_with_its_own(bench, monkeypatch,
                                                                            tmp_path):
    point = {"model": "m", "overrides": {}, "plan": "dp=2", "world": 2}
    rows = [{**point, "measured_s": 0.010, "run_medians_s": [0.009, 0.010, 0.011]}]
    # round N's profile predicts N x 4 ms
    monkeypatch.setattr(bench, "predict", lambda p, profile: {
        "predicted_s": 0.004 * int(Path(profile).stem.split("-")[1]), "breakdown_s": {}})
    row = bench.repredict(rows, str(tmp_path))[0]
    assert row["run_predictions_s"] == [0.004, 0.008, 0.012]
    assert row["predicted_s"] == 0.008 and row["error_rel"] == pytest.approx(-0.2)
    with pytest.raises(SystemExit):
        bench.main(["--profiles", str(tmp_path)])  # only with --repredict


def test_the_summary_keeps_the_families_the_fit_never_saw_apart(bench):
    rows = [{"model": "gpt-tiny", "plan": "dp=2", "world": 2, "measured_s": 0.010,
             "predicted_s": 0.011, "error_rel": 0.10},
            {"model": "alexnet-tiny", "plan": "dp=2", "world": 2, "measured_s": 0.010,
             "predicted_s": 0.008, "error_rel": -0.20}]
    text = bench.table(rows, {"gpt"})
    assert "families the fit saw at other shapes (gpt): 1 points: max |error| 10.0%" in text
    assert "families the fit never saw: 1 points: max |error| 20.0%" in text
    assert "2 points (0 failed): max |error| 20.0%" in text
    assert "never saw" not in bench.table(rows, set())  # no fit: one summary


def test_the_spread_is_the_slowest_run_over_the_fastest(bench):
    rows = [{"run_medians_s": [0.100, 0.110]},          # 110 / 100 - 1 = 10%
            {"run_medians_s": [0.080, 0.100, 0.090]},   # 100 / 80 - 1 = 25%
            {"run_medians_s": [0.050]},                 # one run: no spread
            {"error": "rank 1 failed"}]
    assert [bench.spread_rel(r) for r in rows] == [pytest.approx(0.10), pytest.approx(0.25),
                                                    None, None]
    assert bench.spread_summary(rows) == ("run-to-run spread of the 2 points run more than "
                                          "once: median 17.5%, largest 25.0%, 1 whose own "
                                          "runs differ by more than 15%")
    assert bench.spread_summary(rows[2:]) is None


def test_the_host_check_warns_when_the_host_is_not_the_profiles(bench, monkeypatch, tmp_path):
    from workbench import calibrate_drift
    from workbench.hardware import _cpu_file
    profile = _cpu_file(None)
    figures = {"matmul_flops_per_s": 100e9, "copy_Bps": 20e9}
    profile["measurement"] = {"host_check": {"start": figures, "end": figures}}
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(profile))
    now = {"matmul_flops_per_s": 60e9, "copy_Bps": 19e9}  # -40% (limit 8%), -5% (limit 25%)
    monkeypatch.setattr(calibrate_drift, "measure_host", lambda settings: now)
    words = bench.host_check(str(path))
    assert words.startswith("host check: this host matmul 60.0 GFLOP/s, copy 19.0 GB/s; the "
                            "profile's host matmul 100.0 GFLOP/s, copy 20.0 GB/s")
    assert "matmul_flops_per_s -40% (limit 8%)" in words and "copy_Bps" not in words
    monkeypatch.setattr(calibrate_drift, "measure_host", lambda settings: figures)
    assert "warning" not in bench.host_check(str(path))


def test_the_host_level_is_the_median_of_the_nearest_reference_runs_of_its_world():
    from workbench.calibrate_drift import host_level
    refs = [{"t_s": t, "world": w, "measured_s": m, "predicted_s": 0.010}
            for t, w, m in ((0, 2, 0.011), (10, 2, 0.012), (20, 2, 0.014), (30, 2, 0.020),
                            (12, 4, 0.030))]
    # nearest 3 of world 2 to t = 12: t = 10, 20, 0 -> 1.2, 1.4, 1.1 -> median 1.2
    assert host_level(12, 2, refs, neighbours=3) == pytest.approx(1.2)
    # nearest 2 to t = 29: t = 30, 20 -> 2.0, 1.4 -> median 1.7
    assert host_level(29, 2, refs, neighbours=2) == pytest.approx(1.7)
    assert host_level(12, 4, refs) == pytest.approx(3.0)   # one reference of world 4
    assert host_level(12, 8, refs) is None                 # none of world 8


def test_reference_runs_are_spread_evenly_through_a_round(bench):
    # points at 1/8, 3/8, 5/8, 7/8; references at 1/4, 3/4
    assert bench.interleave(4, 2) == [("point", 0), ("reference", 0), ("point", 1),
                                      ("point", 2), ("reference", 1), ("point", 3)]
    # a tie (1/2 and 1/2): the point first
    assert bench.interleave(1, 1) == [("point", 0), ("reference", 0)]
    assert bench.interleave(2, 0) == [("point", 0), ("point", 1)]


def one_point_and_one_reference(bench, monkeypatch) -> None:
    """A set of one point (model m) and one reference run (model r), both DP at world 2; no
    host check; a clock that ticks 1 s per call."""
    chosen = [{"model": "m", "overrides": {}, "plan": "dp=2", "world": 2}]
    refs = [{"model": "r", "overrides": {}, "plan": "dp=2", "world": 2}]
    monkeypatch.setattr(bench, "points",
                        lambda worlds, study=bench.STUDY: refs if study == bench.FIT_STUDY
                        else chosen)
    monkeypatch.setattr(bench, "host_check", lambda profile=None: "host check: not timed here")
    clock = iter(range(100))
    monkeypatch.setattr(bench.time, "time", lambda: float(next(clock)))


def test_pin_level_scales_each_run_by_the_level_of_its_minute(bench, monkeypatch, tmp_path,
                                                               capsys):
    one_point_and_one_reference(bench, monkeypatch)
    # the host: 20 ms for the point in round 1, 30 ms in round 2; the reference 1.5x and
    # 2.5x its prediction of 10 ms in the same rounds; the point is predicted 10 ms
    measured = {("m", 0): 0.020, ("r", 0): 0.015, ("m", 1): 0.030, ("r", 1): 0.025}
    seen = []

    def fake_run(point, steps, warmup, min_timed_s, probe=False):
        seen.append(point["model"])
        rnd = (len(seen) - 1) // 2
        return {"step_time_s": measured[(point["model"], rnd)], "steps": steps,
                "predicted_s": 0.010, "breakdown_s": {}}
    monkeypatch.setattr(bench, "run_once", fake_run)
    out = tmp_path / "rows.json"
    assert bench.main(["--repeat", "2", "--pin-level", "--json", str(out)]) == 0
    assert seen == ["m", "r", "m", "r"]
    row = json.loads(out.read_text())[0]
    # run 1 ends at t = 0, the references at t = 1 (x1.5) and t = 3 (x2.5): the 6 nearest
    # of world 2 are both, median x2.0, for either run -> 20 ms each; measured: median of
    # 20 and 30 = 25 ms -> error 20 / 25 - 1 = -20%; unpinned 10 / 25 - 1 = -60%
    assert row["run_levels"] == [2.0, 2.0] and row["run_t_s"] == [0.0, 2.0]
    assert row["predicted_s"] == pytest.approx(0.020) and row["raw_predicted_s"] == 0.010
    assert row["error_rel"] == pytest.approx(-0.2)
    saved = json.loads(bench.references_path(str(out)).read_text())
    assert [(r["model"], r["t_s"], r["measured_s"]) for r in saved] == [
        ("r", 1.0, 0.015), ("r", 3.0, 0.025)]
    printed = capsys.readouterr().out
    assert "level median x2.000, range x2.000-x2.000" in printed
    assert "unpinned (the profile's own predictions): 1 points: max |error| 60.0%" in printed
    assert "level median x2.000" in bench.table([row])  # no fit named: one summary
    # predicted again with another profile: the references too, so the level follows it
    monkeypatch.setattr(bench, "predict", lambda p, profile: {
        "predicted_s": 0.005 if p["model"] == "r" else 0.008, "breakdown_s": {}})
    again = bench.repredict([row], None, "other.json", saved)[0]
    # references 15 / 5 = 3.0 and 25 / 5 = 5.0: level x4.0; 8 ms x 4 = 32 ms
    assert again["run_levels"] == [4.0, 4.0] and again["predicted_s"] == pytest.approx(0.032)
    assert again["error_rel"] == pytest.approx(0.032 / 0.025 - 1)
    with pytest.raises(ValueError, match="pinned"):
        bench.repredict([row], None, "other.json")  # without the reference runs
    with pytest.raises(SystemExit):
        bench.main(["--pin-level", "--calibrate-each-round", str(tmp_path)])


def test_pin_level_with_the_probe_follows_each_runs_own_probe(bench, monkeypatch, tmp_path,
                                                              capsys):
    one_point_and_one_reference(bench, monkeypatch)
    # round 1: the point 20 ms at a probe of 1 ms, the reference 15 ms (x1.5) at 1 ms;
    # round 2: the point 40 ms at 2 ms, the reference 25 ms (x2.5) at 1 ms
    measured = {("m", 0): (0.020, 0.001), ("r", 0): (0.015, 0.001),
                ("m", 1): (0.040, 0.002), ("r", 1): (0.025, 0.001)}
    seen = []

    def fake_run(point, steps, warmup, min_timed_s, probe=False):
        assert probe
        seen.append(point["model"])
        step_s, probe_s = measured[(point["model"], (len(seen) - 1) // 2)]
        return {"step_time_s": step_s, "steps": steps, "predicted_s": 0.010,
                "breakdown_s": {}, "probe_s": probe_s, "probe_parts_s": [probe_s, probe_s]}
    monkeypatch.setattr(bench, "run_once", fake_run)
    out = tmp_path / "rows.json"
    assert bench.main(["--repeat", "2", "--pin-level", "--probe", "--json", str(out)]) == 0
    row = json.loads(out.read_text())[0]
    # references per unit of probe: 1.5 / 1 ms and 2.5 / 1 ms, median 2.0 / ms:
    # run 1 x2.0 (probe 1 ms) -> 20 ms, run 2 x4.0 (probe 2 ms) -> 40 ms: both exact
    assert row["run_levels"] == pytest.approx([2.0, 4.0]) and row["run_probes_s"] == [0.001, 0.002]
    assert row["pinned_by"] == "probe" and row["predicted_s"] == pytest.approx(0.030)
    assert row["measured_s"] == pytest.approx(0.030) and row["error_rel"] == pytest.approx(0)
    saved = json.loads(bench.references_path(str(out)).read_text())
    assert [r["probe_s"] for r in saved] == [0.001, 0.001]
    assert "per unit of host-probe time, x the run's own probe" in capsys.readouterr().out
    monkeypatch.setattr(bench, "predict", lambda p, profile: {"predicted_s": 0.010,
                                                              "breakdown_s": {}})
    # the same runs pinned by time alone: x2.0 for both -> 20 ms, error 20 / 30 - 1
    by_time = bench.repredict([row], None, None, saved, use_probe=False)[0]
    assert by_time["run_levels"] == pytest.approx([2.0, 2.0]) and by_time["pinned_by"] == "time"
    assert by_time["error_rel"] == pytest.approx(0.020 / 0.030 - 1)
    again = bench.repredict([row], None, None, saved)[0]
    assert again["run_levels"] == pytest.approx([2.0, 4.0]) and again["pinned_by"] == "probe"
    with pytest.raises(SystemExit):
        bench.main(["--probe"])                    # the probe needs reference runs
    with pytest.raises(SystemExit):
        bench.main(["--no-probe"])                 # only for --repredict
