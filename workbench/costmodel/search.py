"""`search()`: every valid plan for a model on N chips, ranked by throughput.

Plans are generated valid by construction (degrees from divisors, the rules of
`Plan.validate` applied as array masks; a test checks a sample with `Plan.validate`), then
evaluated in vectorised batches by the same engine as `estimate()`.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np

from ..hardware import Cluster
from ..plan import Plan
from .engine import evaluate
from .estimator import cached_profile
from .graph import LayerGraph
from .plans import CostOptions, PlanArrays

VPP_CHOICES = (1, 2, 3, 4, 5, 6, 8)
"""Model chunks per stage the search tries (where units split evenly into pp x vpp chunks)."""
MAX_MICROBATCH = 64
"""Largest microbatch size the search tries."""


def divisors(n: int) -> list[int]:
    """Positive divisors of n, ascending."""
    small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


@dataclass
class SearchResult:
    """Ranked plans and what the search looked at."""

    plans: PlanArrays
    """Every valid plan evaluated."""
    metrics: dict
    """The engine's arrays for them (`step_time_s`, `mfu`, `fits`, ...)."""
    ranking: np.ndarray
    """Indices of the plans that fit, fastest first."""
    seconds: float
    """Wall time of generation + evaluation."""

    @property
    def evaluated(self) -> int:
        """Plans evaluated."""
        return len(self.plans)

    def top(self, k: int = 10) -> list[dict]:
        """The k best plans that fit, as rows (plan, step time, throughput, MFU, memory)."""
        rows = []
        for i in self.ranking[:k]:
            m = self.metrics
            rows.append({"plan": self.plans.plan(int(i)).compact(),
                         "step_time_s": float(m["step_time_s"][i]),
                         "samples_per_s": float(m["samples_per_s"][i]),
                         "tokens_per_s": float(m["tokens_per_s"][i]), "mfu": float(m["mfu"][i]),
                         "hfu": float(m["hfu"][i]),
                         "model_tflops_per_chip": float(m["model_tflops_per_chip"][i]),
                         "memory_peak_bytes": float(m["memory_peak_bytes"][i])})
        return rows


