"""Plan: text form, self-validation, validation against a model, pipeline stage split."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from workbench import costmodel
from workbench.costmodel.graph import POST_UNIT, PRE_UNIT, LayerGraph, make_layer
from workbench.plan import KEYS, Plan, PlanError
from workbench.stages import (bottleneck_stage, stage_flops, stage_layers, stage_units,
                              virtual_stage_layers, virtual_stage_units)


@pytest.fixture(scope="module")
def g405():
    return costmodel.graph("llama3-405b")


def model(units=32, heads=32, kv_heads=8, seq=8192, experts=None):
    """Any object with the five facts a plan is checked against (duck-typed like LayerGraph)."""
    return SimpleNamespace(model="toy", units=units, heads=heads, kv_heads=kv_heads, seq=seq,
                           experts=experts)


def broken(excinfo) -> list[tuple[str, str]]:
    return [(v.field, v.rule) for v in excinfo.value.violations]


# -- text form ----------------------------------------------------------------------------
def test_parse_the_brief_example():
    p = Plan.parse("dp=64,tp=8,pp=16,cp=1,mb=1,gbs=1024,recompute=selective")
    assert (p.dp_replicate, p.dp_shard, p.tp, p.pp, p.vpp, p.cp, p.ep) == (64, 1, 8, 16, 1, 1, 1)
    assert (p.microbatch_size, p.global_batch_size, p.recompute) == (1, 1024, "selective")
    assert (p.sequence_parallel, p.schedule, p.zero, p.dtype) == (False, "1f1b", 0, "bf16")
    assert str(p) == ("dp=64,fsdp=1,tp=8,pp=16,vpp=1,cp=1,ep=1,mb=1,gbs=1024,sp=false,"
                      "recompute=selective,schedule=1f1b,zero=0,dtype=bf16,order=tp-cp-fsdp-dp-pp")
    assert p.compact() == "dp=64,tp=8,pp=16,recompute=selective"  # gbs 1024 = 64 x 16: default
    assert Plan.parse("dp=64,tp=8,pp=16,gbs=2048").compact() == "dp=64,tp=8,pp=16,gbs=2048"


@pytest.mark.parametrize("text, field, value", [
    ("dp=3", "dp_replicate", 3), ("fsdp=4", "dp_shard", 4), ("tp=2", "tp", 2),
    ("pp=2", "pp", 2), ("pp=2,vpp=2", "vpp", 2), ("cp=2", "cp", 2),
    ("fsdp=4,ep=2", "ep", 2), ("mb=2", "microbatch_size", 2), ("gbs=7", "global_batch_size", 7),
    ("tp=2,sp=true", "sequence_parallel", True), ("sp=false", "sequence_parallel", False),
    ("recompute=full", "recompute", "full"), ("schedule=gpipe", "schedule", "gpipe"),
    ("zero=2", "zero", 2), ("dtype=fp8", "dtype", "fp8"),
])
def test_every_key(text, field, value):
    p = Plan.parse(text)
    assert getattr(p, field) == value
    assert Plan.parse(str(p)) == p and Plan.parse(p.compact()) == p


def test_every_key_is_printed_once_in_order():
    assert [item.split("=")[0] for item in str(Plan()).split(",")] == list(KEYS)


def test_defaults():
    assert Plan.parse("") == Plan() == Plan.parse(" dp = 1 ")
    assert Plan().compact() == "dp=1"  # never empty
    p = Plan.parse("dp=4,fsdp=2,mb=2")
    assert p.global_batch_size == 16  # mb x dp x fsdp = 2 x 4 x 2: one microbatch per DP rank
    assert p.compact() == "dp=4,fsdp=2,mb=2"  # the derived gbs is not printed
    q = Plan.parse("dp=2,pp=4,vpp=2")
    assert q.global_batch_size == 8 and q.microbatches == 4  # 1 x 2 x 4: pp microbatches
    assert q.schedule == "interleaved-1f1b" and q.compact() == "dp=2,pp=4,vpp=2"
    assert Plan.parse("pp=2").schedule == "1f1b"
    assert Plan.parse("pp=2,vpp=2,gbs=4").compact() == "pp=2,vpp=2,gbs=4"


@pytest.mark.parametrize("plan", [
    Plan(),
    Plan(dp_replicate=2, dp_shard=8, tp=4, pp=4, vpp=3, cp=2, ep=16, microbatch_size=2,
         global_batch_size=1024, sequence_parallel=True, recompute="full", dtype="fp8"),
    Plan(dp_replicate=8, zero=3, schedule="gpipe", pp=2, global_batch_size=64),
    Plan(tp=8, global_batch_size=3, recompute="selective", dtype="fp32"),
])
def test_round_trip(plan):
    assert Plan.parse(str(plan)) == plan
    assert Plan.parse(plan.compact()) == plan
    assert Plan.parse(str(plan)).compact() == plan.compact()


def test_numpy_style_ints_are_normalised():
    class Index:  # anything with __index__, like numpy.int64
        def __index__(self):
            return 4
    p = Plan(tp=Index())
    assert p.tp == 4 and type(p.tp) is int and p == Plan(tp=4)


@pytest.mark.parametrize("text, field, rule", [
    ("dp=2,foo=1", "foo", "keys are dp, fsdp, tp"),
    ("tp=2,tp=4", "tp", "each key appears once"),
    ("tp=x", "tp", "integers are written in decimal digits"),
    ("tp=-2", "tp", "integers are written in decimal digits"),
    ("gbs=8.0", "global_batch_size", "integers are written in decimal digits"),
    ("tp=2,sp=yes", "sequence_parallel", "sp is true or false"),
    ("tp8", "text", "items are key=value"),
    ("gbs=", "global_batch_size", "items are key=value"),
    ("dp=2,,tp=2", "text", "items are key=value"),
])
def test_parse_errors_name_the_key_and_rule(text, field, rule):
    with pytest.raises(PlanError) as e:
        Plan.parse(text)
    assert e.value.field == field and e.value.rule.startswith(rule)
    assert isinstance(e.value, ValueError) and "(rule: " in str(e.value)


def test_parse_collects_every_error():
    with pytest.raises(PlanError) as e:
        Plan.parse("tp=x,foo=1,tp=2,sp=yes")
    assert [f for f, _ in broken(e)] == ["tp", "foo", "tp", "sequence_parallel"]
    assert str(e.value).splitlines()[0] == \
        "plan: tp=x is not an integer (rule: integers are written in decimal digits)"


# -- self-validation ----------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field, rule", [
    ({"tp": 0}, "tp", "parallel degrees are >= 1"),
    ({"dp_shard": -1}, "dp_shard", "parallel degrees are >= 1"),
    ({"microbatch_size": 0}, "microbatch_size", "batch sizes are >= 1 sample"),
    ({"global_batch_size": 0}, "global_batch_size", "batch sizes are >= 1 sample"),
    ({"tp": 2.0}, "tp", "counts are integers"),
    ({"pp": True}, "pp", "counts are integers"),
    ({"sequence_parallel": "true"}, "sequence_parallel", "sp is true or false"),
    ({"recompute": "all"}, "recompute", "recompute is one of none, selective, full"),
    ({"schedule": "zb-v"}, "schedule", "schedule is one of gpipe, 1f1b, interleaved-1f1b"),
    ({"dtype": "int8"}, "dtype", "dtype is one of bf16, fp16, fp32, fp8"),
    ({"zero": 4}, "zero", "ZeRO stage is 0, 1, 2 or 3"),
    ({"zero": 1, "dp_shard": 2}, "zero", "ZeRO is for plain data parallelism; FSDP already"),
    ({"vpp": 2, "schedule": "interleaved-1f1b"}, "vpp", "model chunks per stage need a pipeline"),
    ({"pp": 2, "vpp": 2, "schedule": "1f1b", "global_batch_size": 2}, "schedule",
     "vpp > 1 needs the interleaved-1f1b schedule"),
    ({"pp": 2, "schedule": "interleaved-1f1b", "global_batch_size": 2}, "schedule",
     "interleaved-1f1b needs vpp > 1"),
    ({"sequence_parallel": True}, "sequence_parallel", "sequence parallelism splits over the TP"),
    ({"dp_shard": 2, "ep": 4}, "ep", "EP is carved out of fsdp x cp"),
    ({"dp_shard": 4, "cp": 2, "ep": 4, "global_batch_size": 4}, "ep",  # 8 % 4 == 0, 4 % 2 == 0
     None),
    ({"dp_shard": 2, "cp": 4, "ep": 2}, "ep", "EP spans every CP rank"),  # 8 % 2 == 0, 2 % 4 != 0
    ({"dp_replicate": 4, "microbatch_size": 2, "global_batch_size": 12}, "global_batch_size",
     "the global batch splits into whole microbatches"),  # 12 % (4 x 2) = 4
    ({"pp": 4, "vpp": 2, "global_batch_size": 6}, "schedule",
     "interleaved-1f1b needs microbatches divisible by pp"),  # 6 microbatches, 6 % 4 = 2
])
def test_each_plan_rule(kwargs, field, rule):
    if rule is None:
        Plan(**kwargs)  # the boundary case is allowed
        return
    with pytest.raises(PlanError) as e:
        Plan(**kwargs)
    assert (e.value.field, e.value.rule[:len(rule)]) == (field, rule)
    assert f"(rule: {e.value.rule})" in str(e.value).splitlines()[0]


def test_plan_rules_are_collected():
    with pytest.raises(PlanError) as e:
        Plan(zero=1, dp_shard=2, tp=1, sequence_parallel=True, global_batch_size=3)
    assert [f for f, _ in broken(e)] == ["zero", "sequence_parallel", "global_batch_size"]
    assert e.value.field == "zero" and len(str(e.value).splitlines()) == 3
    assert str(e.value).splitlines()[1] == ("plan: sp=true with tp=1 (rule: sequence "
                                           "parallelism splits over the TP group, so it needs "
                                           "tp > 1)")


def test_range_errors_are_collected_together():
    with pytest.raises(PlanError) as e:
        Plan.parse("fsdp=0,recompute=all,dtype=int8")
    assert [f for f, _ in broken(e)] == ["dp_shard", "recompute", "dtype"]
    assert str(e.value).splitlines()[0] == \
        "plan: fsdp=0 must be >= 1 (rule: parallel degrees are >= 1)"


def test_plan_is_frozen_and_hashable():
    p = Plan(tp=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.tp = 4
    assert len({p, Plan(tp=2), Plan(tp=4)}) == 2


# -- derived facts ------------------------------------------------------------------------
def test_derived_properties():
    p = Plan(dp_replicate=2, dp_shard=4, tp=8, pp=4, vpp=2, cp=2, ep=8, microbatch_size=2,
             global_batch_size=256)
    assert p.dp_degree == 8                 # 2 x 4
    assert p.world_size == 512              # 2 x 4 x 2 x 8 x 4 (ep=8 borrows from fsdp x cp)
    assert p.local_batch_size == 32         # 256 / 8
    assert p.microbatches == 16             # 256 / (8 x 2)
    assert p.virtual_stages == 8            # 4 x 2
    assert p.fsdp_enabled and p.hsdp_enabled and p.dp_enabled and p.dp_replicate_enabled
    assert p.tp_enabled and p.pp_enabled and p.cp_enabled and p.ep_enabled and p.interleaved
    assert p.mesh_shape == {"pp": 4, "dp_replicate": 2, "dp_shard": 4, "cp": 2, "tp": 8}
    # FSDP shards over fsdp x cp = 4 x 2 = 8 (torchtitan's dp_shard_cp mesh)
    assert (p.param_shard_degree, p.grad_shard_degree, p.optimizer_shard_degree) == (8, 8, 8)
    q = Plan()
    assert q.world_size == 1 and q.microbatches == 1 and q.virtual_stages == 1
    assert not (q.fsdp_enabled or q.hsdp_enabled or q.dp_enabled or q.tp_enabled or
                q.pp_enabled or q.cp_enabled or q.ep_enabled or q.interleaved)
    assert not Plan(dp_shard=8).hsdp_enabled and Plan(dp_shard=8).fsdp_enabled


@pytest.mark.parametrize("zero, degrees", [(0, (1, 1, 1)), (1, (1, 1, 16)), (2, (1, 16, 16)),
                                           (3, (16, 16, 16))])
def test_zero_shard_degrees(zero, degrees):
    p = Plan(dp_replicate=8, cp=2, zero=zero)  # ZeRO shards over the DP x CP group: 8 x 2
    assert (p.param_shard_degree, p.grad_shard_degree, p.optimizer_shard_degree) == degrees


# -- validation against a world and a model ----------------------------------------------
def test_llama3_405b_plan_is_valid(g405):
    # Dubey et al. 2024 Table 4: 8,192 GPUs, TP 8, CP 1, PP 16, DP 64, 32 sequences per DP rank
    p = Plan.parse("dp=64,tp=8,pp=16,gbs=2048,sp=true")
    assert p.violations(8192, g405) == []
    p.validate(8192, g405)
    assert p.microbatches == 32  # 2048 / 64


@pytest.mark.parametrize("plan, world, graph, field, rule", [
    (Plan(tp=2), 4, model(), "world_size", "degrees multiply to the world size"),
    (Plan(tp=2), 2, model(heads=None, kv_heads=None), "tp", "TP, CP and SP split attention"),
    (Plan(cp=2), 2, model(heads=None, kv_heads=None), "cp", "TP, CP and SP split attention"),
    (Plan(tp=3), 3, model(heads=32, kv_heads=None), "tp", "TP divides attention heads"),
    (Plan(tp=16), 16, model(heads=32, kv_heads=8), "tp", "TP divides key/value heads"),
    (Plan(cp=2), 2, model(seq=None), "cp", "CP splits the sequence, so it needs a sequence"),
    (Plan(cp=3), 3, model(seq=8192), "cp", "CP divides the sequence"),
    (Plan(tp=8, cp=2, sequence_parallel=True), 16, model(seq=8200), "sequence_parallel",
     "SP splits each sequence"),  # 8200 / 2 = 4100, 4100 % 8 = 4
    (Plan(pp=8, vpp=2, global_batch_size=8), 8, model(units=15), "pp",
     "each pipeline (virtual) stage gets at least one unit"),  # 8 x 2 = 16 > 15
    (Plan(dp_shard=2, ep=2), 2, model(), "ep", "EP splits experts, so it needs a mixture"),
    (Plan(dp_shard=4, ep=4), 4, model(experts=6), "ep", "EP divides the experts"),
])
def test_each_model_rule(plan, world, graph, field, rule):
    with pytest.raises(PlanError) as e:
        plan.validate(world, graph)
    assert [(f, r[:len(rule)]) for f, r in broken(e)] == [(field, rule)]


def test_model_rules_name_the_numbers():
    with pytest.raises(PlanError) as e:
        Plan(tp=3).validate(3, model(heads=32, kv_heads=32))  # MHA: one rule, not two
    assert str(e.value) == "plan: tp=3 must divide heads=32 (rule: TP divides attention heads)"
    with pytest.raises(PlanError) as e:
        Plan(tp=2, sequence_parallel=True).validate(2, model(heads=None))
    assert "sp=true but toy has no attention heads" in str(e.value)


def test_model_rules_are_all_collected():
    p = Plan(tp=3, cp=3, pp=4, dp_shard=6, ep=6, global_batch_size=24)
    found = p.violations(100, model(units=3, heads=32, kv_heads=8, seq=8192, experts=None))
    assert [v.field for v in found] == ["world_size", "tp", "tp", "cp", "pp", "ep"]
    with pytest.raises(PlanError) as e:
        p.validate(100, model(units=3))
    assert e.value.field == "world_size" and len(e.value.violations) == 6


def test_real_graph_rules():
    tiny = costmodel.graph("llama-tiny")      # 2 layers, 4 heads, 2 KV heads, seq 32, dense
    moe = costmodel.graph("llama-moe-tiny")   # the same with 4 experts
    Plan(tp=2, dp_shard=2, ep=2, pp=2).validate(8, moe)
    assert [v.rule for v in Plan(dp_shard=2, ep=2).violations(2, tiny)] == \
        ["EP splits experts, so it needs a mixture-of-experts model"]
    assert [v.rule for v in Plan(tp=4).violations(4, tiny)] == ["TP divides key/value heads"]
    assert [v.field for v in Plan(pp=3).violations(3, tiny)] == ["pp"]


# -- pipeline stages ----------------------------------------------------------------------
def test_llama3_405b_stage_split(g405):
    # Dubey et al. 2024 section 3.3.2: one layer fewer on the first and last of 16 stages
    stages = stage_units(g405.units, 16)
    assert [len(s) for s in stages] == [7] + [8] * 14 + [7]  # 7 + 14 x 8 + 7 = 126
    assert stages[0] == list(range(0, 7)) and stages[1] == list(range(7, 15))
    assert stages[15] == list(range(119, 126))
    assert [u for s in stages for u in s] == list(range(126))


@pytest.mark.parametrize("units, stages, sizes", [
    (8, 4, [2, 2, 2, 2]),
    (10, 4, [2, 3, 3, 2]),    # 2 extra -> the two middle stages
    (9, 4, [2, 2, 3, 2]),     # 1 extra -> the last middle stage
    (11, 4, [3, 3, 3, 2]),    # 3 extra: both middle stages, then the first
    (3, 2, [2, 1]),           # the last stage keeps the head, so it gets the fewer
    (5, 1, [5]),
    (0, 1, [0]),
    (80, 6, [13, 13, 13, 14, 14, 13]),  # 80 = 6 x 13 + 2: the two latest middle stages
])
def test_balanced_splits(units, stages, sizes):
    assert [len(s) for s in stage_units(units, stages)] == sizes


@pytest.mark.parametrize("units", range(1, 40))
@pytest.mark.parametrize("stages", [1, 2, 3, 5, 8])
def test_split_properties(units, stages):
    if units < stages:
        with pytest.raises(PlanError):
            virtual_stage_units(units, stages)
        return
    sizes = [len(s) for s in virtual_stage_units(units, stages)]
    assert sum(sizes) == units and max(sizes) - min(sizes) <= (units % stages > 0)
    assert sizes[-1] == min(sizes)
    assert sizes[0] == min(sizes) or units % stages == stages - 1


def test_vpp_round_robin():
    assert virtual_stage_units(10, 2, 2) == [[0, 1], [2, 3, 4], [5, 6, 7], [8, 9]]
    # stage s holds chunks s, s + pp: stage 0 -> chunks 0, 2; stage 1 -> chunks 1, 3
    assert stage_units(10, 2, 2) == [[0, 1, 5, 6, 7], [2, 3, 4, 8, 9]]
    assert stage_units(8, 2, 2) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    # 126 layers, pp=4, vpp=4: 16 chunks of 7 or 8 (126 = 16 x 7 + 14), first/last chunk 7
    chunks = virtual_stage_units(126, 4, 4)
    assert [len(c) for c in chunks] == [7] + [8] * 14 + [7]
    assert [len(s) for s in stage_units(126, 4, 4)] == [31, 32, 32, 31]  # 7+8+8+8, ..., 8+8+8+7


def test_stage_split_errors():
    with pytest.raises(PlanError) as e:
        stage_units(15, 8, 2)
    assert e.value.field == "pp" and "16 stages but only 15 units" in str(e.value)
    with pytest.raises(PlanError):
        stage_units(8, 0)


def test_stage_layers_put_pre_and_post_on_the_ends():
    g = costmodel.graph("llama-tiny")
    stages = stage_layers(g, Plan(pp=2))
    assert stages[0][0].name == "tok_embeddings" and stages[0][0].unit == PRE_UNIT
    assert {l.unit for l in stages[0][1:]} == {0} and stages[0][-1].name == "layers.0.ffn_residual"
    assert [l.name for l in stages[1][-3:]] == ["norm", "output", "loss"]
    assert {l.unit for l in stages[1][:-3]} == {1}
    assert [l for s in stages for l in s] == g.layers  # every layer once, in order


def toy_graph(units: int, pre_out: int, post_out: int) -> LayerGraph:
    """Units of one 2->2 linear each, plus a 2->pre_out linear before and a 2->post_out after.

    linear over 1 token: fwd = 2 x 1 x in x out, bwd = 2 x fwd (weight and input grads).
    """
    layers = [make_layer("pre", "linear", unit=PRE_UNIT, tokens=1, in_features=2,
                         out_features=pre_out)]
    layers += [make_layer(f"u{i}", "linear", unit=i, tokens=1, in_features=2, out_features=2)
               for i in range(units)]
    layers.append(make_layer("post", "linear", unit=POST_UNIT, tokens=1, in_features=2,
                             out_features=post_out))
    return LayerGraph(model="toy", family="toy", layers=layers, batch=1, units=units)


def test_bottleneck_stage_toy():
    # unit: fwd 2x1x2x2 = 8, bwd 16 -> 24. post (2->4): fwd 16, bwd 32 -> 48. pre (2->1): 12
    g = toy_graph(3, pre_out=1, post_out=4)
    assert stage_flops(g, Plan(pp=2)) == [60, 72]        # [pre + 2 units, 1 unit + post]
    assert bottleneck_stage(g, Plan(pp=2)) == 1
    assert stage_flops(g, Plan(pp=3)) == [36, 24, 72]
    assert bottleneck_stage(g, Plan(pp=3)) == 2
    # pre (2->16): fwd 64, bwd 128 -> 192 outweighs everything on the first stage
    heavy_pre = toy_graph(3, pre_out=16, post_out=1)      # post: 4 + 8 = 12
    assert stage_flops(heavy_pre, Plan(pp=3)) == [216, 24, 36]
    assert bottleneck_stage(heavy_pre, Plan(pp=3)) == 0
    # first and last tie (12 + 24 = 36 each) -> the lowest index
    even = toy_graph(4, pre_out=1, post_out=1)
    assert stage_flops(even, Plan(pp=4)) == [36, 24, 24, 36]
    assert bottleneck_stage(even, Plan(pp=4)) == 0
    # vpp: stage 0 holds chunks 0 and 2 (pre, u0, u2), stage 1 chunks 1 and 3 (u1, u3, post)
    vg = toy_graph(4, pre_out=1, post_out=4)
    plan = Plan(pp=2, vpp=2, global_batch_size=2)
    assert [[l.name for l in c] for c in virtual_stage_layers(vg, plan)] == \
        [["pre", "u0"], ["u1"], ["u2"], ["u3", "post"]]
    assert stage_flops(vg, plan) == [60, 96] and bottleneck_stage(vg, plan) == 1


def test_bottleneck_stage_llama3_405b(g405):
    units = g405.unit_layers()
    block = sum(l.flops for l in units[0])     # every block costs the same
    head = sum(l.flops for l in units[POST_UNIT])
    embed = sum(l.flops for l in units[PRE_UNIT])
    assert all(sum(l.flops for l in units[i]) == block for i in range(126))
    assert head < block  # the output head costs less than one block
    flops = stage_flops(g405, Plan(pp=16))
    assert flops[0] == 7 * block + embed and flops[15] == 7 * block + head
    assert flops[1:15] == [8 * block] * 14
    assert bottleneck_stage(g405, Plan(pp=16)) == 1
    # an even split (126 = 7 x 18) leaves the head on top of a full last stage
    assert bottleneck_stage(g405, Plan(pp=7)) == 6


def test_stage_layers_reject_stray_units():
    g = toy_graph(2, pre_out=1, post_out=1)
    g.layers.append(make_layer("stray", "linear", unit=5, tokens=1, in_features=2,
                               out_features=2))
    with pytest.raises(ValueError, match="unit 5"):
        stage_layers(g, Plan(pp=2))


def test_mesh_order_sets_group_strides():
    # Default order tp-cp-fsdp-dp-pp (innermost first): tp stride 1, cp 8, fsdp 8*2 = 16,
    # dp 16*4 = 64, pp 64*2 = 128.
    p = Plan.parse("dp=2,fsdp=4,cp=2,tp=8,pp=4")
    assert p.strides == {"tp": 1, "cp": 8, "fsdp": 16, "dp": 64, "pp": 128}
    q = Plan.parse("dp=2,fsdp=4,cp=2,tp=8,pp=4,order=pp-tp-cp-fsdp-dp")
    assert q.strides == {"pp": 1, "tp": 4, "cp": 32, "fsdp": 64, "dp": 256}
    assert Plan.parse(str(q)) == q and "order=pp-tp-cp-fsdp-dp" in q.compact()


def test_mesh_order_must_be_a_permutation():
    with pytest.raises(PlanError, match="order is a dash-joined permutation"):
        Plan.parse("order=tp-cp-fsdp-dp")
