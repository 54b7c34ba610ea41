"""SimPy simulator: hand-computable timelines, agreement with the cost model, and where and
why the two disagree (contention, schedule effects)."""
import json

import pytest
import simpy

from workbench import costmodel, hardware
from workbench.cli import main
from workbench.plan import Plan
from workbench.costmodel import comm
from workbench.hardware import Cluster, Level
from workbench.simulator import simulate
from workbench.simulator.collectives import Collectives
from workbench.simulator.network import Network, Topology
from workbench.simulator.step import StepSim
from workbench.simulator.work import StageWork

H100 = hardware.cluster("dgx-h100", 8)


def test_ring_all_reduce_of_four_chips_step_by_step():
    # 4 chips in one node, 400 MB: 2*(4-1) = 6 steps; each step every chip sends 100 MB over
    # NVLink (450 GB/s x 0.82 = 369 GB/s) after the 3.4 us hop latency.
    env = simpy.Environment()
    topo = Topology(H100, symmetric=False)
    coll = Collectives(env, Network(env), topo)
    for r in range(4):
        env.process(coll.join(("ar", 0), r, (0, 1, 2, 3), "all_reduce", 400e6))
    step = 3.4e-6 + 100e6 / 369e9
    seen = []

    def probe():
        for k in range(1, 7):
            yield env.timeout(step * k - env.now + 1e-9)
            seen.append(topo.links[("nvlink_out", 0)].bytes_carried)
    env.process(probe())
    env.run()
    # (the probe itself ends 1 ns after the last step)
    assert env.now == pytest.approx(6 * step + 1e-9, rel=1e-12)
    assert seen == pytest.approx([k * 100e6 for k in range(1, 7)], rel=1e-6)
    assert 6 * step == pytest.approx(float(comm.collective_time_s("all_reduce", 400e6, 4, 1, H100)))


def test_two_groups_contending_for_one_uplink_share_it():
    # Racks of 4 chips whose uplink carries 4 x 50 GB/s x 0.94 / 4 (oversubscription 4)
    # = 47 GB/s. Chip 0 -> 4 alone crosses it at the NIC speed, 47 GB/s; two flows (0 -> 4 and
    # 1 -> 5, two 2-rank all-reduces) share it: 23.5 GB/s each, so each step takes twice as long.
    src = "test: oversubscribed racks"
    cl = Cluster("oversub", hardware.chip("h100-sxm"), (
        Level("node", 2, 450e9, 1e-6, 1.0, src, 0.82),
        Level("rack", 4, 50e9, 2e-6, 1.0, src, 0.94),
        Level("cluster", 8, 50e9, 3e-6, 4.0, src, 0.94)), 8, src)

    def run(groups):
        env = simpy.Environment()
        coll = Collectives(env, Network(env), Topology(cl, symmetric=False))
        for i, members in enumerate(groups):
            for r in members:
                env.process(coll.join(("g", i), r, members, "all_reduce", 1e9))
        env.run()
        return env.now

    # A 2-rank all-reduce: 2 steps of 0.5 GB each (3 us latency across racks).
    alone = 2 * (3e-6 + 0.5e9 / 47e9)
    assert run([(0, 4)]) == pytest.approx(alone, rel=1e-9)
    assert run([(0, 4), (1, 5)]) == pytest.approx(2 * (3e-6 + 0.5e9 / 23.5e9), rel=1e-9)
    # The closed form assumes every chip of the rack sends at once: 50 x 0.94 / 4 GB/s each.
    assert float(comm.collective_time_s("all_reduce", 1e9, 2, 4, cl)) == pytest.approx(
        2 * 3e-6 + 1e9 / 11.75e9)


