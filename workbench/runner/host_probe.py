"""How fast the host runs right now: a fixed probe timed between a run's steps.

On a shared virtual machine the speed of a core moves by the second and differs from one
process to the next, and nothing the guest can read shows it (on the 2-core EPYC of
2026-12-08 the hypervisor's steal time stayed under 0.5% while a 2-thread matmul went from
160 to 94 GFLOP/s and back within 15 s). Five fresh 10-s runs of GPT-tiny's microbatch on 2
ranks took 4.2 to 6.9 ms (62% apart), and 100 tiny tensor adds timed between its passes
moved with them (0.34 to 0.58 ms): the ratio of the two stayed within 13%.

So a run can time this probe after every timed step, outside the step's timer, on every
rank at once (after a barrier: 4 ranks on 2 cores share them alike whichever plan ran, where
a pipeline's last stage would otherwise probe alone while the first still computes), and
report its medians (`summarise`). The probe has two parts because the tiny models
are limited by two things: `matmul_s` (compute bound: what C3D-tiny's 14 ms microbatch moved
with, 5.7% spread of the ratio) and `small_ops_s` (per-op dispatch: what GPT-tiny's moved
with). `index_s`, their geometric mean, is the one figure a step time is divided by: it
left both within 4.1% (C3D) and 13.4% (GPT) over those runs. `calibrate_drift.host_level`
uses it to pin a run's prediction to the host's speed while it ran.
"""
from __future__ import annotations

import math
import statistics
import time

import torch

MATMUL_SIZE = 192
"""Rows of the square fp32 matrices the probe multiplies (2 x 192^3 = 14.2 MFLOP each)."""
MATMULS = 10
"""Matmuls per probe (about 1.5 ms on one core of the 2-core host)."""
SMALL_OPS = 100
"""Adds on a 16-element tensor per probe (about 0.35 ms: dispatch, not arithmetic)."""


class HostProbe:
    """The probe's tensors, made once (so the probe allocates nothing); call it for one
    `(matmul_s, small_ops_s)` sample. It runs on the host CPU whatever the run's device:
    the host's dispatch speed matters to a GPU run too."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, generator=gen)
        self.b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, generator=gen)
        self.c = torch.empty(MATMUL_SIZE, MATMUL_SIZE)
        self.small = torch.zeros(16)

    def __call__(self) -> tuple[float, float]:
        """One sample: seconds for `MATMULS` matmuls, then for `SMALL_OPS` small adds."""
        start = time.perf_counter()
        for _ in range(MATMULS):
            torch.mm(self.a, self.b, out=self.c)
        mid = time.perf_counter()
        for _ in range(SMALL_OPS):
            self.small.add_(1.0)
        return mid - start, time.perf_counter() - mid


def index_s(matmul_s: float, small_ops_s: float) -> float:
    """The probe's one figure: the geometric mean of its two parts, in seconds."""
    return math.sqrt(matmul_s * small_ops_s)


def summarise(per_rank: list[list[tuple[float, float]]]) -> dict[str, float]:
    """The run's probe from every rank's samples: per part, the median over ranks of each
    rank's median sample (`matmul_s`, `small_ops_s`), and their `index_s`."""
    if not per_rank or not all(per_rank):
        raise ValueError("host probe: every rank must have at least one sample")
    parts = [statistics.median(statistics.median(s[i] for s in samples)
                               for samples in per_rank) for i in (0, 1)]
    return {"matmul_s": parts[0], "small_ops_s": parts[1], "index_s": index_s(*parts)}
