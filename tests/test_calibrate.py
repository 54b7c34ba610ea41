"""`workbench calibrate`: the fits (exact on synthetic data), the profile file, errors, a quick
end-to-end run, and that predictions use the calibrated figures. Never asserts on wall time:
the accuracy against measured runs is `benchmarks/cpu_validation.py`'s table."""
import argparse
import json

import numpy as np
import pytest

from workbench import calibrate, calibrate_blocks, calibrate_cli, costmodel, hardware, models
from workbench.calibrate_collectives import fit_collectives, merge_ranks
from workbench.calibrate_ops import op_key
from workbench.costmodel.efficiency import (Curve, efficiency_for, efficiency_from_dict,
                                            efficiency_to_dict)

PEAK = 1e11


def test_fit_curve_is_exact_on_points_of_a_curve():
    # seconds = (F + F_half) / (peak x e_max) with e_max 0.8, F_half 1e6
    flops = np.array([1e5, 1e6, 1e7, 1e8])
    seconds = (flops + 1e6) / (PEAK * 0.8)
    e_max, half = calibrate.fit_curve(flops, seconds, PEAK)
    assert e_max == pytest.approx(0.8, rel=1e-9) and half == pytest.approx(1e6, rel=1e-9)
    # the fitted curve gives back the measured fractions: e = F / (peak x seconds)
    assert Curve(e_max, half)(flops) == pytest.approx(flops / (PEAK * seconds), rel=1e-9)


def test_fit_curve_refuses_too_few_sizes_and_bad_values():
    with pytest.raises(ValueError, match=">= 2 distinct sizes"):
        calibrate.fit_curve([1e6], [1e-5], PEAK)
    with pytest.raises(ValueError, match="must be > 0"):
        calibrate.fit_curve([1e6, 2e6], [1e-5, -1e-5], PEAK)


def test_width_term_is_exact_on_synthetic_narrow_ops():
    # width_sat 32: an op 8 wide streams at fill 8/32 = 0.25 of the curve's rate:
    # seconds = F / (peak e_max 0.25) + F_half / (peak e_max)
    e_max, half = 0.5, 2e5
    flops = [1e6, 4e6]
    seconds = [f / (PEAK * e_max * 0.25) + half / (PEAK * e_max) for f in flops]
    assert calibrate.fit_width(flops, [8, 8], seconds, (e_max, half), PEAK) == pytest.approx(32)
    c = Curve(e_max, half, width_sat=32)
    # e = e_max F / (F / fill + F_half) = 0.5 x 1e6 / (4e6 + 2e5)
    assert float(c(1e6, 8)) == pytest.approx(0.5 * 1e6 / (4e6 + 2e5))
    assert float(c(1e6, 64)) == pytest.approx(float(Curve(e_max, half)(1e6)))  # wide: no effect


def test_fit_collectives_is_exact_on_the_formula():
    # world 2: all-reduce 2 hops and wire 2(n-1)/n = 1; all-gather/reduce-scatter/broadcast/
    # send-recv 1 hop, wire 1/2, 1/2, 1, 1
    call, lat, bw = 20e-6, 100e-6, 2e9
    hops = {"all_reduce": 2, "all_gather": 1, "reduce_scatter": 1, "broadcast": 1, "send_recv": 1}
    wire = {"all_reduce": 1.0, "all_gather": 0.5, "reduce_scatter": 0.5, "broadcast": 1.0,
            "send_recv": 1.0}
    rows = [{"kind": k, "bytes": b, "seconds": call + hops[k] * lat + wire[k] * b / bw}
            for k in hops for b in (32, 2**16, 2**20, 2**24)]
    fit = fit_collectives(rows, 2)
    assert fit["call_s"] == pytest.approx(call, rel=1e-6)
    assert fit["latency_s"] == pytest.approx(lat, rel=1e-6)
    assert fit["bandwidth_Bps"] == pytest.approx(bw, rel=1e-6)


