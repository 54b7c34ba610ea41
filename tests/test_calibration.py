"""The Megatron-LM 2021 table, predicted with one set of A100 figures (benchmarks/)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from calibrate_megatron import predict, rows  # noqa: E402


def test_megatron_table_within_target():
    errors = []
    for row in rows():
        p = predict(row)
        assert p["fits"], row
        published = float(row["achieved_tflops_per_gpu"])
        errors.append((p["tflops"] - published) / published)
    mae = sum(abs(e) for e in errors) / len(errors)
    assert mae < 0.05, f"mean absolute error {mae:.3f} (per row: {[round(e, 3) for e in errors]})"
    assert max(abs(e) for e in errors) < 0.10, errors
