"""Kernels measured at exact op shapes (`workbench/calibrate_ops.py`) and their use by the
cost model."""
import pytest
from efficiency_support import with_efficiency

from workbench import costmodel, hardware, models
from workbench.calibrate import Settings
from workbench.calibrate_ops import (_conv_geometry, build_op, measure_ops, op_key, study_ops,
                                     table_from_dict)
from workbench.costmodel.efficiency import efficiency_for, efficiency_from_dict, efficiency_to_dict
from workbench.costmodel.graph import make_layer


def test_op_key_is_dtype_kind_flops_and_parameters():
    # 2 x 4 tokens x 8 in x 8 out = 512 FLOPs forward, twice that backward (input grad);
    # 8 x 8 weights + 8 biases = 72 parameters
    layer = make_layer("l", "linear", tokens=4, in_features=8, out_features=8)
    assert op_key("linear", layer.fwd_flops, layer.bwd_flops,
                  layer.params) == "fp32:linear:512:1024:72"


@pytest.mark.parametrize("k,n_in,n_out,transposed,expected", [
    (3, 32, 32, False, (1, 1, 0)),   # same padding
    (3, 32, 16, False, (2, 1, 0)),   # strided down by 2
    (1, 16, 16, False, (1, 0, 0)),   # pointwise
    (2, 16, 32, True, (2, 0, 0)),    # transposed up by 2: (16 - 1) x 2 + 2 = 32
    (3, 16, 32, True, (2, 1, 1)),    # (16 - 1) x 2 - 2 + 3 = 31, + output padding 1
    (3, 32, 230, False, (1, 100, 0)),  # FCN's first conv: 32 + 200 - 3 + 1 = 230
])
def test_conv_geometry_reproduces_the_output_size(k, n_in, n_out, transposed, expected):
    assert _conv_geometry(k, n_in, n_out, transposed) == expected


def test_every_measured_op_of_the_validation_study_is_rebuilt_with_its_shape():
    import torch
    from workbench.costmodel.ops import cost
    ops = study_ops(["studies/cpu-validation.toml"])
    assert len(ops) > 100 and {kind for kind, _ in ops.values()} == {
        "linear", "batched_matmul", "conv", "attention", "lstm"}
    for key, (kind, shape) in list(ops.items()):
        op = build_op(kind, shape, "cpu")
        assert op is not None, key
        out = op()
        # the rebuilt op writes what the layer graph says it writes (4-byte elements here)
        if kind != "lstm":  # the graph's LSTM counts its cell state too
            assert out.numel() * 2 == cost(kind, **shape).write_bytes, key
        assert out.dtype == torch.float32


def test_measure_ops_times_kernels_beyond_the_tiniest_op():
    ops = {op_key("linear", 2 * 256 * 256 * 256, 4 * 256 * 256 * 256, 0): (
        "linear", dict(tokens=256, in_features=256, out_features=256))}
    got = measure_ops(ops, Settings(repeats=3, min_sample_s=0.002), lambda: None, lambda m: None)
    fwd, bwd = got[next(iter(ops))]
    assert 0 < fwd < bwd < 1.0  # a 33.6 MFLOP forward, twice that backward


def test_the_engine_uses_a_measured_kernel_where_the_key_matches():
    cl = hardware.load_cpu_cluster(2)
    graph = costmodel.graph(models.get("vgg-tiny", dropout=0.0))
    plan = "dp=2,mb=2,gbs=8,dtype=fp32"
    at_mb2 = costmodel.graph(models.get("vgg-tiny", dropout=0.0), batch=2)
    convs = [l for l in at_mb2.layers if l.kind == "conv"]
    table = {op_key("conv", l.fwd_flops, l.bwd_flops, l.params): [1e-3, 2e-3]
             for l in convs}
    # a whole-model time would override the ops' (its test is test_calibrate_models.py)
    base = costmodel.estimate(graph, plan, with_efficiency(cl, op_kernels_s=None,
                                                           model_passes_s=None))
    slow = with_efficiency(cl, op_kernels_s=table, model_passes_s=None)
    got = costmodel.estimate(graph, plan, slow)
    # every conv now takes 1 ms forward and 2 ms backward in each of 2 microbatches, plus
    # its dispatch: the compute grows by at least what the measured kernels add
    assert got.breakdown_s["compute_s"] > base.breakdown_s["compute_s"]
    assert got.breakdown_s["compute_s"] >= 2 * len(convs) * 3e-3
    # a TP-split or bf16 op has no measured kernel: unchanged
    bf16 = "dp=2,mb=2,gbs=8,dtype=bf16"
    assert costmodel.estimate(graph, bf16, slow).step_time_s == pytest.approx(
        costmodel.estimate(graph, bf16, cl).step_time_s)


@pytest.mark.parametrize("table,message", [
    ({"fp32:norm:1:2:3": [0, 0]}, "is not dtype:kind:fwd_flops:bwd_flops:params"),
    ({"fp32:linear:1:2": [0, 0]}, "is not dtype:kind"),
    ({"fp32:linear:1:2:3": [0]}, r"must be \[forward_s, backward_s\]"),
    ({"fp32:linear:1:2:3": [-1, 0]}, r"two numbers >= 0"),
])
def test_bad_tables_are_refused_naming_the_entry(table, message):
    with pytest.raises(ValueError, match=message):
        table_from_dict(table, "efficiency.op_kernels_s")


def test_the_table_round_trips_through_the_profile_format():
    eff = efficiency_for(hardware.load_cpu_cluster(2).chip)
    d = efficiency_to_dict(eff)
    d["op_kernels_s"] = {"fp32:linear:512:1024:256": [1e-6, 2e-6]}
    back = efficiency_from_dict(d)
    assert back.op_kernels_s == {"fp32:linear:512:1024:256": (1e-6, 2e-6)}
    assert efficiency_from_dict(efficiency_to_dict(back)) == back