def synthetic_pipeline(pp: int, m: int, fwd_s: float, bwd_s: float):
    """A StepSim whose stages do exactly fwd_s / bwd_s per microbatch and send nothing."""
    g = costmodel.graph("gpt", layers=pp, hidden=64, heads=4, vocab=256, seq=32)
    from workbench.plan import Plan
    plan = Plan.parse(f"pp={pp},gbs={m}")
    from workbench.costmodel.estimator import cached_profile
    from workbench.costmodel.plans import CostOptions, PlanArrays
    arr = PlanArrays.from_plans([plan])
    work = [StageWork(fwd_s, bwd_s, [], [], 0.0, 1) for _ in range(pp)]
    sim = StepSim(plan, hardware.cluster("dgx-h100", pp), cached_profile(g), arr, work,
                  CostOptions(), "symmetric", {}, True)
    sim.p2p = 0.0
    return sim


def test_1f1b_of_4_stages_and_8_microbatches():
    # F = 1 ms, B = 2 ms: the step takes (m + pp - 1)(F + B) = 11 x 3 = 33 ms. Stage 0 runs
    # F0..F3 (3 warm-up forwards + the first steady one) until 4 ms, then waits for B0 to come
    # back through stages 3, 2, 1 (F0 reaches stage 3 at 3 ms, B0 runs there 4-6, on stage 2
    # 6-8, on stage 1 8-10) and runs its own B0 from 10 to 12 ms.
    sim = synthetic_pipeline(4, 8, 1e-3, 2e-3)
    assert sim.run() == pytest.approx(33e-3)
    stage0 = [e for e in sim.events if e.rank == 0 and e.category == "compute"]
    assert [(e.name, round(e.start_s * 1e3, 6)) for e in stage0[:5]] == [
        ("F mb0 c0", 0.0), ("F mb1 c0", 1.0), ("F mb2 c0", 2.0), ("F mb3 c0", 3.0),
        ("B mb0 c0", 10.0)]
    # Stage 0 computes 8 x 3 = 24 ms of the 33: it idles (pp - 1)(F + B) = 9 ms, the bubble.
    assert sim.stats[0].wait_s == pytest.approx(9e-3)


@pytest.mark.parametrize("model, plan, chips", [
    ("llama3-8b", "dp=8,gbs=8", 8),                 # DP, bucketed overlap
    ("llama3-8b", "fsdp=8,gbs=8", 8),               # FSDP gathers with prefetch
    ("llama3-8b", "tp=8,gbs=2,sp=true", 8),         # TP on the critical path
    ("llama3-8b", "fsdp=4,cp=2,gbs=4", 8),          # CP ring exchange
    ("small-head", "dp=2,pp=4,gbs=32", 8),          # 1F1B with balanced stages
    ("llama3-8b", "dp=2,fsdp=4,gbs=16,recompute=full", 8),  # HSDP + recompute
])
def test_simulator_agrees_with_the_cost_model_when_uncontended(model, plan, chips):
    g = (costmodel.graph("gpt", layers=16, vocab=1024) if model == "small-head"
         else costmodel.graph(model))
    r = simulate(g, plan, hardware.cluster("dgx-h100", chips))
    assert r.step_time_s == pytest.approx(r.predicted_step_time_s, rel=0.01)


def test_unbalanced_stages_fill_and_drain_through_the_faster_stages():
    # Llama 3 8B's output head (128,256 x 4,096) weighs about two layers, all on the last
    # stage. The real 1F1B order fills and drains through the faster stages; the closed form
    # charges the bubble at the other stages' pace too (their time per microbatch, not
    # (pp - 1) x the slowest's), so the two agree, and the bubble is less than (pp - 1) slots
    # of the slowest stage.
    cl = hardware.cluster("dgx-h100", 8)
    g = costmodel.graph("llama3-8b")
    heavy = simulate(g, "dp=2,pp=4,gbs=16", cl)
    assert heavy.step_time_s == pytest.approx(heavy.predicted_step_time_s, rel=0.01)
    e = costmodel.estimate(g, "dp=2,pp=4,gbs=16", cl)
    m = Plan.parse("dp=2,pp=4,gbs=16").microbatches
    slowest = sum(v for k, v in e.breakdown_s.items() if k not in (
        "bubble_s", "dp_exposed_s", "zero_gather_s", "optimizer_s")) / m
    assert e.breakdown_s["bubble_s"] < 0.95 * 3 * slowest


