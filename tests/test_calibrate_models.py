"""Whole-model microbatches timed on one rank (`workbench/calibrate_models.py`) and how the
engine spreads the difference from its op-level prediction over the ops."""
import time

import pytest
from efficiency_support import with_efficiency

from workbench import costmodel, hardware, models
from workbench.calibrate import Settings
from workbench.calibrate_models import (MAX_MODEL_BYTES, measure_models, model_bytes,
                                        model_key, model_passes, passes_from_dict,
                                        study_models, time_passes)
from workbench.costmodel.efficiency import efficiency_for, efficiency_from_dict, efficiency_to_dict


def _with_passes(cluster, table):
    """`cluster` whose chip's efficiency table holds `table` as its model_passes_s."""
    return with_efficiency(cluster, model_passes_s=table)


def _no_passes(cluster):
    return with_efficiency(cluster, model_passes_s=None)


def test_model_key_tells_apart_overrides_microbatches_and_dtypes():
    four = costmodel.graph(models.get("llama-tiny", layers=4, kv_heads=4))
    two = costmodel.graph(models.get("llama-tiny", layers=2, kv_heads=4))
    keys = {model_key(four, 2), model_key(two, 2), model_key(four, 1), model_key(four, 2, "bf16")}
    assert len(keys) == 4
    assert model_key(four, 2).startswith("fp32:llama:2:")


def test_every_model_of_the_validation_study_is_listed_once_per_microbatch():
    table = study_models(["studies/cpu-validation.toml"])
    names = {name for name, _, _ in table.values()}
    assert len(names) == 17  # every family's tiny flavour, at microbatch 2 (DP, FSDP, TP, PP)
    assert sorted(mb for _, _, mb in table.values()) == [1] * 3 + [2] * 17
    # context parallelism runs Llama, GPT and ViT (with 3 x 3 patches) at microbatch 1
    assert sorted(name for name, _, mb in table.values() if mb == 1) == [
        "gpt-tiny", "llama-tiny", "vit-tiny"]


def test_models_too_large_to_time_and_searched_plans_are_left_out():
    said = []
    # ResNet-50 at microbatch 32: 25.6 M parameters x 8 bytes + its saved activations
    graph = costmodel.graph(models.get("resnet50"))
    assert model_bytes(graph, 32) > MAX_MODEL_BYTES
    assert study_models(["studies/resnet50-dp-scaling.toml"], log=said.append) == {}
    assert said and "resnet50 mb=32" in said[0]
    # the Llama 3 studies search their plans: no microbatch size to time, nothing listed
    assert study_models(["studies/llama3-weak-scaling.toml"], log=said.append) == {}


def test_model_passes_run_the_runner_model_and_loss_and_time_each_pass():
    passes = model_passes("resnet-tiny", {}, 2, "cpu")
    fwd, bwd = passes()
    assert 0 < fwd < 1.0 and 0 < bwd < 1.0
    fwd, bwd = time_passes(passes, duration_s=0.0, min_calls=3)
    assert 0 < fwd < 1.0 and 0 < bwd < 1.0


def test_measure_models_times_forward_and_backward():
    cfg = models.get("lstm-tiny", dropout=0.0)
    key = model_key(costmodel.graph(cfg), 2)
    got = measure_models({key: ("lstm-tiny", {"dropout": 0.0}, 2)},
                         Settings(quick=True), lambda: None, lambda m: None)
    fwd, bwd = got[key]
    assert 0 < fwd < 1.0 and 0 < bwd < 1.0


