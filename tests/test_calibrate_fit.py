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


def measured_with(profile: dict, scales: dict[int, dict[str, float]],
                  runs: list[dict] = RUNS) -> list[dict]:
    """`runs` 'measured' as the cost model predicts them with the figures scaled by `scales`."""
    truth = cf.scaled_profile(profile, scales, cf.unscaled_figures(profile))
    times = cf._predictor(runs)(truth)
    return [{**r, "step_time_s": float(t), "steps": 6} for r, t in zip(runs, times)]


COMPUTE_RUNS = RUNS + [  # compute-bound DP points whose microbatches the profile timed whole
    {"model": m, "overrides": o, "plan": f"dp={w},mb=2,gbs={4 * w},dtype=fp32", "world": w}
    for m, o in (("resnet-tiny", {}), ("c3d-tiny", {"dropout": 0.0})) for w in (2, 4)]


def test_the_fit_recovers_the_compute_level_and_leaves_the_framework_alone(shipped):
    # the host ran 20% faster (world 2) and 25% slower (world 4) than when its microbatches
    # were timed: the fit puts that on the compute scale, not on the framework groups
    truth = {2: {"compute": 0.8}, 4: {"compute": 1.25}}
    fit = cf.fit_scales(shipped, measured_with(shipped, truth, COMPUTE_RUNS),
                        groups=("compute",) + cf.DEFAULT_FIT_GROUPS)
    assert fit["scales"][2]["compute"] == pytest.approx(0.8, rel=0.03)
    assert fit["scales"][4]["compute"] == pytest.approx(1.25, rel=0.03)
    for w in (2, 4):
        assert max(abs(e) for e in fit["error_after"][w]) < 0.01
        assert all(abs(v - 1) < 0.1 for g, v in fit["scales"][w].items() if g != "compute")
    assert max(abs(e) for e in fit["error_before"][4]) > 0.15  # the fit had work to do


def test_the_compute_scale_multiplies_every_timed_microbatch(shipped):
    unscaled = cf.unscaled_figures(shipped)
    out = cf.scaled_profile(shipped, {4: {"compute": 0.5}}, unscaled)
    w4 = [w for w in out["worlds"] if w["ranks"] == 4][0]["chip"]["efficiency"]
    w2 = [w for w in out["worlds"] if w["ranks"] == 2][0]["chip"]["efficiency"]
    own = [w for w in shipped["worlds"] if w["ranks"] == 4][0]["chip"]["efficiency"]
    assert w4["model_passes_s"] and set(w4["model_passes_s"]) == set(own["model_passes_s"])
    for key, (fwd, bwd) in own["model_passes_s"].items():
        assert w4["model_passes_s"][key] == [fwd * 0.5, bwd * 0.5]
    assert w2["model_passes_s"] == unscaled[2]["model_passes_s"]  # world 2 not scaled


def test_a_profile_fitted_before_the_compute_group_starts_from_its_own_passes(shipped):
    old = json.loads(json.dumps(shipped))
    kept = {str(w): {f: v for f, v in figs.items() if f != "model_passes_s"}
            for w, figs in cf.unscaled_figures(shipped).items()}
    old["measurement"]["framework_fit"] = {"unscaled": kept}  # as written up to 2026-12-07
    unscaled = cf.unscaled_figures(old)
    own = [w for w in old["worlds"] if w["ranks"] == 2][0]["chip"]["efficiency"]
    assert unscaled[2]["model_passes_s"] == {k: list(v)
                                             for k, v in own["model_passes_s"].items()}
    assert unscaled[2]["fsdp_gather_s"] == kept["2"]["fsdp_gather_s"]


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
    # the default groups: no compute scale (DEFAULT_FIT_GROUPS)
    assert "fit run 1/1: lstm-tiny" in text and "world 2: ddp x" in text
    assert "compute x" not in text.replace("pp_compute x", "")
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


PP_RUNS = [  # pipelines of light and heavy stages: a cost per action and one per unit of work
    {"model": m, "overrides": o, "plan": f"pp={w},mb=2,dtype=fp32", "world": w}
    for m, o in (("gpt-tiny", {"layers": 4, "tied": False, "dropout": 0.0}), ("unet-tiny", {}),
                 ("c3d-tiny", {"dropout": 0.0}), ("resnet-tiny", {})) for w in (2, 4)]


def _with_factor(profile: dict, factor: float) -> dict:
    out = json.loads(json.dumps(profile))
    for w in out["worlds"]:
        w["chip"]["efficiency"]["pp_compute_factor"] = factor
    out["chip"]["efficiency"]["pp_compute_factor"] = factor
    return out