def test_contention_between_tp_and_dp_on_the_nic_is_what_the_closed_form_misses():
    # 32 chips in 4 nodes, DP innermost (16 ranks over nodes 0-1 and 2-3) and TP at stride 16:
    # both groups leave the node, so each chip's NIC carries the TP all-reduces of the
    # backward and, at the same time, the overlapped gradient buckets. In the simulation the
    # two share the NIC and the TP all-reduces on the critical path slow down; the closed form
    # times each as if it had the NIC to itself.
    cl = hardware.cluster("dgx-h100", 32)
    g = costmodel.graph("llama3-8b", layers=8)
    r = simulate(g, "dp=16,tp=2,gbs=16,order=dp-tp-cp-fsdp-pp", cl)
    assert r.step_time_s > 1.03 * r.predicted_step_time_s
    alone = simulate(g, "dp=16,tp=2,gbs=16,order=dp-tp-cp-fsdp-pp", cl,
                     costmodel.CostOptions(overlap_dp=False))
    assert alone.step_time_s == pytest.approx(alone.predicted_step_time_s, rel=0.01)


@pytest.mark.parametrize("plan, chips", [
    ("dp=2,tp=4,pp=2,gbs=8", 16), ("fsdp=4,cp=2,gbs=4", 8), ("dp=2,pp=2,vpp=2,gbs=8", 4),
    ("dp=4,fsdp=2,gbs=8,zero=0", 8), ("dp=8,gbs=8,zero=2", 8),
])
def test_symmetric_and_full_detail_modes_agree(plan, chips):
    g = costmodel.graph("llama3-8b", layers=8)
    cl = hardware.cluster("dgx-h100", chips)
    sym = simulate(g, plan, cl)
    full = simulate(g, plan, cl, mode="full")
    assert sym.step_time_s == pytest.approx(full.step_time_s, rel=1e-3)


def test_a_straggler_sets_the_pace_in_both_modes():
    g = costmodel.graph("llama3-8b", layers=4)
    cl = hardware.cluster("dgx-h100", 8)
    base = simulate(g, "dp=8,gbs=8", cl)
    sym = simulate(g, "dp=8,gbs=8", cl, speed={3: 1.5})
    full = simulate(g, "dp=8,gbs=8", cl, mode="full", speed={3: 1.5})
    assert sym.step_time_s > 1.3 * base.step_time_s
    assert full.step_time_s == pytest.approx(sym.step_time_s, rel=0.01)


def test_outputs_trace_gantt_and_json(tmp_path, capsys):
    g = costmodel.graph("gpt", layers=8, vocab=1024)
    r = simulate(g, "dp=2,pp=4,gbs=16", hardware.cluster("dgx-h100", 8))
    assert r.events > 0 and r.mfu > 0 and sum(r.breakdown_s.values()) == pytest.approx(r.step_time_s)
    r.save_trace(tmp_path / "t.json")
    trace = json.loads((tmp_path / "t.json").read_text())
    assert {e["pid"] for e in trace["traceEvents"] if e["ph"] == "X"} == {1, 3, 5, 7}
    assert len(r.gantt().data) >= 2
    assert main(["simulate", "--model", "gpt-tiny", "--chips", "2", "--plan", "pp=2,gbs=4",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("step_time_s", "mfu", "hfu", "model_tflops_per_chip", "tokens_per_s",
                "memory_peak_bytes", "fits", "comm", "events"):
        assert key in out


def test_bad_simulation_requests_are_clear_errors():
    g = costmodel.graph("gpt-tiny")
    with pytest.raises(ValueError, match="full-detail mode simulates at most 64"):
        simulate(g, "dp=128,gbs=128", hardware.cluster("dgx-h100", 128), mode="full")
    with pytest.raises(ValueError, match=r"speed\[9\]"):
        simulate(g, "dp=8,gbs=8", hardware.cluster("dgx-h100", 8), speed={9: 2.0})
    with pytest.raises(ValueError, match="mode 'fast'"):
        simulate(g, "dp=8,gbs=8", hardware.cluster("dgx-h100", 8), mode="fast")
