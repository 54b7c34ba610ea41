"""The host probe: its samples, its summary, a run that times it, and the level it gives
(`benchmarks/cpu_validation.py --probe`: tests/test_cpu_validation_bench.py)."""
import math

import pytest

from workbench.calibrate_drift import host_level
from workbench.runner import host_probe


def test_a_probe_sample_times_its_two_parts():
    probe = host_probe.HostProbe()
    matmul_s, small_ops_s = probe()
    # 10 matmuls of 2 x 192^3 = 14.2 MFLOP: far above a microsecond, far below a second
    assert 1e-5 < matmul_s < 1.0 and 1e-6 < small_ops_s < 1.0
    assert float(probe.small[0]) == host_probe.SMALL_OPS   # every add ran, in place


def test_the_summary_is_the_median_over_ranks_of_each_ranks_median():
    ranks = [[(0.002, 0.0004), (0.003, 0.0001), (0.010, 0.0009)],   # medians 3 ms, 0.4 ms
             [(0.001, 0.0002), (0.001, 0.0002)],                     # 1 ms, 0.2 ms
             [(0.005, 0.0010)]]                                      # 5 ms, 1.0 ms
    out = host_probe.summarise(ranks)
    # over ranks: median(3, 1, 5) = 3 ms, median(0.4, 0.2, 1.0) = 0.4 ms
    assert out["matmul_s"] == pytest.approx(0.003) and out["small_ops_s"] == pytest.approx(4e-4)
    # sqrt(3e-3 x 4e-4) = sqrt(1.2e-6)
    assert out["index_s"] == pytest.approx(math.sqrt(1.2e-6))
    with pytest.raises(ValueError, match="every rank must have at least one sample"):
        host_probe.summarise([[(0.001, 0.001)], []])


def test_the_level_by_probe_is_per_unit_of_probe_time():
    refs = [{"t_s": t, "world": 2, "measured_s": m, "predicted_s": 0.010, "probe_s": q}
            for t, m, q in ((0, 0.012, 0.001), (10, 0.024, 0.002), (20, 0.018, 0.001))]
    # per unit of probe: 1.2 / 1 ms, 2.4 / 2 ms, 1.8 / 1 ms = 1200, 1200, 1800 per s
    # median 1200 per s x this run's 1.5 ms = 1.8
    assert host_level(5, 2, refs, probe_s=0.0015) == pytest.approx(1.8)
    assert host_level(5, 2, refs) == pytest.approx(1.8)   # by time: median(1.2, 2.4, 1.8)
    assert host_level(5, 2, refs, probe_s=0.003) == pytest.approx(3.6)
    with pytest.raises(ValueError, match="a reference run has no probe_s"):
        host_level(5, 2, [{**refs[0], "probe_s": None}], probe_s=0.001)


def test_a_run_times_the_probe_after_every_timed_step():
    from workbench.runner import run
    out = run("llama-tiny", "dp=2,gbs=4,dtype=fp32", 2, steps=3, warmup=1, timeout_s=60,
              probe=True)
    probe = out["host_probe"]
    assert probe["matmul_s"] > 0 and probe["small_ops_s"] > 0
    assert probe["index_s"] == pytest.approx(math.sqrt(probe["matmul_s"] * probe["small_ops_s"]))
    assert out["spec"]["probe"] is True and len(out["step_times_s"]) == 3
    assert "host_probe" not in run("llama-tiny", "dp=2,gbs=4,dtype=fp32", 2, steps=1, warmup=1,
                                   timeout_s=60)


def test_workbench_run_prints_the_probe(capsys):
    from workbench import cli
    assert cli.main(["run", "--model", "llama-tiny", "--plan", "dp=2,gbs=4,dtype=fp32",
                     "--nproc", "2", "--steps", "2", "--probe", "--no-store"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("host probe")]
    assert len(line) == 1 and "ms matmuls" in line[0] and "ms small ops, index" in line[0]
