"""The pipeline on ranks that share cores (`costmodel.pipeline`), and the engine's use of it."""
import pytest

from workbench import costmodel, hardware, models
from workbench.costmodel.efficiency import efficiency_for
from workbench.costmodel.pipeline import shared_core_pipeline_s


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