def test_fit_dispatch_recovers_per_kind_costs_from_blocks():
    # blocks: {linear, elementwise} (2 linear + 1 elementwise), (1 linear + 2 elementwise),
    # (1 norm + 1 linear); dispatch linear 10 us, elementwise 3 us, norm 7 us forward, twice
    # that backward; kernels 1 us per op.
    true = {"linear": 10e-6, "elementwise": 3e-6, "norm": 7e-6}
    ops = {"a": ["linear", "linear", "elementwise"], "b": ["linear", "elementwise", "elementwise"],
           "c": ["norm", "linear"]}
    blocks = {n: {"fwd_s": sum(true[k] + 1e-6 for k in ks),
                  "bwd_s": sum(2 * true[k] + 1e-6 for k in ks),
                  "ops": [[k, {}] for k in ks]} for n, ks in ops.items()}
    fit = calibrate_blocks.fit_dispatch(blocks, lambda kind, shape, backward: 1e-6)
    for kind, v in true.items():
        assert fit["fwd_s"][kind] == pytest.approx(v, rel=1e-9)
        assert fit["bwd_s"][kind] == pytest.approx(2 * v, rel=1e-9)


def test_merge_ranks_takes_medians_and_keeps_structure():
    ranks = [{"a": 1.0, "b": [{"x": 3.0, "k": "n"}], "s": "r0"},
             {"a": 5.0, "b": [{"x": 1.0, "k": "n"}], "s": "r1"},
             {"a": 2.0, "b": [{"x": 2.0, "k": "n"}], "s": "r2"}]
    assert merge_ranks(ranks) == {"a": 2.0, "b": [{"x": 2.0, "k": "n"}], "s": "r0"}


# ----------------------------------------------------------------------------- profile files

def _efficiency(**extra) -> dict:
    """A synthetic calibrated efficiency table (round numbers)."""
    curve = {"e_max": 0.5, "half_flops": 0.0, "width_sat": 0.0}
    d = {"source": "synthetic test figures", "memory": 1.0, "op_overhead_s": 1e-5,
         "curves": {k: dict(curve) for k in ("linear", "attention", "conv", "lstm")},
         "dispatch_fwd_s": {"linear": 2e-5}, "dispatch_bwd_s": {"linear": 4e-5},
         "optimizer_tensor_s": 3e-5, "optimizer_bytes_per_param": 40.0}
    d.update(extra)
    return d


def _profile(efficiency=None) -> dict:
    """A profile file with a 2-rank host world and a 4-rank shared-cores world."""
    def chip(flops):
        return {"name": "cpu", "dense_flops_per_s": {"fp32": flops, "bf16": 2 * flops},
                "memory_bytes": 2**34, "memory_bandwidth_Bps": 1e10, "nvml_names": [],
                "source": "Measured (synthetic)", "efficiency": efficiency or _efficiency()}

    def level(n, lat):
        return {"name": "node", "size": n, "bandwidth_Bps": 1e9, "latency_s": lat,
                "oversubscription": 1.0, "source": "synthetic gloo figures"}
    return {"chip": chip(1e11), "host_level": level(2, 1e-4),
            "worlds": [{"ranks": 2, "chip": chip(1e11), "level": level(2, 1e-4)},
                       {"ranks": 4, "chip": chip(5e10), "level": level(4, 3e-4)}],
            "measurement": {"note": "synthetic"}}


def test_profile_round_trip_gives_the_same_clusters_and_efficiency(tmp_path):
    path = tmp_path / "profile.json"
    calibrate_cli.write_profile(_profile(), path)
    host = hardware.load_cpu_cluster(path=path)
    assert host.n_chips == 2 and host.levels[0].latency_s == 1e-4
    four = hardware.load_cpu_cluster(4, path=path)
    assert four.chip.peak_flops_per_s("fp32") == 5e10 and four.levels[0].latency_s == 3e-4
    assert hardware.calibrated_worlds(path) == (2, 4)
    # the chip carries its efficiency, which the cost model reads back
    eff = efficiency_for(four.chip)
    assert eff.dispatch_s("linear") == 2e-5 and eff.dispatch_s("linear", backward=True) == 4e-5
    assert eff.dispatch_s("norm") == 1e-5 and eff.optimizer_tensor_s == 3e-5
    assert efficiency_from_dict(efficiency_to_dict(eff)) == eff
    # `--cluster FILE`: a calibration profile loads as a cluster file, at the asked world size
    assert hardware.load_cluster(path) == host
    assert hardware.load_cluster(path, 4) == four
    # and the chip survives the cluster-table format too (save_cluster / load_cluster)
    hardware.save_cluster(four, tmp_path / "c.json")
    assert hardware.load_cluster(tmp_path / "c.json") == four


