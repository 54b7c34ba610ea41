"""The real-model framework fit (`workbench calibrate --fit-on`, calibrate_fit.py)."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from workbench import calibrate_fit as cf
from workbench import cli
from workbench.models import flavours
from workbench.study import load

ROOT = Path(__file__).resolve().parents[1]

RUNS = [  # tiny points exercising DDP, FSDP and TP at both calibrated worlds
    {"model": "lstm-tiny", "overrides": {"dropout": 0.0}, "plan": "dp=2,gbs=4,dtype=fp32",
     "world": 2},
    {"model": "lstm-tiny", "overrides": {"dropout": 0.0}, "plan": "fsdp=2,gbs=4,dtype=fp32",
     "world": 2},
    {"model": "gpt-tiny", "overrides": {"layers": 2, "tied": False, "dropout": 0.0},
     "plan": "fsdp=2,gbs=4,dtype=fp32", "world": 2},
    {"model": "gpt-tiny", "overrides": {"layers": 2, "tied": False, "dropout": 0.0},
     "plan": "tp=2,gbs=2,dtype=fp32", "world": 2},
    {"model": "lstm-tiny", "overrides": {"dropout": 0.0}, "plan": "fsdp=4,gbs=8,dtype=fp32",
     "world": 4},
    {"model": "resnet-tiny", "overrides": {}, "plan": "fsdp=4,gbs=8,dtype=fp32", "world": 4},
    {"model": "gpt-tiny", "overrides": {"layers": 2, "tied": False, "dropout": 0.0},
     "plan": "tp=4,gbs=2,dtype=fp32", "world": 4},
    {"model": "llama-tiny", "overrides": {"layers": 2, "kv_heads": 4},
     "plan": "tp=4,gbs=2,dtype=fp32", "world": 4},
]


@pytest.fixture(scope="module")
def shipped() -> dict:
    profile = json.loads((resources.files("workbench") / "data/cpu.json").read_text())
    profile["measurement"].pop("framework_fit", None)  # start from the synthetic figures
    return profile


def measured_with(profile: dict, scales: dict[int, dict[str, float]]) -> list[dict]:
    """RUNS 'measured' as the cost model predicts them with the figures scaled by `scales`."""
    truth = cf.scaled_profile(profile, scales, cf.unscaled_figures(profile))
    times = cf._predictor(RUNS)(truth)
    return [{**r, "step_time_s": float(t), "steps": 6} for r, t in zip(RUNS, times)]


def test_the_fit_recovers_the_scales_the_runs_were_made_with(shipped):
    truth = {2: {"fsdp_call": 1.3}, 4: {"fsdp_call": 0.7, "tp_collective": 0.6}}
    fit = cf.fit_scales(shipped, measured_with(shipped, truth))
    # exact data: the residuals vanish at the truth; the prior pulls the scales toward 1 by
    # a little, so the predictions match to better than 1% and the scales to about 5% (TP's
    # per-collective scale to about 10%: two TP runs, and its per-op group shares the work)
    for w in (2, 4):
        assert max(abs(e) for e in fit["error_after"][w]) < 0.01
    assert fit["scales"][4]["fsdp_call"] == pytest.approx(0.7, rel=0.05)
    assert fit["scales"][4]["tp_collective"] == pytest.approx(0.6, rel=0.12)
    assert fit["scales"][2]["fsdp_call"] == pytest.approx(1.3, rel=0.05)
    assert max(abs(e) for e in fit["error_before"][4]) > 0.1  # the fit had work to do


def test_a_group_no_run_exercises_keeps_its_synthetic_level(shipped):
    fit = cf.fit_scales(shipped, measured_with(shipped, {4: {"fsdp_call": 0.7}}))
    # no PP or CP run: the prior alone speaks, and log(scale) = 0 is its minimum
    assert fit["scales"][2]["pp_action"] == 1.0 and fit["scales"][4]["cp_step"] == 1.0
    # and says so: the shipped profile's world 2 prices 0 s per pipeline action
    assert fit["unfitted"][4]["cp_step"] == "unused"
    assert fit["unfitted"][2]["pp_action"] == ("zero" if cf.unscaled_figures(shipped)[2]
                                               ["pp_action_s"] == 0 else "unused")
    assert "fsdp_call" not in fit["unfitted"][4]  # the runs move it


def test_a_group_whose_synthetic_figures_are_zero_is_reported_unfitted_not_x1(shipped):
    profile = json.loads(json.dumps(shipped))
    for w in profile["worlds"]:
        if w["ranks"] == 4:
            w["chip"]["efficiency"]["tp_collective_s"] = 0.0  # TP runs exercise it, but 0 x s = 0
    fit = cf.fit_scales(profile, measured_with(profile, {4: {"fsdp_call": 0.7}}))
    assert fit["unfitted"][4]["tp_collective"] == "zero"
    words = next(line for line in cf.fit_summary({**fit, "runs": []}).splitlines()
                 if line.startswith("world 4: "))
    assert ("tp_collective (not fitted: its synthetic figures are 0 s, which no scale moves)"
            in words and "cp_step (not fitted: no run exercises it)" in words)


def test_applying_a_fit_twice_does_not_compound(shipped):
    runs = measured_with(shipped, {4: {"fsdp_call": 0.7}})
    once = cf.apply_fit(shipped, runs, "studies/cpu-calibration.toml")
    twice = cf.apply_fit(once, runs, "studies/cpu-calibration.toml")
    w4 = [w for w in twice["worlds"] if w["ranks"] == 4][0]["chip"]["efficiency"]
    w4_once = [w for w in once["worlds"] if w["ranks"] == 4][0]["chip"]["efficiency"]
    assert w4["fsdp_gather_s"] == pytest.approx(w4_once["fsdp_gather_s"], rel=1e-6)
    unscaled = once["measurement"]["framework_fit"]["unscaled"]["4"]["fsdp_gather_s"]
    scale = once["measurement"]["framework_fit"]["scales"]["4"]["fsdp_call"]
    assert w4_once["fsdp_gather_s"] == pytest.approx(unscaled * scale, rel=1e-12)
    assert w4["source"].count("Framework figures scaled") == 1
    assert "cpu-calibration.toml" in w4["source"]


def test_bad_fits_are_refused_with_the_reason(shipped):
    with pytest.raises(ValueError, match="no runs"):
        cf.fit_scales(shipped, [])
    with pytest.raises(ValueError, match="world 8 has runs but the profile has no figures"):
        cf.fit_scales(shipped, [{**RUNS[0], "world": 8, "step_time_s": 0.01}])


def test_the_calibration_study_is_held_apart_from_the_validation():
    fit = load(ROOT / "studies/cpu-calibration.toml")
    val = load(ROOT / "studies/cpu-validation.toml")
    key = lambda p: (p.model, tuple(sorted(p.overrides.items())), p.plan, p.chips)  # noqa: E731
    assert not {key(p) for p in fit.points} & {key(p) for p in val.points}
    fam = lambda pts: {flavours()[p.model].family for p in pts}  # noqa: E731
    assert fam(fit.points) == {"gpt", "llama", "resnet", "vgg", "lstm", "detr"}
    assert len(fam(val.points)) == 16 and len(fam(val.points) - fam(fit.points)) == 10
    cf.check_fit_study(str(ROOT / "studies/cpu-calibration.toml"))


def test_cli_refuses_a_profile_without_a_fit_and_a_study_that_searches(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert cli.main(["calibrate", "--profile", "workbench/data/cpu.json", "--out",
                     str(out)]) == 2
    assert "--profile needs --fit-on" in capsys.readouterr().out
    study = tmp_path / "s.toml"
    study.write_text((ROOT / "studies/cpu-calibration.toml").read_text().replace(
        'plans = ["pp=*,mb=1,dtype=fp32"]', 'plans = ["search"]'))
    assert cli.main(["calibrate", "--profile", "workbench/data/cpu.json", "--fit-on",
                     str(study), "--out", str(out)]) == 2
    assert "searches its plan" in capsys.readouterr().out
    assert not out.exists()
    for bad, why in ((["--fit-repeat", "0", "--fit-on", str(study)], "must be >= 1"),
                     (["--fit-repeat", "3"], "goes with --fit-on STUDY")):
        assert cli.main(["calibrate", "--profile", "workbench/data/cpu.json", "--out",
                         str(out)] + bad) == 2
        assert f"--fit-repeat {bad[1]}: {why}" in capsys.readouterr().out
    assert not out.exists()


def test_cli_fits_a_profile_to_real_runs(tmp_path, capsys):
    study = tmp_path / "one.toml"  # one real DDP run at world 2 (~10 s)
    study.write_text("""
