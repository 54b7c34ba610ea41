"""`workbench calibrate --merge`: the median of several calibrations' raw figures, refitted.
Uses the shipped profile's raw figures (no measuring)."""
import argparse
import copy
import json
from pathlib import Path

import pytest

from workbench import calibrate, calibrate_cli, hardware
from workbench.calibrate_merge import merge_files, merge_profiles
from workbench.costmodel.efficiency import efficiency_for

SHIPPED = Path(calibrate.__file__).parent / "data" / "cpu.json"


@pytest.fixture(scope="module")
def shipped() -> dict:
    return json.loads(SHIPPED.read_text())


def _scaled(profile: dict, factor: float) -> dict:
    """A copy whose FSDP extra seconds at world 4 and world-2 fp32 peak are `factor` times."""
    p = copy.deepcopy(profile)
    raw = p["measurement"]["raw"]
    raw["4"]["fsdp"]["extra_s"] = [x * factor for x in raw["4"]["fsdp"]["extra_s"]]
    raw["2"]["peak_flops_per_s"]["fp32"] *= factor
    return p


def test_merging_copies_of_one_calibration_gives_its_figures_back(shipped):
    merged = merge_profiles([shipped, shipped])
    for world, again in zip(shipped["worlds"], merged["worlds"]):
        assert again["ranks"] == world["ranks"]
        assert again["level"]["bandwidth_Bps"] == pytest.approx(world["level"]["bandwidth_Bps"])
        eff, eff_again = world["chip"]["efficiency"], again["chip"]["efficiency"]
        for key in ("fsdp_gather_s", "fsdp_tensor_s", "ddp_step_s", "tp_collective_s",
                    "cp_step_s", "comm_overlap"):
            assert eff_again[key] == pytest.approx(eff[key], rel=1e-9, abs=1e-15), key
    assert len(merged["measurement"]["merged_from"]) == 2
    assert "Median of 2 calibrations" in merged["chip"]["efficiency"]["source"]


def test_each_raw_figure_is_the_median_over_the_calibrations(shipped):
    # FSDP's extra seconds at world 4 x 1, x 3, x 0.5: the median is x 1, so the fit is the
    # original's; with x 3 twice the median is x 3 and every fitted FSDP term (a linear fit
    # of extra seconds minus modelled collectives) grows
    merged = merge_profiles([_scaled(shipped, 3.0), shipped, _scaled(shipped, 0.5)])
    raw, orig = merged["measurement"]["raw"], shipped["measurement"]["raw"]
    assert raw["4"]["fsdp"]["extra_s"] == pytest.approx(orig["4"]["fsdp"]["extra_s"])
    assert raw["2"]["peak_flops_per_s"]["fp32"] == pytest.approx(
        orig["2"]["peak_flops_per_s"]["fp32"])
    dearer = merge_profiles([_scaled(shipped, 3.0), shipped, _scaled(shipped, 3.0)])
    assert dearer["measurement"]["raw"]["4"]["fsdp"]["extra_s"] == pytest.approx(
        [3 * x for x in orig["4"]["fsdp"]["extra_s"]])
    four = {w["ranks"]: w["chip"]["efficiency"] for w in dearer["worlds"]}[4]
    base = {w["ranks"]: w["chip"]["efficiency"] for w in merged["worlds"]}[4]
    fsdp = lambda e: e["fsdp_gather_s"] + e["fsdp_reduce_s"] + e["fsdp_tensor_s"]  # noqa: E731
    assert fsdp(four) > fsdp(base)
    # world 2's peak x 3 in two of three: the chip of world 2 (the host's) reads it
    assert dearer["chip"]["dense_flops_per_s"]["fp32"] == pytest.approx(
        3 * shipped["measurement"]["raw"]["2"]["peak_flops_per_s"]["fp32"])


