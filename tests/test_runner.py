"""Runner on CPU (gloo): every plan kind trains the same as one process, and the measured
collective bytes equal the cost model's prediction.

Process start-up dominates tiny runs (~5 s for 2 ranks, ~10 s for 4), so each world size runs
all its plans in one job (`launch` with a list of specs).
"""
import pytest
import torch

from workbench import costmodel, models
from workbench.runner import families, prediction_cluster
from workbench.runner.launch import RunError, launch
from workbench.runner.train import RunSpec

TINY = {"llama-tiny": {"layers": 4}, "llama-moe-tiny": {"layers": 2, "capacity_factor": 2.0},
        "gpt-untied": {"layers": 4, "tied": False},
        "vit-cp": {"image_size": 24}}  # 3 x 3 patches + the class token: 10 tokens, CP 2
ALIAS = {"gpt-untied": "gpt-tiny", "vit-cp": "vit-tiny"}  # test names for flavours with overrides
for _name in models.flavours():  # dropout draws different masks in different processes
    if _name.endswith("-tiny") and hasattr(models.get(_name), "dropout"):
        TINY.setdefault(_name, {})["dropout"] = 0.0
FAMILIES = sorted(n for n in models.flavours() if n.endswith("-tiny"))
FAMILY_PLANS = ("dp=2,gbs=4,mb=2,dtype=fp32", "fsdp=2,gbs=4,mb=2,dtype=fp32")
# capacity_factor = experts / top_k: no token is ever dropped, so routing does not depend on
# how the batch is split and data parallel runs can match one process exactly.

WORLD2 = [  # (model, plan)
    ("llama-tiny", "dp=2,gbs=4,dtype=fp32"),                              # DDP
    ("llama-tiny", "fsdp=2,gbs=4,dtype=fp32"),                            # FSDP
    ("llama-tiny", "tp=2,gbs=2,sp=true,dtype=fp32"),                      # TP + SP
    ("llama-tiny", "tp=2,gbs=2,dtype=fp32,recompute=full"),               # TP + full AC
    ("llama-tiny", "pp=2,gbs=4,schedule=gpipe,dtype=fp32"),               # PP, GPipe
    ("llama-tiny", "pp=2,gbs=4,dtype=fp32"),                              # PP, 1F1B
    ("llama-tiny", "pp=2,vpp=2,gbs=4,dtype=fp32"),                        # PP, interleaved
    ("llama-tiny", "cp=2,gbs=2,dtype=fp32"),                              # CP (ring attention)
    ("llama-moe-tiny", "fsdp=2,ep=2,gbs=4,dtype=fp32"),                   # EP
    ("resnet-tiny", "fsdp=2,gbs=4,dtype=fp32,recompute=selective"),       # CNN FSDP
    ("resnet-tiny", "pp=2,gbs=4,dtype=fp32"),                             # CNN PP
    ("gpt-tiny", "tp=2,gbs=2,sp=true,dtype=fp32"),                        # GPT TP + SP
    ("gpt-tiny", "cp=2,gbs=2,dtype=fp32"),                                # GPT CP
    ("gpt-untied", "pp=2,vpp=2,gbs=4,dtype=fp32"),                        # GPT PP
    ("vit-tiny", "tp=2,gbs=4,mb=2,dtype=fp32"),                           # ViT TP
    ("vit-tiny", "pp=2,gbs=4,mb=2,schedule=gpipe,dtype=fp32"),            # ViT PP
    ("vit-moe-tiny", "tp=2,gbs=4,mb=2,dtype=fp32"),                       # V-MoE TP
    ("vit-moe-tiny", "fsdp=2,ep=2,gbs=4,mb=2,dtype=fp32"),                # V-MoE EP
    ("vgg-tiny", "pp=2,gbs=4,mb=2,dtype=fp32"),                           # plain CNN PP
    ("alexnet-tiny", "pp=2,gbs=4,mb=2,dtype=fp32"),                       # plain CNN PP
    ("r2plus1d-tiny", "pp=2,gbs=4,mb=2,dtype=fp32"),                      # video PP
    ("c3d-tiny", "pp=2,gbs=4,mb=2,dtype=fp32"),                           # video PP
    ("yolo-tiny", "pp=2,gbs=4,mb=2,dtype=fp32"),                          # detector PP
    ("vit-cp", "cp=2,gbs=4,mb=2,dtype=fp32"),                             # ViT CP
    ("unet-tiny", "pp=2,gbs=4,mb=2,dtype=fp32"),                          # segmenter PP (skips)
    ("fcn-tiny", "pp=2,gbs=4,mb=2,dtype=fp32"),                           # segmenter PP (skips)
    ("detr-tiny", "pp=2,gbs=4,mb=2,dtype=fp32"),                          # detector PP
    ("i3d-tiny", "pp=2,gbs=4,mb=2,dtype=fp32"),                           # video PP (inflated)
    ("llama-tiny", "dp=2,gbs=4,zero=3,dtype=fp32"),                       # ZeRO-3 (FSDP over dp)
    ("gpt-tiny", "tp=2,gbs=2,dtype=fp32"),                                # GPT TP, vocab-parallel
    ("llama-moe-tiny", "tp=2,gbs=2,sp=true,dtype=fp32"),                  # MoE whole under TP+SP
    ("llama-moe-tiny", "tp=2,gbs=2,sp=true,dtype=fp32,recompute=full"),   # ... recomputed
]
WORLD4 = [
    ("llama-tiny", "dp=2,fsdp=2,gbs=8,dtype=fp32"),                       # HSDP
    ("llama-tiny", "fsdp=2,tp=2,gbs=4,sp=true,dtype=fp32"),               # 2-D FSDP x TP
    ("llama-tiny", "dp=2,pp=2,gbs=8,dtype=fp32"),                         # 2-D DP x PP
    ("llama-tiny", "tp=2,pp=2,vpp=2,gbs=4,dtype=fp32"),                   # 2-D TP x PP
    ("llama-tiny", "fsdp=2,cp=2,gbs=4,dtype=fp32,recompute=selective"),   # 2-D FSDP x CP
    ("llama-moe-tiny", "dp=2,fsdp=2,ep=2,gbs=8,dtype=fp32"),              # HSDP x EP
    ("llama-moe-tiny", "fsdp=2,tp=2,ep=2,gbs=4,dtype=fp32"),              # EP x TP
]