[study]
name = "one"
question = "q"
do = ["run"]
[cluster]
preset = "cpu"
[run]
steps = 2
warmup = 1
[[grids]]
models = [{ name = "lstm-tiny", set = { dropout = 0.0 } }]
[grids.sweep]
chips = [2]
global_batch_per_chip = 2
[grids.plan]
plans = ["dp=*,mb=1,dtype=fp32"]
""")
    out = tmp_path / "fitted.json"
    assert cli.main(["calibrate", "--profile", "workbench/data/cpu.json", "--fit-on",
                     str(study), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fit run 1/1: lstm-tiny" in text and "world 2: ddp x" in text
    fit = json.loads(out.read_text())["measurement"]["framework_fit"]
    assert [r["model"] for r in fit["runs"]] == ["lstm-tiny"] and fit["runs"][0]["step_time_s"] > 0
    assert set(fit["scales"]) == {"2"}
    # the one run's error can only shrink
    assert abs(fit["error_after"]["2"][0]) <= abs(fit["error_before"]["2"][0]) + 1e-9


def test_repeated_fit_runs_go_in_rounds_and_keep_each_points_median(monkeypatch):
    from workbench import calibrate_fit, runner
    calls = []

    def fake_run(model, plan, chips, **kw):
        calls.append((model, chips))
        return {"step_time_s": 0.010 * len(calls), "step_times_s": [0.0] * 6}
    monkeypatch.setattr(runner, "run", fake_run)
    runs = calibrate_fit.measure_runs(str(ROOT / "studies/cpu-calibration.toml"),
                                      log=lambda line: None, repeat=3)
    n = len(runs)
    # round by round over the study: point i's runs are calls i, n + i and 2n + i
    assert calls[:n] == calls[n:2 * n] == calls[2 * n:]
    assert runs[0]["run_step_times_s"] == pytest.approx([0.010, 0.010 * (n + 1),
                                                         0.010 * (2 * n + 1)])
    assert runs[0]["step_time_s"] == pytest.approx(0.010 * (n + 1))  # the median of the three
    assert runs[0]["steps"] == 18                                     # 3 runs of 6 steps
    with pytest.raises(ValueError, match="--fit-repeat must be >= 1"):
        calibrate_fit.measure_runs(str(ROOT / "studies/cpu-calibration.toml"), repeat=0)


def test_the_fit_summary_says_how_far_each_points_own_runs_differ():
    fit = {"scales": {"2": {"ddp": 1.0}}, "error_before": {"2": [0.2, -0.1]},
           "error_after": {"2": [0.05, -0.02]},
           "runs": [{"run_step_times_s": [0.010, 0.012, 0.011]},   # 12 / 10 - 1 = 20%
                    {"run_step_times_s": [0.040, 0.042, 0.041]},   # 42 / 40 - 1 = 5%
                    {"run_step_times_s": [0.030]}]}                # one run: no spread
    lines = cf.fit_summary(fit).splitlines()
    # median |error| before: (20 + 10) / 2 = 15%; after: (5 + 2) / 2 = 3.5%
    assert lines[0] == "world 2: ddp x1.00; median |error| of its runs 15.0% -> 3.5%"
    # spread median of 20% and 5%: 12.5%; one of the two beyond 15%
    assert lines[1] == ("run-to-run spread of the 2 fit points run more than once: median "
                        "12.5%, largest 20.0%, 1 whose own runs differ by more than 15%")
    one_run = {**fit, "runs": [{"run_step_times_s": [0.030]}]}
    assert len(cf.fit_summary(one_run).splitlines()) == 1  # --fit-repeat 1: no spread line