@pytest.mark.parametrize("change,message", [
    (lambda p: p.pop("host_level"), "missing key 'host_level'"),
    (lambda p: p["worlds"][1].pop("ranks"), r"worlds\[1\]: missing key 'ranks'"),
    (lambda p: p["worlds"][1]["level"].update(size=3),
     r"worlds\[1\].level.size \(3\) must equal worlds\[1\].ranks \(4\)"),
    (lambda p: p["worlds"][1]["chip"]["efficiency"].update(bogus=1), "efficiency: unknown key 'bogus'"),
    (lambda p: p["worlds"][1]["chip"]["efficiency"]["curves"].pop("conv"), "efficiency.curves: missing key 'conv'"),
    (lambda p: p["worlds"][1]["chip"]["efficiency"]["curves"]["linear"].update(e_max=-1),
     r"efficiency.curves.linear.e_max must be > 0"),
    (lambda p: p["worlds"][1]["chip"]["efficiency"]["dispatch_fwd_s"].update(matmul=1e-5),
     "efficiency.dispatch_fwd_s: op kind 'matmul' is not one of"),
    (lambda p: p["worlds"][1]["chip"]["efficiency"].update(comm_overlap=1.5),
     r"efficiency.comm_overlap must be >= 0 and <= 1"),
    (lambda p: p["worlds"][1]["chip"]["efficiency"].update(rank_contention=0.5),
     r"efficiency.rank_contention must be >= 1"),
])
def test_bad_profile_fields_are_named(tmp_path, change, message):
    profile = _profile()
    change(profile)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(profile))
    with pytest.raises(ValueError, match=message):
        hardware.load_cpu_cluster(4, path=path)


def test_an_uncalibrated_world_is_refused_with_the_rule(tmp_path):
    path = tmp_path / "profile.json"
    calibrate_cli.write_profile(_profile(), path)
    with pytest.raises(ValueError, match=r"n_chips \(3\) must be <= 2, the cores of the calibrated "
                                         r"host .*calibrated with shared cores \(2, 4\)"):
        hardware.load_cpu_cluster(3, path=path)


# ----------------------------------------------------------------------------- predictions

def test_prediction_uses_the_calibrated_figures(tmp_path):
    # Synthetic profile: every curve e = 0.5 (no F_half, no width term), linear dispatch 20 us
    # forward / 40 us backward, every other kind 10 us, memory 1e10 B/s; peak 1e11 FLOP/s.
    path = tmp_path / "profile.json"
    calibrate_cli.write_profile(_profile(), path)
    cluster = hardware.load_cpu_cluster(2, path=path)
    cfg = models.get("llama-tiny")
    graph = costmodel.graph(cfg)
    e = costmodel.estimate(graph, "dp=2,gbs=4,mb=2,dtype=fp32", cluster)
    expected = 0.0
    for layer in graph.layers:  # the graph is per sample: a microbatch of 2 doubles FLOPs
        f, b = 2 * layer.fwd_flops, 2 * layer.bwd_flops  # and bytes; fp32 doubles the bytes
        moved = (layer.read_bytes + layer.write_bytes) * 2 * 2 / 1e10  # again (graph: 2 B)
        roof_f = max(f / (1e11 * 0.5), moved) if layer.counted else moved
        roof_b = max(b / (1e11 * 0.5), 2 * moved) if layer.counted else 2 * moved
        d_f, d_b = (2e-5, 4e-5) if layer.kind == "linear" else (1e-5, 1e-5)
        expected += roof_f + roof_b + d_f + d_b
    # one microbatch per rank (gbs 4 = dp 2 x mb 2): the step's compute is this sum
    assert e.breakdown_s["compute_s"] == pytest.approx(expected, rel=1e-9)
    # optimizer: every parameter x 40 bytes / 1e10 B/s + 21 tensors (llama-tiny's) x 30 us
    model = models.build(cfg)
    tensors = len(list(model.parameters()))
    assert tensors == 21
    params = sum(p.numel() for p in model.parameters())
    assert e.breakdown_s["optimizer_s"] == pytest.approx(params * 40 / 1e10 + tensors * 3e-5)