WORLD8 = [
    ("llama-tiny", "fsdp=2,tp=2,pp=2,gbs=8,sp=true,dtype=fp32"),         # 3-D PP x FSDP x TP
]


def reference(model: str, plan: str):
    """Loss and gradients of one process on the global batch, same seed, one microbatch of
    `mb` samples at a time (so batch-norm statistics see the same samples as in the plan),
    averaged: the mean loss over the batch."""
    from workbench.plan import Plan
    p = Plan.parse(plan)
    cfg = models.get(ALIAS.get(model, model), **TINY.get(model, {}))
    torch.manual_seed(0)
    m = models.build(cfg)
    m.train()
    inputs, target = families.batch(cfg, p.global_batch_size, 0)
    n = p.global_batch_size // p.microbatch_size
    total = 0.0
    for i in range(n):
        rows = slice(i * p.microbatch_size, (i + 1) * p.microbatch_size)
        loss = families.loss(m(*[x[rows] for x in inputs]),
                             None if target is None else target[rows]) / n
        loss.backward()
        total += float(loss)
    return total, {name: q.grad for name, q in m.named_parameters()}


def run_job(cases, nproc):
    specs = [RunSpec(ALIAS.get(model, model), plan, overrides=TINY.get(model, {}), steps=1,
                     warmup=0, grads=True) for model, plan in cases]
    return launch(specs, nproc, timeout_s=120)


@pytest.fixture(scope="module")
def world2():
    return run_job(WORLD2, 2)


@pytest.fixture(scope="module")
def families_world2():
    return run_job([(n, p) for n in FAMILIES for p in FAMILY_PLANS], 2)


@pytest.fixture(scope="module")
def world8():
    return run_job(WORLD8, 8)


@pytest.fixture(scope="module")
def world4():
    return run_job(WORLD4, 4)


def check_equivalence(ranks, index, model, plan, atol=2e-5):
    loss, ref = reference(model, plan)
    seen = set()
    for rank in ranks:
        out = rank[index]
        if "loss" in out:
            assert out["loss"] == pytest.approx(loss, rel=1e-5), f"{plan}: loss"
        for name, grad in out["grads"].items():
            expected = ref[name]
            if name in out.get("grad_slices", {}):  # expert parallel: this rank's experts
                a, b = out["grad_slices"][name]
                expected = expected[a:b]
            torch.testing.assert_close(torch.from_numpy(grad), expected, atol=atol, rtol=1e-4,
                                       msg=lambda m: f"{model} {plan} rank {out['rank']} {name}: {m}")
            seen.add(name)
    assert seen == set(ref), f"{plan}: gradients never checked: {sorted(set(ref) - seen)[:5]}"