def test_a_pipeline_stage_computes_pp_compute_factor_times_its_time_alone(shipped):
    from workbench import costmodel, hardware, models
    gpt = costmodel.graph(models.get("gpt-tiny", dropout=0.0))
    est = {f: {p: costmodel.estimate(gpt, p, hardware.cpu_cluster_from_data(
        _with_factor(shipped, f), 2)) for p in ("pp=2,mb=2,dtype=fp32",
                                                "dp=2,mb=2,gbs=8,dtype=fp32")}
           for f in (1.0, 1.5)}
    pp, dp = "pp=2,mb=2,dtype=fp32", "dp=2,mb=2,gbs=8,dtype=fp32"
    assert est[1.5][pp].breakdown_s["compute_s"] == pytest.approx(
        1.5 * est[1.0][pp].breakdown_s["compute_s"], rel=1e-12)
    assert est[1.5][pp].step_time_s > est[1.0][pp].step_time_s
    assert est[1.5][dp].step_time_s == est[1.0][dp].step_time_s  # no pipeline: no factor
    # the simulator's stages carry the same factor (one work model for both)
    from workbench.costmodel import CostOptions
    from workbench.costmodel.estimator import cached_profile
    from workbench.costmodel.plans import PlanArrays
    from workbench.plan import Plan
    from workbench.simulator.work import stage_work
    arr = PlanArrays.from_plans([Plan.parse(pp)])
    work = {f: stage_work(cached_profile(gpt), arr, hardware.cpu_cluster_from_data(
        _with_factor(shipped, f), 2), CostOptions()) for f in (1.0, 1.5)}
    for slow, alone in zip(work[1.5], work[1.0]):
        assert (slow.fwd_s, slow.bwd_s) == pytest.approx((1.5 * alone.fwd_s, 1.5 * alone.bwd_s))


def test_the_fit_tells_the_pipelines_work_from_its_actions(shipped):
    # pipelines alone cannot tell a slow stage from a slow host (the compute scale moves them
    # the same way): the DP runs beside them fix the compute level, as in the calibration study
    truth = {2: {"pp_compute": 1.4}, 4: {"pp_compute": 1.2}}
    fit = cf.fit_scales(shipped, measured_with(shipped, truth, COMPUTE_RUNS + PP_RUNS))
    assert fit["scales"][2]["pp_compute"] == pytest.approx(1.4, rel=0.05)
    assert fit["scales"][4]["pp_compute"] == pytest.approx(1.2, rel=0.05)
    for w in (2, 4):
        assert max(abs(e) for e in fit["error_after"][w]) < 0.02
    # a profile without the figure starts from 1 (the chip's default), not from 0
    assert cf.unscaled_figures(shipped)[2]["pp_compute_factor"] == 1.0


def test_a_bad_pp_compute_factor_is_refused_naming_the_field(shipped):
    from workbench.costmodel.efficiency import efficiency_from_dict, efficiency_to_dict
    eff = dict(shipped["chip"]["efficiency"])
    for bad in (0.0, 5.0, "x"):
        with pytest.raises(ValueError, match=r"efficiency\.pp_compute_factor must be"):
            efficiency_from_dict({**eff, "pp_compute_factor": bad})
    e = efficiency_from_dict({**eff, "pp_compute_factor": 1.25})
    assert e.pp_compute_factor == 1.25
    assert efficiency_from_dict(efficiency_to_dict(e)).pp_compute_factor == 1.25


def test_refit_kept_fits_a_profile_again_to_the_runs_it_keeps(shipped, tmp_path, capsys):
    runs = measured_with(shipped, {2: {"fsdp_call": 1.3}, 4: {"fsdp_call": 0.7}})
    fitted = cf.apply_fit(shipped, runs, "studies/cpu-calibration.toml")
    fitted["measurement"]["framework_fit"]["scales"]["4"]["fsdp_call"] = 3.0  # a stale fit
    src, out = tmp_path / "fitted.json", tmp_path / "again.json"
    src.write_text(json.dumps(fitted))
    assert cli.main(["calibrate", "--profile", str(src), "--refit-kept", "--out",
                     str(out)]) == 0  # trains nothing: the runs are the profile's
    text = capsys.readouterr().out
    assert "fitted again to the runs it keeps" in text and "world 4: ddp" in text
    again = json.loads(out.read_text())["measurement"]["framework_fit"]
    assert "compute" not in again["groups"] and "pp_compute" in again["groups"]
    assert again["scales"]["4"]["fsdp_call"] == pytest.approx(0.7, rel=0.05)
    assert again["runs"] == fitted["measurement"]["framework_fit"]["runs"]
    # a profile without a fit has nothing to refit, and the flag needs a profile
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(shipped))
    assert cli.main(["calibrate", "--profile", str(plain), "--refit-kept", "--out",
                     str(out)]) == 2
    assert "keeps no runs of a framework fit" in capsys.readouterr().out
    assert cli.main(["calibrate", "--merge", str(plain), "--refit-kept", "--out",
                     str(out)]) == 2
    assert "--refit-kept fits a --profile" in capsys.readouterr().out
    # --fit-compute-level adds the compute scale, and only to a fit
    assert cli.main(["calibrate", "--profile", str(src), "--refit-kept", "--fit-compute-level",
                     "--out", str(out)]) == 0
    assert "world 4: compute" in capsys.readouterr().out  # (its runs time no microbatch whole)
    assert "compute" in json.loads(out.read_text())["measurement"]["framework_fit"]["groups"]
    assert cli.main(["calibrate", "--profile", str(src), "--fit-compute-level", "--out",
                     str(out)]) == 2
    assert "--fit-compute-level goes with --fit-on STUDY or --refit-kept" in \
        capsys.readouterr().out
    with pytest.raises(ValueError, match="'speed' is not one of"):
        cf.fit_scales(shipped, runs, groups=("speed",))