def test_gpu_presets_carry_no_framework_costs():
    for name in ("a100-sxm-80gb", "h100-sxm", "b200"):
        e = efficiency_for(name)
        assert e.comm_overlap == 1.0 and e.collective_call_s == e.fsdp_gather_s == 0.0
        assert e.optimizer_tensor_s == e.tp_op_fwd_s == e.pp_action_s == e.cp_step_s == 0.0
        assert e.dispatch_s("linear") == e.op_overhead_s == 5e-6


def test_prediction_cluster_uses_the_world_calibrated_for_the_ranks():
    from workbench.runner import prediction_cluster
    for n in hardware.calibrated_worlds():
        assert prediction_cluster("cpu", n) == hardware.load_cpu_cluster(n)
    widest = max(hardware.calibrated_worlds())
    base = hardware.load_cpu_cluster(widest)
    big = prediction_cluster("cpu", 2 * widest)  # not calibrated: time sharing, labelled
    assert "EXTRAPOLATED" in big.chip.source and big.n_chips == 2 * widest
    assert big.chip.peak_flops_per_s("fp32") == pytest.approx(base.chip.peak_flops_per_s("fp32") / 2)
    assert big.levels[0].latency_s == pytest.approx(2 * base.levels[0].latency_s)
    assert efficiency_for(big.chip).rank_contention == pytest.approx(
        2 * efficiency_for(base.chip).rank_contention)


def test_pipeline_bubble_is_the_other_stages_fill_and_drain():
    from workbench.costmodel.engine import pipeline_bubble_s
    # 4 balanced stages of 2 ms: the 3 others' 6 ms; with vpp 2: 3 ms; no pipeline: nothing
    assert pipeline_bubble_s(6e-3, 4, 1) == pytest.approx(6e-3)
    assert pipeline_bubble_s(6e-3, 4, 2) == pytest.approx(3e-3)
    assert pipeline_bubble_s(0.0, 1, 1) == pytest.approx(0.0)


def test_the_calibrated_worlds_say_how_many_ranks_share_a_core():
    from workbench.calibrate_collectives import rank_contention
    assert rank_contention(4, "cuda") == 1.0
    assert rank_contention(1, "cpu") == 1.0
    cores = len(__import__("os").sched_getaffinity(0))
    assert rank_contention(4 * cores, "cpu") == 4.0
    # the shipped profile: 2 and 4 ranks measured on a 2-core host
    assert [efficiency_for(hardware.load_cpu_cluster(n).chip).rank_contention
            for n in hardware.calibrated_worlds()] == [1.0, 2.0]


def test_the_default_cpu_profile_is_calibrated():
    cl = hardware.cluster("cpu")
    eff = efficiency_for(cl.chip)
    assert "workbench calibrate" in eff.source and eff.optimizer_tensor_s > 0
    assert {"linear", "conv", "norm", "elementwise"} <= set(eff.dispatch_fwd_s)
    assert 4 in hardware.calibrated_worlds()


# ----------------------------------------------------------------------------- command line

def _parser():
    p = argparse.ArgumentParser()
    calibrate_cli.add_command(p.add_subparsers())
    return p


@pytest.mark.parametrize("argv,message", [
    (["calibrate", "--device", "tpu"], "device must be one of cpu, cuda, got 'tpu'"),
    (["calibrate", "--world", "2,x"], "--world must be comma-separated integers"),
    (["calibrate", "--world", "0"], "--world must list world sizes >= 1"),
    (["calibrate", "--ops-for", "no-such-study.toml"], "no-such-study.toml"),
])
def test_bad_arguments_exit_2_naming_the_field(capsys, argv, message):
    args = _parser().parse_args(argv)
    assert args.func(args) == 2
    assert message in capsys.readouterr().out