@pytest.mark.parametrize("breaks, message", [
    (lambda p: p["measurement"].pop("raw"), "measurement.raw is missing"),
    (lambda p: p["measurement"]["raw"].pop("4"), "measured different things"),
    (lambda p: p["measurement"]["raw"]["2"]["fsdp"]["extra_s"].pop(),
     "measurement.raw.2.fsdp.extra_s: 12 entries in the first calibration, 11"),
    (lambda p: p["measurement"]["raw"]["2"]["op_kernels"].update({"fp32:conv:1:2:3": [0, 0]}),
     "measurement.raw.2.op_kernels: the calibrations measured different things"),
    (lambda p: p["measurement"].update(quick=True), "measurement.quick is True"),
    (lambda p: p["measurement"].update(device="cuda"), "measurement.device is 'cuda'"),
])
def test_calibrations_that_do_not_match_are_refused_naming_the_field(shipped, breaks, message):
    other = copy.deepcopy(shipped)
    breaks(other)
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("[", r"\[")):
        merge_profiles([shipped, other], ["a.json", "b.json"])
    with pytest.raises(ValueError, match="at least 2 calibrations"):
        merge_profiles([shipped])


def test_merge_command_writes_a_profile_the_cost_model_loads(tmp_path, shipped, capsys):
    a, b, c, out = (tmp_path / f"{n}.json" for n in ("a", "b", "c", "merged"))
    for path, factor in ((a, 1.0), (b, 2.0), (c, 0.9)):
        path.write_text(json.dumps(_scaled(shipped, factor)))
    sub = argparse.ArgumentParser().add_subparsers()
    calibrate_cli.add_command(sub)
    parser = sub.choices["calibrate"]
    args = parser.parse_args(["--merge", str(a), str(b), str(c), "--out", str(out)])
    assert args.func(args) == 0
    assert "median of 3 calibrations" in capsys.readouterr().out
    cluster = hardware.load_cpu_cluster(4, path=out)
    assert efficiency_for(cluster.chip).fsdp_gather_s >= 0 and cluster.levels[0].size == 4
    assert [m["file"] for m in json.loads(out.read_text())["measurement"]["merged_from"]] == [
        str(a), str(b), str(c)]
    # a file that is not a profile: exit 2, nothing written
    (tmp_path / "bad.json").write_text("{")
    args = parser.parse_args(["--merge", str(a), str(tmp_path / "bad.json"),
                              "--out", str(tmp_path / "x.json")])
    assert args.func(args) == 2
    assert "bad.json: cannot read it as a profile file" in capsys.readouterr().out
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(ValueError, match="at least 2"):
        merge_files([str(a)])


def test_the_merged_host_world_is_the_calibrated_hosts_not_this_machines(shipped, monkeypatch):
    # merged on a machine with 4 cores: the default cluster stays the 2-rank world the
    # calibrations were taken on
    from workbench import calibrate_collectives
    monkeypatch.setattr(calibrate_collectives, "host_ranks", lambda device: 4)
    merged = merge_profiles([shipped, shipped])
    assert shipped["host_level"]["size"] == 2
    assert merged["host_level"]["size"] == 2
    assert merged["host_level"]["bandwidth_Bps"] == pytest.approx(
        shipped["host_level"]["bandwidth_Bps"])


def test_ddp_figures_are_fitted_beyond_the_modelled_all_reduce(shipped):
    from workbench.calibrate import Settings
    from workbench.calibrate_collectives import _comm_model, fit_collectives, world_profile
    raw = copy.deepcopy(shipped["measurement"]["raw"]["2"])
    t = _comm_model(fit_collectives(raw["collectives"], 2), 2)
    wire_s = t("all_reduce", 1.0) - t("all_reduce", 0.0)  # the fit's seconds per byte
    assert wire_s > 0
    settings = Settings(device="cpu", worlds=(2,))
    raw["ddp"].update(step_s=5e-3, byte_s=wire_s + 1e-9)
    eff = world_profile(raw, 2, settings, "stamp")["chip"]["efficiency"]
    # the per-step figure less the all-reduce's fixed part (call + latency), the per-byte
    # figure less its bandwidth part: 1 ns a byte of DDP's own
    assert eff["ddp_step_s"] == pytest.approx(5e-3 - t("all_reduce", 0.0), rel=1e-12)
    assert eff["ddp_byte_s"] == pytest.approx(1e-9, rel=1e-6)
    raw["ddp"].update(byte_s=wire_s / 2)  # cheaper than the fitted collective: none left
    assert world_profile(raw, 2, settings, "stamp")["chip"]["efficiency"]["ddp_byte_s"] == 0.0