@pytest.mark.parametrize("scale", [3.0, 0.5])
def test_the_engine_reproduces_a_measured_microbatch_and_keeps_everything_else(scale):
    cl = _no_passes(hardware.load_cpu_cluster(2))
    cfg = models.get("llama-tiny", layers=4, kv_heads=4)
    graph = costmodel.graph(cfg)
    one = costmodel.estimate(graph, "mb=2,gbs=2,dtype=fp32", _no_passes(
        hardware.load_cpu_cluster(1)))
    # time a microbatch as `scale` x the op-level prediction, forward 1/3 and backward 2/3
    measured = scale * one.breakdown_s["compute_s"]
    table = {model_key(graph, 2): [measured / 3, 2 * measured / 3]}
    one_cl = _with_passes(hardware.load_cpu_cluster(1), table)
    got = costmodel.estimate(graph, "mb=2,gbs=2,dtype=fp32", one_cl)
    assert got.breakdown_s["compute_s"] == pytest.approx(measured)  # exact for the unsplit pass
    assert got.breakdown_s["optimizer_s"] == pytest.approx(one.breakdown_s["optimizer_s"])
    # a data-parallel plan of 2 microbatches: twice the measured compute, its DP terms kept
    dp, dp_cl = "dp=2,mb=2,gbs=8,dtype=fp32", _with_passes(cl, table)
    base, got = costmodel.estimate(graph, dp, cl), costmodel.estimate(graph, dp, dp_cl)
    assert got.breakdown_s["compute_s"] == pytest.approx(2 * measured)
    assert got.breakdown_s["dp_exposed_s"] == pytest.approx(base.breakdown_s["dp_exposed_s"],
                                                            rel=0.3)  # overlap moves a little
    # tensor parallel 2 (2 microbatches): time the op level misses is host work, which TP
    # does not divide (added whole); time it over-predicts comes off the kernels, which TP
    # halves where it splits an op (so less of it comes off)
    tp = "tp=2,mb=2,gbs=4,dtype=fp32"
    t_base = costmodel.estimate(graph, tp, cl).breakdown_s["compute_s"]
    t_got = costmodel.estimate(graph, tp, dp_cl).breakdown_s["compute_s"]
    missing = 2 * (measured - one.breakdown_s["compute_s"])
    if scale > 1:
        assert t_got - t_base == pytest.approx(missing)
    else:
        assert 0 < t_base - t_got < -missing
    # another microbatch size or dtype has no entry: the op-level prediction
    other = "dp=2,mb=1,gbs=8,dtype=fp32"
    assert costmodel.estimate(graph, other, dp_cl).step_time_s == pytest.approx(
        costmodel.estimate(graph, other, cl).step_time_s)


@pytest.mark.parametrize("table,message", [
    ({"fp32:llama:2:3:4": [1, 1]}, "is not dtype:model:microbatch:flops:params:layers"),
    ({"fp32:llama:x:3:4:5": [1, 1]}, "is not dtype:model"),
    ({"fp32:llama:2:3:4:5": [1]}, r"must be \[forward_s, backward_s\]"),
    ({"fp32:llama:2:3:4:5": [1, -1]}, r"two numbers >= 0"),
])
def test_bad_tables_are_refused_naming_the_entry(table, message):
    with pytest.raises(ValueError, match=message):
        passes_from_dict(table, "efficiency.model_passes_s")


def test_the_table_round_trips_through_the_profile_format():
    d = efficiency_to_dict(efficiency_for(hardware.load_cpu_cluster(2).chip))
    d["model_passes_s"] = {"fp32:llama:2:3:4:5": [1e-3, 2e-3]}
    back = efficiency_from_dict(d)
    assert back.model_passes_s == {"fp32:llama:2:3:4:5": (1e-3, 2e-3)}
    assert efficiency_from_dict(efficiency_to_dict(back)) == back


def test_time_passes_is_a_rate_that_keeps_the_time_between_passes():
    # each call reports 1 ms forward and 3 ms backward but takes >= 20 ms of wall time (a
    # rank waiting for its core between passes): a median would say 1 + 3 ms, the rate
    # charges the whole window, split 1 : 3 between forward and backward
    def passes():
        time.sleep(0.02)
        return 0.001, 0.003
    fwd, bwd = time_passes(passes, duration_s=0.0, min_calls=3)
    assert fwd + bwd >= 0.02
    assert bwd == pytest.approx(3 * fwd)