def test_quick_calibrate_writes_a_profile_the_cost_model_loads(tmp_path, capfd):
    out = tmp_path / "cal.json"
    study = tmp_path / "one.toml"  # the ops of one tiny model, timed at their shapes
    study.write_text('[study]\nname = "one"\nquestion = "q"\ndo = ["predict"]\n'
                     '[cluster]\npreset = "cpu"\n[[models]]\nname = "alexnet-tiny"\n'
                     '[sweep]\nchips = [2]\nglobal_batch_per_chip = 4\n'
                     '[plan]\nplans = ["dp=*,mb=2,dtype=fp32"]\n')
    args = _parser().parse_args(["calibrate", "--quick", "--world", "2", "--out", str(out),
                                 "--ops-for", str(study)])
    assert args.func(args) == 0
    text = capfd.readouterr().out  # rank 0 prints its progress from its own process
    assert "collectives" in text and f"wrote {out}" in text
    cluster = hardware.load_cpu_cluster(2, path=out)
    eff = efficiency_for(cluster.chip)
    assert cluster.levels[0].size == 2 and cluster.levels[0].bandwidth_Bps > 0
    assert set(eff.curves_fwd) == {"linear", "batched_matmul", "attention", "conv", "lstm"}
    # quick settings are noisy: a kind's fitted dispatch may come out 0, not all of them
    assert sum(eff.dispatch_fwd_s.values()) > 0 and eff.optimizer_tensor_s > 0
    written = json.loads(out.read_text())["worlds"][0]["chip"]["efficiency"]
    assert {"tp_op_fwd_s", "tp_op_bwd_s", "tp_collective_s"} <= set(written)
    e = costmodel.estimate(costmodel.graph("llama-tiny"), "fsdp=2,gbs=4,mb=2,dtype=fp32", cluster)
    assert e.step_time_s > 0 and e.breakdown_s["fsdp_exposed_s"] > 0
    # alexnet-tiny at microbatch 2: its 5 convolutions and 3 linear layers, each measured
    graph = costmodel.graph(models.get("alexnet-tiny"), batch=2)
    assert set(eff.op_kernels_s) == {
        op_key(l.kind, l.fwd_flops, l.bwd_flops, l.params) for l in graph.layers
        if l.kind in ("linear", "conv")}
    # and one microbatch of the whole model, forward and backward
    from workbench.calibrate_models import model_key
    assert list(eff.model_passes_s) == [model_key(costmodel.graph(models.get("alexnet-tiny")), 2)]
    assert all(v > 0 for v in next(iter(eff.model_passes_s.values())))
    # the host's speed on the reference work, before the first world and after the last
    check = json.loads(out.read_text())["measurement"]["host_check"]
    assert set(check) == {"start", "end", "change"}
    assert set(check["change"]) == {"matmul_flops_per_s", "copy_Bps"}
    assert all(check["start"][k] > 0 and check["end"][k] > 0 for k in check["change"])


def test_host_drift_is_the_change_from_start_to_end_and_warns_beyond_the_limit():
    from workbench.calibrate_drift import DRIFT_LIMITS, drift_warning, host_drift
    assert DRIFT_LIMITS == {"matmul_flops_per_s": 0.08, "copy_Bps": 0.25}
    start = {"matmul_flops_per_s": 100.0, "copy_Bps": 20.0}
    still = host_drift(start, {"matmul_flops_per_s": 104.0, "copy_Bps": 17.0})
    # 104 / 100 - 1 = +4% (limit 8%), 17 / 20 - 1 = -15% (limit 25%): both within
    assert still["change"] == pytest.approx({"matmul_flops_per_s": 0.04, "copy_Bps": -0.15})
    assert drift_warning(still) is None
    slowed = host_drift(start, {"matmul_flops_per_s": 90.0, "copy_Bps": 12.0})  # -10%, -40%
    message = drift_warning(slowed)
    assert "matmul_flops_per_s -10% (limit 8%)" in message
    assert "copy_Bps -40% (limit 25%)" in message and "--merge" in message
    assert drift_warning(slowed, {"matmul_flops_per_s": 0.2, "copy_Bps": 0.5}) is None


