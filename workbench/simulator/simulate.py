"""`simulate(graph, plan, cluster)`: one step as discrete events, and what came out of it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..costmodel import estimate
from ..costmodel.estimator import cached_profile
from ..costmodel.graph import LayerGraph
from ..costmodel.plans import CostOptions, PlanArrays
from ..hardware import Cluster
from ..plan import Plan
from .step import FULL_MODE_MAX_CHIPS, StepSim
from .trace import TimelineEvent, gantt_figure, save_chrome_trace
from .work import stage_work

MODES = ("symmetric", "full")


@dataclass
class SimResult:
    """What one simulated step did."""

    model: str
    """Model name."""
    plan: str
    """Compact plan."""
    cluster: str
    """Cluster name."""
    n_chips: int
    """World size."""
    mode: str
    """`symmetric` or `full`."""
    step_time_s: float
    """Simulated seconds of the step (the last rank's end)."""
    breakdown_s: dict[str, float]
    """The slowest rank's time: compute, exposed communication per hierarchy level
    (`comm_<level>_s`), FSDP gather waits, pipeline bubble (waiting for inputs), waiting for
    the last gradient buckets, optimizer, and idle (the rest)."""
    samples_per_s: float
    """Samples per second."""
    tokens_per_s: float | None
    """Tokens per second (sequence models)."""
    model_tflops_per_chip: float
    """Model TFLOP/s per chip."""
    mfu: float
    """Model FLOPs utilisation."""
    hfu: float
    """Hardware FLOPs utilisation (recomputation counted)."""
    memory_peak_bytes: float
    """Peak memory per rank (from the cost model: the simulator does not model memory)."""
    fits: bool
    """Whether that fits the chip."""
    comm: list = field(default_factory=list)
    """The step's collectives (from the cost model)."""
    link_utilisation: list[dict] = field(default_factory=list)
    """Busiest links: bytes carried and busy fraction over the step."""
    events: int = 0
    """Simulation events processed."""
    wall_s: float = 0.0
    """Wall-clock seconds the simulation took."""
    timeline: list[TimelineEvent] = field(default_factory=list, repr=False)
    """Every compute, communication and wait interval per simulated rank."""
    predicted_step_time_s: float = 0.0
    """The cost model's step time for the same plan, for comparison."""

    def to_json(self) -> dict[str, Any]:
        """The keys of `Estimate.to_json` that apply, plus `events` and the breakdown."""
        return {"model": self.model, "plan": self.plan, "cluster": self.cluster,
                "n_chips": self.n_chips, "mode": self.mode, "step_time_s": self.step_time_s,
                "predicted_step_time_s": self.predicted_step_time_s,
                "breakdown_s": self.breakdown_s, "samples_per_s": self.samples_per_s,
                "tokens_per_s": self.tokens_per_s,
                "model_tflops_per_chip": self.model_tflops_per_chip, "mfu": self.mfu,
                "hfu": self.hfu, "memory_peak_bytes": self.memory_peak_bytes, "fits": self.fits,
                "comm": [c.__dict__ for c in self.comm],
                "link_utilisation": self.link_utilisation[:20], "events": self.events,
                "events_per_s": self.events / self.wall_s if self.wall_s else None}

    def save_trace(self, path) -> None:
        """Write the timeline as Chrome trace JSON (opens in Perfetto)."""
        names = {e.rank: f"rank {e.rank}" for e in self.timeline}
        save_chrome_trace(self.timeline, path, names)

    def gantt(self):
        """A plotly Gantt figure of the timeline."""
        return gantt_figure(self.timeline, f"{self.model} {self.plan} ({self.mode})")


def simulate(graph: LayerGraph, plan: Plan | str, cluster: Cluster,
             options: CostOptions = CostOptions(), mode: str = "symmetric",
             speed: dict[int, float] | None = None, record: bool = True) -> SimResult:
    """Simulate one training step of `plan` for `graph` (batch 1) on `cluster`.

    `speed` maps ranks to slowdown factors (1.2 = 20% slower compute: stragglers, mixed
    chips). In symmetric mode a stage runs at the pace of its slowest rank (its TP and DP
    partners wait for it at every collective).
    """
    if isinstance(plan, str):
        plan = Plan.parse(plan)
    if mode not in MODES:
        raise ValueError(f"simulate: mode {mode!r} must be one of {MODES}")
    if mode == "full" and cluster.n_chips > FULL_MODE_MAX_CHIPS:
        raise ValueError(f"simulate: full-detail mode simulates at most {FULL_MODE_MAX_CHIPS} "
                         f"chips, got {cluster.n_chips}; use mode='symmetric'")
    speed = dict(speed or {})
    for rank, factor in speed.items():
        if not 0 <= rank < cluster.n_chips or factor <= 0:
            raise ValueError(f"simulate: speed[{rank}]={factor}: ranks are 0..{cluster.n_chips - 1}"
                             f" and factors > 0")
    est = estimate(graph, plan, cluster, options)  # validates the plan, gives memory and comm
    start = time.perf_counter()
    prof = cached_profile(graph)
    arr = PlanArrays.from_plans([plan])
    work = stage_work(prof, arr, cluster, options)
    if mode == "symmetric" and speed:
        speed = _stage_speeds(plan, speed)
    sim = StepSim(plan, cluster, prof, arr, work, options, mode, speed, record)
    step = sim.run()
    wall = time.perf_counter() - start
    slowest = max(sim.stats, key=lambda r: (sim.stats[r].end_s, -r))
    st = sim.stats[slowest]
    breakdown = {"compute_s": st.compute_s,
                 **{f"comm_{lv}_s": t for lv, t in sorted(st.comm_s.items())},
                 "fsdp_wait_s": st.fsdp_wait_s, "bubble_s": st.wait_s,
                 "dp_tail_s": st.dp_tail_s, "optimizer_s": st.optimizer_s}
    breakdown["idle_s"] = max(0.0, step - sum(breakdown.values()))
    scale = est.step_time_s / step
    return SimResult(model=graph.model, plan=plan.compact(), cluster=cluster.name,
                     n_chips=cluster.n_chips, mode=mode, step_time_s=step, breakdown_s=breakdown,
                     samples_per_s=plan.global_batch_size / step,
                     tokens_per_s=plan.global_batch_size * graph.seq / step if graph.seq else None,
                     model_tflops_per_chip=est.model_tflops_per_chip * scale, mfu=est.mfu * scale,
                     hfu=est.hfu * scale, memory_peak_bytes=est.memory.peak_bytes,
                     fits=est.memory.fits, comm=est.comm,
                     link_utilisation=sim.topo.utilisation(step), events=sim.sim_events,
                     wall_s=wall, timeline=sim.events, predicted_step_time_s=est.step_time_s)


def _stage_speeds(plan: Plan, speed: dict[int, float]) -> dict[int, float]:
    """Symmetric mode: each stage's representative runs at its slowest rank's pace."""
    stride, out = plan.strides["pp"], {}
    for rank, factor in speed.items():
        stage = (rank // stride) % plan.pp
        rep = stage * stride
        out[rep] = max(out.get(rep, 1.0), factor)
    return out