def candidate_plans(graph: LayerGraph, n_chips: int, global_batch: int, *, dtype: str = "bf16",
                    recompute: tuple[str, ...] = ("none", "selective", "full"),
                    microbatch_sizes: tuple[int, ...] | None = None,
                    max_tp: int | None = None) -> PlanArrays:
    """Every valid plan of the search space (see module docstring)."""
    attention = graph.heads is not None
    rec_codes = [("none", "selective", "full").index(r) for r in recompute
                 if attention or r != "selective"]
    cols: dict[str, list] = {k: [] for k in ("dp", "fsdp", "tp", "pp", "vpp", "cp", "ep", "mb",
                                              "gbs", "sp", "recompute", "schedule", "zero")}
    tps = [t for t in divisors(n_chips) if (attention and graph.heads % t == 0
           and (graph.kv_heads or graph.heads) % t == 0) or t == 1]
    if max_tp:
        tps = [t for t in tps if t <= max_tp]
    for tp in tps:
        cps = [c for c in divisors(n_chips // tp) if c == 1 or (attention and graph.seq
                                                                  and graph.seq % c == 0)]
        for cp in cps:
            for pp in divisors(n_chips // (tp * cp)):
                if pp > max(graph.units, 1):
                    continue
                dp_total = n_chips // (tp * cp * pp)
                if global_batch % dp_total:
                    continue
                local = global_batch // dp_total
                mbs = [m for m in divisors(local) if m <= MAX_MICROBATCH
                       and (microbatch_sizes is None or m in microbatch_sizes)]
                # Interleaving needs equal chunks (Megatron-LM): vpp divides units / pp.
                vpps = [v for v in VPP_CHOICES if v == 1 or (pp > 1 and graph.units % (pp * v) == 0)]
                for fsdp, mb, vpp in itertools.product(divisors(dp_total), mbs, vpps):
                    m = local // mb
                    schedules = ([2] if vpp > 1 else [0, 1] if pp > 1 else [1])
                    if vpp > 1 and m % pp:
                        continue
                    eps = [1]
                    if graph.experts:
                        eps = [e for e in divisors(fsdp * cp)
                               if graph.experts % e == 0 and e % cp == 0] or [1]
                    zeros = [0, 1, 2] if fsdp == 1 and dp_total > 1 else [0]
                    sps = [False, True] if tp > 1 else [False]
                    for sched, ep, zero, sp, rec in itertools.product(schedules, eps, zeros, sps,
                                                                      rec_codes):
                        for k, v in (("dp", dp_total // fsdp), ("fsdp", fsdp), ("tp", tp),
                                     ("pp", pp), ("vpp", vpp), ("cp", cp), ("ep", ep),
                                     ("mb", mb), ("gbs", global_batch), ("sp", sp),
                                     ("recompute", rec), ("schedule", sched), ("zero", zero)):
                            cols[k].append(v)
    if not cols["tp"]:
        raise ValueError(f"no valid plan for {graph.model} on {n_chips} chips with global batch "
                         f"{global_batch} (the batch must split over the data-parallel ranks)")
    return PlanArrays(**{k: np.array(v) for k, v in cols.items()}, dtype=dtype)


FIXABLE = {"dp": "dp", "fsdp": "fsdp", "tp": "tp", "pp": "pp", "vpp": "vpp", "cp": "cp",
           "ep": "ep", "mb": "mb", "sp": "sp", "zero": "zero"}
"""Plan keys `search(fixed=...)` can pin, and their `PlanArrays` columns."""


def _pin(plans: PlanArrays, fixed: dict) -> PlanArrays:
    """Keep the plans whose columns equal `fixed` (plan keys -> values; recompute and
    schedule by name)."""
    from ..plan import RECOMPUTE, SCHEDULES
    mask = np.ones(len(plans), dtype=bool)
    for key, value in fixed.items():
        if key == "recompute":
            mask &= plans.recompute == RECOMPUTE.index(value)
        elif key == "schedule":
            mask &= plans.schedule == SCHEDULES.index(value)
        elif key in FIXABLE:
            mask &= getattr(plans, FIXABLE[key]) == value
        else:
            raise ValueError(f"search: cannot fix {key!r}; fixable keys: "
                             f"{', '.join([*FIXABLE, 'recompute', 'schedule'])}")
    if not mask.any():
        raise ValueError(f"search: no valid plan has {fixed}")
    return plans.take(mask)


def search(graph: LayerGraph, cluster: Cluster, n_chips: int, global_batch: int, *,
           options: CostOptions = CostOptions(), dtype: str = "bf16",
           recompute: tuple[str, ...] = ("none", "selective", "full"),
           microbatch_sizes: tuple[int, ...] | None = None, max_tp: int | None = None,
           fixed: dict | None = None, batch_plans: int = 200_000) -> SearchResult:
    """Evaluate every valid plan and rank those that fit memory by throughput.

    `fixed` pins plan keys (e.g. {"tp": 8, "pp": 16}) to search only the rest.
    """
    start = time.perf_counter()
    if cluster.n_chips != n_chips:
        cluster = cluster.with_n_chips(n_chips)
    plans = candidate_plans(graph, n_chips, global_batch, dtype=dtype, recompute=recompute,
                            microbatch_sizes=microbatch_sizes, max_tp=max_tp)
    if fixed:
        plans = _pin(plans, fixed)
    prof = cached_profile(graph)
    parts = []
    for lo in range(0, len(plans), batch_plans):
        chunk = plans.take(slice(lo, lo + batch_plans))
        out = evaluate(prof, chunk, cluster, options)
        out.pop("records")
        parts.append(out)
    metrics = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    fits = np.nonzero(metrics["fits"])[0]
    ranking = fits[np.argsort(-metrics["samples_per_s"][fits], kind="stable")]
    return SearchResult(plans, metrics, ranking, time.perf_counter() - start)


def best_plan(result: SearchResult) -> Plan | None:
    """The fastest plan that fits, or None."""
    return result.plans.plan(int(result.ranking[0])) if len(result.ranking) else None