def test_a_profiles_host_figures_are_the_median_of_every_check_it_holds():
    from workbench.calibrate_drift import host_mismatch_warning, profile_host_figures
    check = lambda a, b: {"start": {"matmul_flops_per_s": a, "copy_Bps": 1.0},  # noqa: E731
                          "end": {"matmul_flops_per_s": b, "copy_Bps": 3.0}}
    # merged: its pooled calibrations' checks (one had none): 80, 90, 100, 120 -> 95; 1, 3 -> 2
    merged = {"merged_from": [{"host_check": check(80.0, 90.0)}, {"host_check": None},
                              {"host_check": check(100.0, 120.0)}]}
    assert profile_host_figures(merged) == {"matmul_flops_per_s": 95.0, "copy_Bps": 2.0}
    assert profile_host_figures({"host_check": check(60.0, 70.0)})["matmul_flops_per_s"] == 65.0
    assert profile_host_figures({"merged_from": [{"host_check": None}]}) is None
    assert "records no host check" in host_mismatch_warning(None, {"copy_Bps": 1.0})
    figures = {"matmul_flops_per_s": 95.0, "copy_Bps": 2.0}
    # 76 / 95 - 1 = -20% (limit 8%); 2.2 / 2 - 1 = +10% (limit 25%)
    message = host_mismatch_warning(figures, {"matmul_flops_per_s": 76.0, "copy_Bps": 2.2})
    assert "matmul_flops_per_s -20% (limit 8%)" in message and "copy_Bps" not in message
    assert "workbench calibrate" in message
    assert host_mismatch_warning(figures, {"matmul_flops_per_s": 99.0, "copy_Bps": 2.2}) is None



def test_peak_matmul_shrinks_for_a_dtype_the_host_does_not_accelerate():
    import time
    calls = []

    def at(n, call_s):
        calls.append(n)
        return lambda: time.sleep(call_s)
    full = calibrate.Settings()
    # a free call at 512 projects to ~0 s at 2048: the full size
    assert calibrate.peak_size(lambda n: at(n, 0.0), full) == 2048
    # 5 ms at 512 projects to >= 40 ms at 1024 and >= 320 ms at 2048 (x8 per doubling)
    assert calibrate.peak_size(lambda n: at(n, 0.005), full, call_limit_s=0.2) == 1024
    assert calibrate.peak_size(lambda n: at(n, 0.005), full, call_limit_s=0.03) == 512
    assert set(calls) == {512}  # only 512 is ever timed to choose
    calls.clear()
    assert calibrate.peak_size(lambda n: at(n, 1.0), calibrate.Settings(quick=True)) == 512
    assert calls == []  # --quick always measures at 512 without timing



def test_the_host_check_times_fp32_at_full_size_and_no_bf16(monkeypatch):
    from workbench.calibrate_drift import measure_host
    asked = []
    monkeypatch.setattr(calibrate, "measure_peak",
                        lambda settings, dtypes, limit: asked.append((dtypes, limit)) or {"fp32": 1.0})
    monkeypatch.setattr(calibrate, "measure_memory_bandwidth", lambda settings: 2.0)
    assert measure_host(calibrate.Settings()) == {"matmul_flops_per_s": 1.0, "copy_Bps": 2.0}
    # bf16 takes minutes on hosts without bf16 instructions; no size limit keeps the
    # reference the same 2048^3 matmul on every host, so checks compare
    assert asked == [(("fp32",), float("inf"))]


def _llama_tiny_step_s(plan: str, **figures) -> float:
    """Predicted step time of Llama-tiny (2 layers, vocabulary-parallel embedding and head)
    under `plan` on the 2-rank CPU profile with these efficiency `figures` replaced."""
    from efficiency_support import with_efficiency
    cl = hardware.load_cpu_cluster(2)
    return costmodel.estimate(costmodel.graph("llama-tiny"), plan,
                              with_efficiency(cl, **figures)).step_time_s


