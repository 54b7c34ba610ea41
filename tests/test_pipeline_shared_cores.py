"""The pipeline on ranks that share cores (`costmodel.pipeline`), and the engine's use of it."""
import numpy as np
import pytest

from workbench import costmodel, hardware, models
from workbench.costmodel import pipeline
from workbench.costmodel.efficiency import efficiency_for
from workbench.costmodel.pipeline import own_core_pipeline_s, shared_core_pipeline_s


def test_own_cores_balanced_1f1b_is_m_plus_pp_minus_1_passes():
    # 2 stages of F 1 s + B 2 s, 2 microbatches, no link: (2 + 2 - 1) x 3 = 9 s
    assert shared_core_pipeline_s([1, 1], [2, 2], 2, 1, "1f1b", 1.0) == pytest.approx(9.0)


def test_two_ranks_per_core_a_stage_alone_runs_twice_as_fast():
    # 2 stages on 1 core (c = 2); times measured with both busy, so alone F .5, B 1. Traced:
    # F0 alone 0-.5; F1 | F0' shared .5-1.5; B0' alone 1.5-2.5; B0 | F1' shared, F1' ends 3.5;
    # B0 | B1' shared, B0 ends 4.5; B1' alone to 5; B1 alone 5-6: the core never idles,
    # 6 s = the 2 x 2 x 1.5 s of work on one core
    assert shared_core_pipeline_s([1, 1], [2, 2], 2, 1, "1f1b", 2.0) == pytest.approx(6.0)


def test_an_unequal_pipeline_on_shared_cores_is_its_big_stage_alone():
    # stage 0 holds all the work (F 2, B 4 with both ranks busy): alone on its core it takes
    # 1 + 2 = 3 s a microbatch; 4 microbatches and an empty stage 1 take 12 s, not 4 x 6
    span = shared_core_pipeline_s([2, 0], [4, 0], 4, 1, "1f1b", 2.0)
    assert span == pytest.approx(12.0)


def test_bad_arguments_name_the_rule():
    with pytest.raises(ValueError, match="bwd_s has 1 stages"):
        shared_core_pipeline_s([1, 1], [1], 2, 1, "1f1b", 1.0)
    with pytest.raises(ValueError, match="rank_contention must be >= 1"):
        shared_core_pipeline_s([1], [1], 2, 1, "1f1b", 0.5)


def test_the_engine_runs_the_schedule_when_ranks_share_cores():
    cluster = hardware.load_cpu_cluster(4)
    assert efficiency_for(cluster.chip).rank_contention == 2.0
    graph = costmodel.graph(models.get("fcn-tiny"))
    est = costmodel.estimate(graph, "pp=4,mb=2,dtype=fp32", cluster)
    b = est.breakdown_s
    # FCN's first stage holds most of the model: it runs alone on a core much of the step,
    # faster than with every rank busy, so the schedule beats m x the slowest stage
    assert b["bubble_s"] < 0
    assert est.step_time_s < b["compute_s"] + b["pp_comm_s"] + b["optimizer_s"]


def test_own_cores_unequal_1f1b_hides_the_light_stage_behind_warm_up():
    # unet-tiny PP 2 as measured (ms): stage 0 F 11.2 B 33.4, stage 1 F 5.1 B 8.7, m = 2.
    # Traced: s0 F1 0-11.2, F2 11.2-22.4; s1 F1 11.2-16.3, B1 16.3-25.0; s0 B1 25.0-58.4;
    # s1 F2 25.0-30.1, B2 30.1-38.8; s0 B2 58.4-91.8. The closed form charges stage 0 all
    # of stage 1's pass: 2 x 44.6 + 13.8 = 103.0
    span = shared_core_pipeline_s([11.2, 5.1], [33.4, 8.7], 2, 1, "1f1b", 1.0)
    assert span == pytest.approx(91.8)


def test_own_core_replay_of_many_plans_is_the_fluid_model_on_own_cores():
    # one vector pass per (pp, vpp, m, schedule) against shared_core_pipeline_s plan by plan
    rng = np.random.default_rng(0)
    for schedule, vpp, pp, m in [("1f1b", 1, 2, 2), ("1f1b", 1, 4, 8), ("gpipe", 1, 3, 5),
                                 ("interleaved-1f1b", 2, 2, 4), ("interleaved-1f1b", 2, 4, 8)]:
        fwd, bwd = rng.uniform(0.1, 3, (pp, 6)), rng.uniform(0.1, 6, (pp, 6))
        spans = own_core_pipeline_s(fwd, bwd, m, vpp, schedule)
        one_by_one = [shared_core_pipeline_s(fwd[:, j], bwd[:, j], m, vpp, schedule, 1.0)
                      for j in range(6)]
        assert spans == pytest.approx(one_by_one)


def test_the_engine_replays_short_schedules_on_own_cores(monkeypatch):
    cluster = hardware.load_cpu_cluster(2)
    assert efficiency_for(cluster.chip).rank_contention == 1.0
    graph = costmodel.graph(models.get("unet-tiny"))
    plan = "pp=2,mb=2,dtype=fp32"  # m = 2: 8 ops, well under REPLAY_MAX_OPS
    replayed = costmodel.estimate(graph, plan, cluster)
    # a long schedule (m = 1024 on 2 stages: 4096 ops) keeps the closed form
    long = "pp=2,mb=2,gbs=2048,dtype=fp32"
    assert 2 * 1024 * 2 > pipeline.REPLAY_MAX_OPS
    long_default = costmodel.estimate(graph, long, cluster)
    monkeypatch.setattr(pipeline, "REPLAY_MAX_OPS", 0)
    closed = costmodel.estimate(graph, plan, cluster)
    # the same stages: only the bubble differs, and the closed form is the upper bound
    assert replayed.breakdown_s["compute_s"] == pytest.approx(closed.breakdown_s["compute_s"])
    assert 0 <= replayed.breakdown_s["bubble_s"] < closed.breakdown_s["bubble_s"]
    assert replayed.step_time_s < closed.step_time_s
    assert costmodel.estimate(graph, long, cluster).step_time_s == long_default.step_time_s