@pytest.mark.parametrize("index", range(len(WORLD2)), ids=[p for _, p in WORLD2])
def test_world2_plans_match_one_process(world2, index):
    model, plan = WORLD2[index]
    check_equivalence(world2, index, model, plan)


@pytest.mark.parametrize("index", range(len(WORLD4)), ids=[p for _, p in WORLD4])
def test_world4_plans_match_one_process(world4, index):
    model, plan = WORLD4[index]
    check_equivalence(world4, index, model, plan)


@pytest.mark.parametrize("index", range(len(FAMILIES) * len(FAMILY_PLANS)),
                         ids=[f"{n}:{p.split(',')[0]}" for n in FAMILIES for p in FAMILY_PLANS])
def test_every_family_runs_ddp_and_fsdp_like_one_process(families_world2, index):
    model, plan = FAMILIES[index // 2], FAMILY_PLANS[index % 2]
    check_equivalence(families_world2, index, model, plan)


@pytest.mark.parametrize("model", FAMILIES)
def test_fsdp_gathers_and_reduces_once_per_unit_as_the_cost_model_counts(families_world2, model):
    # FSDP2 gathers each unit's weights before its forward and again before its backward and
    # the root's once per microbatch; one reduce-scatter per unit and the root per step.
    # gbs=4, mb=2 on 2 ranks: 1 microbatch; e.g. vgg-tiny, 15 units: 2 x 15 + 1 = 31
    # gathers and 15 + 1 = 16 reductions.
    index = FAMILIES.index(model) * 2 + 1
    plan = FAMILY_PLANS[1]
    calls = {"all_gather": 0, "reduce_scatter": 0}
    for c in costmodel.estimate(costmodel.graph(models.get(model, **TINY.get(model, {}))), plan,
                                prediction_cluster("cpu", 2)).comm:
        calls[c.kind] = calls.get(c.kind, 0) + c.count_per_step
    for rank in families_world2:
        comm = rank[index]["comm"]
        assert comm["all_gather"]["calls"] == calls["all_gather"], model
        assert comm["reduce_scatter"]["calls"] == calls["reduce_scatter"], model


def test_world8_three_dimensional_plan_matches_one_process(world8):
    model, plan = WORLD8[0]
    check_equivalence(world8, 0, model, plan)


def predicted_bytes(model, plan, nproc):
    """Predicted bytes a step per kind; with SP, the TP all-reduces of the layers (not the
    vocab-parallel loss's) run as a reduce-scatter and an all-gather of the same bytes."""
    cfg = models.get(model, **TINY.get(model, {}))
    e = costmodel.estimate(costmodel.graph(cfg), plan, prediction_cluster("cpu", nproc))
    sp = "sp=true" in plan
    out = {}
    for c in e.comm:
        if sp and c.kind == "all_reduce" and c.name.startswith("TP all-reduce (reduce-scatter"):
            for kind in ("reduce_scatter", "all_gather"):
                out[kind] = out.get(kind, 0) + c.bytes_per_step
        else:
            out[c.kind] = out.get(c.kind, 0) + c.bytes_per_step
    return out


@pytest.mark.parametrize("case, kinds", [
    (("llama-tiny", "dp=2,gbs=4,dtype=fp32"), {"all_reduce"}),          # DDP: one bucket
    (("llama-tiny", "fsdp=2,gbs=4,dtype=fp32"), {"all_gather", "reduce_scatter"}),
    (("llama-tiny", "dp=2,gbs=4,zero=3,dtype=fp32"), {"all_gather", "reduce_scatter"}),
    (("llama-tiny", "tp=2,gbs=2,sp=true,dtype=fp32"),
     {"all_gather", "reduce_scatter", "all_reduce"}),  # the loss's all-reduces stay
    # vocab-parallel GPT: its loss all-reduces the row max, the sum of exponentials and the
    # target logit (counted from the loss's aten ops), beside the layers' all-reduces
    (("gpt-tiny", "tp=2,gbs=2,dtype=fp32"), {"all_reduce"}),
    (("vit-moe-tiny", "tp=2,gbs=4,mb=2,dtype=fp32"), {"all_reduce"}),   # MoE whole under TP
    # MoE whole under TP + SP: its input all-gathered forward, its output's gradient
    # backward (and the input again when fully recomputed), beside the row ops' RS + AG.
    (("llama-moe-tiny", "tp=2,gbs=2,sp=true,dtype=fp32"), {"all_gather", "reduce_scatter"}),
    (("llama-moe-tiny", "tp=2,gbs=2,sp=true,dtype=fp32,recompute=full"),
     {"all_gather", "reduce_scatter"}),
], ids=lambda c: c[1] if isinstance(c, tuple) else None)
def test_measured_bytes_equal_predicted(world2, case, kinds):
    index = WORLD2.index(case)
    model, plan = case
    predicted = predicted_bytes(model, plan, 2)
    for rank in world2:
        measured = {k: v["bytes"] for k, v in rank[index]["comm"].items()}
        for kind in kinds:
            assert measured.get(kind, 0) == pytest.approx(predicted.get(kind, 0)), \
                (plan, kind, measured)


def test_bytes_are_also_counted_per_group(world4):
    # FSDP x TP + SP on 4 ranks: the TP collectives run on the tp group, FSDP's on the
    # dp_shard_cp group, and the per-group bytes add up to the per-kind totals.
    index = WORLD4.index(("llama-tiny", "fsdp=2,tp=2,gbs=4,sp=true,dtype=fp32"))
    for rank in world4:
        comm = rank[index]["comm"]
        assert set(comm["reduce_scatter"]["by_group"]) == {"tp", "dp_shard_cp"}
        for kind, v in comm.items():
            assert sum(v["by_group"].values()) == v["bytes"], kind


def test_pipeline_messages_are_the_predicted_size(world2):
    # 1F1B on 2 stages, 4 microbatches of 1 sample x 32 tokens x 64 hidden x 4 bytes = 8,192
    # bytes each; each stage sends 4 messages and receives 4.
    model, plan = WORLD2[5]
    predicted = predicted_bytes(model, plan, 2)
    for rank in world2:
        comm = rank[5]["comm"]
        assert comm["send"]["bytes"] == comm["recv_"]["bytes"] if "recv_" in comm else True
        assert comm["send"]["bytes"] == 4 * 8192 and comm["send"]["calls"] == 4
        assert comm["recv"]["bytes"] == 4 * 8192
    assert predicted["send_recv"] == 2 * 4 * 8192  # per rank: 4 sends + 4 receives


@pytest.mark.parametrize("plan", ["dp=2,gbs=4,dtype=fp32", "fsdp=2,gbs=4,dtype=fp32",
                                  "tp=2,gbs=2,sp=true,dtype=fp32", "pp=2,gbs=4,dtype=fp32"])
def test_predicted_memory_within_ten_percent(world2, plan):
    # Tensor memory only (no framework allowance on a CPU): weights, gradients (DDP's bucket
    # views; FSDP's unsharded while microbatches accumulate), AdamW state, activations.
    index = WORLD2.index(("llama-tiny", plan))
    cfg = models.get("llama-tiny", **TINY["llama-tiny"])
    e = costmodel.estimate(costmodel.graph(cfg), plan, prediction_cluster("cpu", 2),
                           costmodel.CostOptions(framework_bytes=0))
    for rank in world2:
        assert rank[index]["memory_peak_bytes"] == pytest.approx(e.memory.peak_bytes, rel=0.10)


def test_a_killed_rank_ends_the_job_with_a_clear_error():
    with pytest.raises(RunError, match="rank 1 failed: process exited with code 9"):
        launch(RunSpec("llama-tiny", "dp=2,gbs=2,dtype=fp32", steps=1, warmup=0), 2,
               timeout_s=20, fault={"rank": 1, "kind": "kill"})


def test_a_collective_timeout_ends_the_job_with_a_clear_error():
    with pytest.raises(RunError, match="rank 0 failed"):
        launch(RunSpec("llama-tiny", "dp=2,gbs=2,dtype=fp32", steps=1, warmup=0), 2,
               timeout_s=5, fault={"rank": 1, "kind": "hang"})


def test_a_failed_run_is_stored_as_failed_and_keeps_what_was_stored(tmp_path):
    from workbench.runner import run
    from workbench.store import Store
    store = Store(tmp_path / "runs.db")
    ok = run("llama-tiny", "dp=2,gbs=4,dtype=fp32", 2, steps=2, store=store, timeout_s=30)
    with pytest.raises(RunError, match="rank 1 failed"):
        run("llama-tiny", "dp=2,gbs=4,dtype=fp32", 2, steps=2, store=store, timeout_s=10,
            fault={"rank": 1, "kind": "kill"})
    rows = store.results(kind="measurement")
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert "killed or crashed" in rows[0]["error"]
    kept = store.get(ok["measurement_id"])
    assert kept["status"] == "ok" and kept["prediction_id"] == ok["prediction_id"]
    assert kept["payload"]["comm"]["all_reduce"]["bytes"] == ok["comm"]["all_reduce"]["bytes"]
    assert len(store.samples(ok["measurement_id"], metric="step_time_s")) == 2


def test_steps_for_a_minimum_timed_duration():
    from workbench.runner.train import MAX_TIMED_STEPS, steps_for
    assert steps_for(5, 0.0, 0.001) == 5           # no minimum: the steps asked for
    assert steps_for(5, 1.0, 0.015) == 67          # ceil(1.0 / 0.015) = ceil(66.7)
    assert steps_for(5, 1.0, 0.5) == 5             # 5 steps of 0.5 s already last 2.5 s
    assert steps_for(5, 10.0, 1e-6) == MAX_TIMED_STEPS


def test_min_timed_s_times_more_steps_on_every_rank():
    from workbench.runner import run
    out = run("llama-tiny", "dp=2,gbs=4,dtype=fp32", 2, steps=2, warmup=1, min_timed_s=0.4,
              timeout_s=60)
    # a step of this model is ~5-20 ms here: ceil(0.4 s / step) is far above the 2 asked
    assert len(out["step_times_s"]) > 2
    assert out["spec"]["min_timed_s"] == 0.4
    with pytest.raises(ValueError, match="min_timed_s must be a number of seconds >= 0"):
        run("llama-tiny", "dp=2,gbs=4,dtype=fp32", 2, min_timed_s=-1.0)


def test_torchrun_entry_point_runs_a_job(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path
    from workbench.runner.launch import free_port
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m",
         "workbench.runner.entry", "--model", "llama-tiny", "--plan", "fsdp=2,gbs=4,dtype=fp32",
         "--device", "cpu", "--steps", "2", "--store", str(tmp_path / "s.db")],
        capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads([l for l in proc.stdout.splitlines() if l.startswith("{")][-1])
    assert out["comm"]["reduce_scatter"]["bytes"] == 427264  # every fp32 gradient, once
    assert out["measurement_id"] == 1


def test_unsupported_pipeline_splits_are_clear_errors():
    from workbench.runner.pipeline_parts import pipeline_parts
    with pytest.raises(ValueError, match="untied embeddings"):
        pipeline_parts(models.build(models.get("gpt-tiny")))
    with pytest.raises(ValueError, match="not implemented in the runner for LSTMLanguageModel"):
        pipeline_parts(models.build(models.get("lstm-tiny")))


def test_pytorch_context_parallel_is_refused_on_cpu_with_the_reason():
    spec = RunSpec("llama-tiny", "cp=2,gbs=2,dtype=fp32", steps=1, warmup=0, cp_impl="torch")
    with pytest.raises(RunError, match="cp_impl='torch' needs CUDA"):
        launch(spec, 2, timeout_s=60)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two CUDA devices (NCCL allows one rank per GPU)")
def test_pytorch_context_parallel_agrees_with_ring_attention_on_cuda():
    # PyTorch's context_parallel (contiguous shards) and our ring attention give the same
    # loss and gradients for a causal Llama on two GPUs (fp32).
    out = {}
    for impl in ("ring", "torch"):
        spec = RunSpec("llama-tiny", "cp=2,gbs=2,dtype=fp32", steps=1, warmup=0, grads=True,
                       device="cuda", cp_impl=impl)
        out[impl] = launch(spec, 2, timeout_s=120)[0]
    assert out["torch"]["loss"] == pytest.approx(out["ring"]["loss"], rel=1e-5)
    for name, grad in out["ring"]["grads"].items():
        torch.testing.assert_close(out["torch"]["grads"][name], grad, atol=2e-5, rtol=1e-4)


def _child_tunables(queue):
    import os
    queue.put(os.environ.get("GLIBC_TUNABLES"))


def _spawned_tunables(device: str):
    import multiprocessing as mp

    from workbench.runner.launch import rank_environment
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with rank_environment(device):
        p = ctx.Process(target=_child_tunables, args=(q,))
        p.start()
    got = q.get(timeout=60)
    p.join()
    return got


def test_cpu_ranks_start_with_malloc_that_keeps_freed_memory(monkeypatch):
    import os

    from workbench.runner.launch import CPU_MALLOC_TUNABLES
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert _spawned_tunables("cpu") == CPU_MALLOC_TUNABLES
    assert "GLIBC_TUNABLES" not in os.environ  # the parent's environment is restored
    assert _spawned_tunables("cuda") is None
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=1")  # the user's: kept
    assert _spawned_tunables("cpu") == "glibc.malloc.arena_max=1"