def test_fsdp_fixed_costs_are_charged_per_gathered_tensor_microbatch_and_step():
    from workbench.costmodel.engine import layer_facts
    from workbench.costmodel.estimator import cached_profile
    graph, step_s = costmodel.graph("llama-tiny"), _llama_tiny_step_s
    none = dict(fsdp_tensor_s=0.0, fsdp_microbatch_s=0.0, fsdp_step_s=0.0)
    some = dict(fsdp_tensor_s=1e-5, fsdp_microbatch_s=1e-3, fsdp_step_s=3e-3)
    fsdp = "fsdp=2,mb=2,gbs=8,dtype=fp32"  # 2 microbatches per rank, one stage
    # parameter tensors gathered per microbatch: each unit's twice (forward and backward),
    # the root's (embedding, final norm, head: the pre and post rows) once
    rows = layer_facts(cached_profile(graph))[1]
    gathered = 2 * (rows.sum() - rows[0] - rows[-1]) + rows[0] + rows[-1]
    assert gathered > 0
    # 2 microbatches x (gathered x 10 us + 1 ms) + 3 ms once per step
    assert step_s(fsdp, **some) == pytest.approx(step_s(fsdp, **none)
                                                 + 2 * (gathered * 1e-5 + 1e-3) + 3e-3)
    dp = "dp=2,mb=2,gbs=8,dtype=fp32"  # not sharded: no FSDP costs
    assert step_s(dp, **some) == pytest.approx(step_s(dp, **none))
    # per byte gathered: the root's weights once and every unit's twice per microbatch (fp32)
    from workbench.costmodel.profile import _row
    in_root = [_row(layer.unit, graph.units) in (0, graph.units + 1) for layer in graph.layers]
    total = sum(layer.params for layer in graph.layers)
    root = sum(layer.params for layer, r in zip(graph.layers, in_root) if r)
    assert 0 < root < total
    gathered_bytes = (root + 2 * (total - root)) * 4
    # 2 microbatches x gathered bytes x 1 ns
    assert step_s(fsdp, fsdp_byte_s=1e-9) == pytest.approx(step_s(fsdp, fsdp_byte_s=0.0)
                                                           + 2 * gathered_bytes * 1e-9)


def test_fsdp_fit_recovers_its_terms_beyond_the_modelled_collectives():
    from workbench.calibrate_framework import fsdp_fit

    def t(kind, size):  # a made-up collective model: latency + bytes / bandwidth
        return {"all_gather": 1e-4 + size * 1e-9, "reduce_scatter": 2e-4 + size * 2e-9}[kind]
    truth = dict(gather_s=1e-3, tensor_s=1e-5, reduce_s=2e-3, microbatch_s=5e-4, step_s=3e-3,
                 byte_s=2e-9)
    raw = {"rows": [], "extra_s": [], "layer_bytes": [], "layers": []}
    for micro in (1, 2):
        for width, units, layers in ((16, 2, 1), (16, 8, 4), (16, 2, 4), (256, 2, 1),
                                     (256, 8, 1), (16, 8, 1)):
            b = (width * width + width) * 4
            row = [micro * (2 * units + 1), 2 * micro * (2 * units * layers + 1), units + 1,
                   micro, 1.0]
            gathered = micro * (1 + 2 * units * layers) * b
            # each gather whole, each reduction's bandwidth part (one latency: the engine's)
            modelled = (micro * (t("all_gather", b) + 2 * units * t("all_gather", layers * b))
                        + units * (t("reduce_scatter", layers * b) - t("reduce_scatter", 0))
                        + t("reduce_scatter", b) - t("reduce_scatter", 0))
            framework = (row[0] * truth["gather_s"] + row[1] * truth["tensor_s"]
                         + row[2] * truth["reduce_s"] + micro * truth["microbatch_s"]
                         + truth["step_s"] + gathered * truth["byte_s"])
            raw["rows"].append(row)
            raw["extra_s"].append(modelled + framework)
            raw["layer_bytes"].append(b)
            raw["layers"].append(layers)
    fit = fsdp_fit(raw, t)
    assert fit == pytest.approx(truth, rel=1e-6)


def test_ddp_fixed_costs_are_charged_per_microbatch_per_tensor_and_step():
    from workbench.costmodel.engine import layer_facts
    from workbench.costmodel.estimator import cached_profile
    graph, step_s = costmodel.graph("llama-tiny"), _llama_tiny_step_s
    none = dict(ddp_microbatch_s=0.0, ddp_tensor_s=0.0, ddp_step_s=0.0)
    some = dict(ddp_microbatch_s=1e-3, ddp_tensor_s=1e-5, ddp_step_s=3e-3)
    dp = "dp=2,mb=2,gbs=8,dtype=fp32"  # 2 microbatches per rank, one stage
    tensors = layer_facts(cached_profile(graph))[1].sum()  # every parameter tensor, once
    assert tensors > 0
    # 2 microbatches x 1 ms + tensors x 10 us once per step (the synchronising microbatch's
    # hooks: measured the same at 1 and 2 microbatches) + 3 ms per step
    assert step_s(dp, **some) == pytest.approx(step_s(dp, **none)
                                               + 2 * 1e-3 + tensors * 1e-5 + 3e-3)
    fsdp = "fsdp=2,mb=2,gbs=8,dtype=fp32"  # sharded: no DDP costs
    assert step_s(fsdp, **some) == pytest.approx(step_s(fsdp, **none))


def test_ddp_byte_cost_is_charged_per_gradient_byte_all_reduced():
    graph, step_s = costmodel.graph("llama-tiny"), _llama_tiny_step_s
    dp = "dp=2,mb=2,gbs=8,dtype=fp32"  # one stage: the rank holds every parameter
    # fp32 gradients: 4 bytes a parameter, all-reduced once per step, 1 ns a byte
    assert step_s(dp, ddp_byte_s=1e-9) == pytest.approx(step_s(dp, ddp_byte_s=0.0)
                                                        + 4 * graph.params * 1e-9)
    fsdp = "fsdp=2,mb=2,gbs=8,dtype=fp32"  # sharded: DDP's costs do not apply
    assert step_s(fsdp, ddp_byte_s=1e-9) == pytest.approx(step_s(fsdp, ddp_byte_s=0.0))


def test_tp_collective_cost_is_charged_per_tp_collective_call():
    from efficiency_support import with_efficiency
    cl = hardware.load_cpu_cluster(2)
    graph = costmodel.graph("llama-tiny")  # 2 layers, vocabulary-parallel embedding and head

    def step_s(plan, **figures):
        return costmodel.estimate(graph, plan, with_efficiency(cl, **figures)).step_time_s
    tp = "tp=2,mb=1,gbs=2,dtype=fp32"  # 2 microbatches on the one TP group
    calls = sum(c.count_per_step for c in costmodel.estimate(graph, tp, cl).comm
                if c.group == "tp")
    # per microbatch: each layer's wo and w2 all-reduce forward and backward (2 x 2 x 2), the
    # vocabulary-parallel embedding forward, the head backward, the loss's row max, sum of
    # exponentials and target logit: 13; x 2 microbatches
    assert calls == 2 * (2 * 2 * 2 + 2 + 3) == 26
    # 26 calls x 1 ms
    assert step_s(tp, tp_collective_s=1e-3) == pytest.approx(step_s(tp, tp_collective_s=0.0)
                                                             + 26 * 1e-3)
    dp = "dp=2,mb=1,gbs=2,dtype=fp32"  # no TP collective: nothing charged
    assert step_s(dp, tp_collective_s=1e-3) == pytest.approx(step_s(dp, tp_collective_s=0.0))


def test_compute_pad_adds_zero_but_computes_both_ways():
    import torch
    from workbench.calibrate_framework import compute_pad
    x = torch.randn(2, 16, requires_grad=True)
    pad = compute_pad(3, "cpu")
    y = pad(x)
    assert torch.equal(y, x)                       # + 0 * (the chain's sum): the same values
    y.sum().backward()
    # the chain's backward ran
    assert pad.leaf.grad is not None and pad.leaf.grad.shape == (192, 192)
    assert not list(pad.parameters())              # nothing for DDP or FSDP to see
    assert isinstance(compute_pad(0, "cpu"), torch.nn.Identity)
