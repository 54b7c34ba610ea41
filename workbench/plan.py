"""Plan: how one training step is split over a cluster (DESIGN.md, "One Plan").

A `Plan` holds the parallel degrees, the batch split and the execution choices (recompute,
schedule, ZeRO stage, dtype) that the cost model, simulator, runner and app all read. Like
torchtitan's `ParallelDims`, it validates itself when made and exposes derived facts as
properties. `Plan(...)` checks what the plan alone decides; `plan.validate(world_size,
graph)` checks it against a cluster size and a model. Both collect EVERY broken rule into one
`PlanError` (one line each; `field`/`rule` are the first's); `plan.violations(...)` returns
the list without raising, for searches that discard many plans.

Text form: `Plan.parse("dp=64,tp=8,pp=16,gbs=2048")`; `str(plan)` writes every key in `KEYS`
order, `plan.compact()` only the non-defaults; `Plan.parse` reads both back to an equal plan.

Pipeline stages take whole units (`LayerGraph.units`), split as evenly as possible with the
first and last virtual stages getting the fewer where uneven, since they also carry the
embeddings and the output head (Llama 3 405B: 126 layers on 16 stages = 7, 8 x 14, 7;
Dubey et al. 2024, arXiv 2407.21783, section 3.3.2).
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any, NamedTuple


__all__ = ["DTYPES", "KEYS", "MESH_DIMS", "Plan", "PlanError", "RECOMPUTE", "SCHEDULES",
           "Violation"]

RECOMPUTE = ("none", "selective", "full")
"""Activation recomputation: none; selective (attention core only, Korthikanti et al. 2022);
full (every unit's forward is rerun in backward)."""
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")
"""Pipeline schedules: GPipe (all forwards, then all backwards; Huang et al. 2019), 1F1B
(PipeDream-Flush; Narayanan et al. 2021), interleaved 1F1B (vpp model chunks per stage;
Narayanan et al. 2021, Megatron-LM)."""
DTYPES = ("bf16", "fp16", "fp32", "fp8")
"""Compute dtypes; each chip preset gives a peak FLOP/s per dtype."""

MESH_DIMS = ("tp", "cp", "fsdp", "dp", "pp")
"""Mesh dimension names of `Plan.order` (the plan keys of the degrees)."""
DEFAULT_ORDER = "tp-cp-fsdp-dp-pp"
"""Default placement, innermost first: torchtitan's mesh (pp, dp_replicate, dp_shard, cp, tp)."""

KEYS = {"dp": "dp_replicate", "fsdp": "dp_shard", "tp": "tp", "pp": "pp", "vpp": "vpp",
        "cp": "cp", "ep": "ep", "mb": "microbatch_size", "gbs": "global_batch_size",
        "sp": "sequence_parallel", "recompute": "recompute", "schedule": "schedule",
        "zero": "zero", "dtype": "dtype", "order": "order"}
"""Text key -> `Plan` field, in the order `str(plan)` writes them."""
_KEY_OF = {f: k for k, f in KEYS.items()}
_DEGREES = ("dp_replicate", "dp_shard", "tp", "pp", "vpp", "cp", "ep")
_INT_KEYS = ("dp", "fsdp", "tp", "pp", "vpp", "cp", "ep", "mb", "gbs", "zero")


class Violation(NamedTuple):
    """One broken rule of a plan."""

    field: str
    """The `Plan` field to change (or `world_size`, or the text key that is wrong)."""
    rule: str
    """The rule, in words, e.g. `TP divides attention heads`."""
    text: str
    """What is wrong, with the numbers, e.g. `tp=3 must divide heads=32`."""

    def __str__(self) -> str:
        return f"plan: {self.text} (rule: {self.rule})"


class PlanError(ValueError):
    """An impossible plan: one line per broken rule; `field`/`rule` are the first one's."""

    def __init__(self, violations: list[Violation]):
        if not violations:
            raise ValueError("PlanError needs at least one violation")
        self.violations = list(violations)
        """Every broken rule, in the order they were checked."""
        self.field = violations[0].field
        """Field of the first broken rule."""
        self.rule = violations[0].rule
        """The first broken rule."""
        super().__init__("\n".join(str(v) for v in violations))


def _raise_if(violations: list[Violation]) -> None:
    if violations:
        raise PlanError(violations)


def _text(value: Any) -> str:
    """A value as the text form writes it (bools as true/false)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Plan:
    """A parallel training plan: degrees, batch split and execution choices.

    World size = dp_replicate x dp_shard x cp x tp x pp; `ep` is carved out of dp_shard x cp
    (as in torchtitan) and does not multiply it. Defaults: every degree 1, mb=1,
    gbs = mb x dp_replicate x dp_shard x pp (pp microbatches per DP rank, the fewest that
    fill the pipeline; one without PP), sp false, recompute none,
    schedule 1f1b (interleaved-1f1b when vpp > 1), zero 0, dtype bf16. Defaults are resolved
    when the plan is made, so `dataclasses.replace` keeps the resolved gbs and schedule.
    """

    dp_replicate: int = 1
    """Replicated data-parallel degree (DDP, or the replicate dimension of HSDP). Key `dp`."""
    dp_shard: int = 1
    """Sharded data-parallel degree (FSDP / ZeRO-3-like; the shard dimension of HSDP).
    Key `fsdp`."""
    tp: int = 1
    """Tensor-parallel degree (Megatron-LM column/row splits of each unit)."""
    pp: int = 1
    """Pipeline-parallel degree: physical pipeline stages."""
    vpp: int = 1
    """Model chunks per pipeline stage (virtual pipeline; needs interleaved-1f1b)."""
    cp: int = 1
    """Context-parallel degree: ranks that split each sequence."""
    ep: int = 1
    """Expert-parallel degree: ranks that split the experts of each MoE layer. Carved out of
    dp_shard x cp (torchtitan), so it does not multiply the world size."""
    microbatch_size: int = 1
    """Samples per microbatch on one DP rank. Key `mb`."""
    global_batch_size: int | None = None
    """Samples per optimizer step over all DP ranks. Key `gbs`. None (the default) means
    microbatch_size x dp_replicate x dp_shard x pp, resolved when the plan is made."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism: norms/dropout split along the sequence over the TP
    group (Korthikanti et al. 2022). Key `sp` (true/false). Needs tp > 1."""
    recompute: str = "none"
    """Activation recomputation, one of `RECOMPUTE`."""
    zero: int = 0
    """ZeRO stage (0..3) of plain data parallelism (Rajbhandari et al. 2020): 1 shards the
    optimizer state, 2 also gradients, 3 also parameters. Must be 0 when dp_shard > 1, since
    FSDP already shards everything."""
    schedule: str | None = None
    """Pipeline schedule, one of `SCHEDULES`. None (the default) means 1f1b, or
    interleaved-1f1b when vpp > 1; resolved when the plan is made."""
    dtype: str = "bf16"
    """Compute dtype of matmuls and activations, one of `DTYPES`."""
    order: str = DEFAULT_ORDER
    """Mesh dimensions from innermost (consecutive ranks) to outermost, joined by dashes, a
    permutation of `tp`, `cp`, `fsdp`, `dp`, `pp`. It places each group on the hardware
    hierarchy: the default keeps TP inside a node and puts PP outermost (torchtitan)."""

    def __post_init__(self) -> None:
        _raise_if(self._check_types())
        _raise_if(self._check_ranges())
        if self.global_batch_size is None:
            object.__setattr__(self, "global_batch_size", self._default_global_batch_size())
        if self.schedule is None:
            object.__setattr__(self, "schedule", self._default_schedule())
        _raise_if(self._check_consistency())

    def _default_global_batch_size(self) -> int:
        """pp microbatches per DP rank, the fewest that fill the pipeline (one without PP)."""
        return self.microbatch_size * self.dp_degree * self.pp

    def _default_schedule(self) -> str:
        """1f1b, or interleaved-1f1b when there are model chunks (vpp > 1)."""
        return "interleaved-1f1b" if self.vpp > 1 else "1f1b"

    # -- self-validation ----------------------------------------------------------------
    def _check_types(self) -> list[Violation]:
        out = []
        for name in (*_DEGREES, "microbatch_size", "global_batch_size", "zero"):
            value = getattr(self, name)
            if value is None and name == "global_batch_size":
                continue
            try:
                if isinstance(value, bool):
                    raise TypeError
                object.__setattr__(self, name, operator.index(value))  # numpy ints -> int
            except TypeError:
                out.append(Violation(name, "counts are integers",
                                     f"{_KEY_OF[name]}={value!r} is not an integer"))
        if not isinstance(self.sequence_parallel, bool):
            out.append(Violation("sequence_parallel", "sp is true or false",
                                 f"sp={self.sequence_parallel!r} is not a bool"))
        return out

    def _check_ranges(self) -> list[Violation]:
        out = []
        for name in _DEGREES:
            if getattr(self, name) < 1:
                out.append(Violation(name, "parallel degrees are >= 1",
                                     f"{_KEY_OF[name]}={getattr(self, name)} must be >= 1"))
        for name in ("microbatch_size", "global_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                out.append(Violation(name, "batch sizes are >= 1 sample",
                                     f"{_KEY_OF[name]}={value} must be >= 1"))
        for name, allowed in (("recompute", RECOMPUTE), ("schedule", SCHEDULES),
                              ("dtype", DTYPES)):
            value = getattr(self, name)
            if not (value is None and name == "schedule") and value not in allowed:
                shown = value if isinstance(value, str) else repr(value)
                out.append(Violation(name, f"{name} is one of {', '.join(allowed)}",
                                     f"{name}={shown} is not allowed"))
        if not isinstance(self.order, str) or sorted(self.order.split("-")) != sorted(MESH_DIMS):
            out.append(Violation("order", "order is a dash-joined permutation of "
                                 + ", ".join(MESH_DIMS), f"order={self.order} is not one"))
        if not 0 <= self.zero <= 3:
            out.append(Violation("zero", "ZeRO stage is 0, 1, 2 or 3",
                                 f"zero={self.zero} is out of range"))
        return out

    def _check_consistency(self) -> list[Violation]:
        out = []
        if self.zero > 0 and self.dp_shard > 1:
            out.append(Violation("zero", "ZeRO is for plain data parallelism; FSDP already "
                                 "shards", f"zero={self.zero} with fsdp={self.dp_shard}"))
        if self.vpp > 1 and self.pp == 1:
            out.append(Violation("vpp", "model chunks per stage need a pipeline (pp > 1)",
                                 f"vpp={self.vpp} needs pp > 1"))
        if self.vpp > 1 and self.schedule != "interleaved-1f1b":
            out.append(Violation("schedule", "vpp > 1 needs the interleaved-1f1b schedule",
                                 f"schedule={self.schedule} with vpp={self.vpp}"))
        if self.schedule == "interleaved-1f1b" and self.vpp == 1:
            out.append(Violation("schedule", "interleaved-1f1b needs vpp > 1 model chunks per "
                                 "stage", "schedule=interleaved-1f1b with vpp=1"))
        if self.sequence_parallel and self.tp == 1:
            out.append(Violation("sequence_parallel", "sequence parallelism splits over the "
                                 "TP group, so it needs tp > 1", "sp=true with tp=1"))
        if self.ep > 1 and (self.dp_shard * self.cp) % self.ep:
            out.append(Violation("ep", "EP is carved out of fsdp x cp (torchtitan), so it "
                                 "divides their product",
                                 f"ep={self.ep} must divide fsdp x cp = {self.dp_shard * self.cp}"))
        if self.ep > 1 and self.ep % self.cp:
            out.append(Violation("ep", "EP spans every CP rank (torchtitan), so cp divides ep",
                                 f"cp={self.cp} must divide ep={self.ep}"))
        per_step = self.dp_degree * self.microbatch_size
        if self.global_batch_size % per_step:
            out.append(Violation("global_batch_size", "the global batch splits into whole "
                                 "microbatches on every DP rank (gbs divisible by dp x fsdp x mb)",
                                 f"gbs={self.global_batch_size} is not divisible by "
                                 f"dp x fsdp x mb = {per_step}"))
        elif self.schedule == "interleaved-1f1b" and self.microbatches % self.pp:
            out.append(Violation("schedule", "interleaved-1f1b needs microbatches divisible by "
                                 "pp (Megatron-LM)", f"{self.microbatches} microbatches per DP "
                                 f"rank are not divisible by pp={self.pp}"))
        return out

    # -- text form ----------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> Plan:
        """A plan from `key=value` items separated by commas (keys: `KEYS`; spaces allowed).

        Integers are decimal digits, `sp` is true/false, the rest are names. An empty text is
        the default plan. Unknown, repeated or malformed items raise one `PlanError` naming
        each key and rule; then the plan validates itself.
        """
        if not isinstance(text, str):
            raise PlanError([Violation("text", "a plan is a str of key=value items",
                                       f"{text!r} is not a str")])
        out: list[Violation] = []
        values: dict[str, Any] = {}
        seen: set[str] = set()
        for item in text.split(",") if text.strip() else []:
            key, eq, raw = (part.strip() for part in item.partition("="))
            if not eq or not key or not raw:
                out.append(Violation(KEYS.get(key, key) if eq and key else "text", "items are "
                                     "key=value, separated by commas",
                                     f"{item.strip()!r} is not key=value"))
                continue
            if key not in KEYS:
                out.append(Violation(key, f"keys are {', '.join(KEYS)}",
                                     f"{key!r} is not a known key"))
                continue
            if key in seen:
                out.append(Violation(KEYS[key], "each key appears once", f"{key} is repeated"))
                continue
            seen.add(key)
            if key in _INT_KEYS and not re.fullmatch(r"[0-9]+", raw):
                out.append(Violation(KEYS[key], "integers are written in decimal digits",
                                     f"{key}={raw} is not an integer"))
            elif key == "sp" and raw not in ("true", "false"):
                out.append(Violation(KEYS[key], "sp is true or false",
                                     f"sp={raw} is not true or false"))
            else:
                values[KEYS[key]] = (int(raw) if key in _INT_KEYS else
                                     raw == "true" if key == "sp" else raw)
        _raise_if(out)
        return cls(**values)

    def _items(self) -> list[tuple[str, str]]:
        """(key, text) for every key, in `KEYS` order."""
        return [(key, _text(getattr(self, name))) for key, name in KEYS.items()]

    def _defaults(self) -> dict[str, str]:
        """Text of each key's default, given this plan's own degrees."""
        defaults = dict(_DEFAULT_ITEMS)
        defaults["gbs"] = _text(self._default_global_batch_size())
        defaults["schedule"] = _text(self._default_schedule())
        return defaults

    def __str__(self) -> str:
        """Every key in `KEYS` order, e.g. `dp=64,fsdp=1,tp=8,...,dtype=bf16`."""
        return ",".join(f"{k}={v}" for k, v in self._items())

    def compact(self) -> str:
        """Only the keys that differ from their defaults, in `KEYS` order (`dp=1` when all
        are defaults, so that the text is never empty)."""
        defaults = self._defaults()
        text = ",".join(f"{k}={v}" for k, v in self._items() if v != defaults[k])
        return text or "dp=1"

    # -- derived facts ------------------------------------------------------------------
    @property
    def dp_degree(self) -> int:
        """Data-parallel ranks the batch is split over: dp_replicate x dp_shard."""
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        """Ranks the plan needs: dp_replicate x dp_shard x cp x tp x pp (ep borrows)."""
        return self.dp_degree * self.cp * self.tp * self.pp

    @property
    def local_batch_size(self) -> int:
        """Samples per DP rank per optimizer step: gbs / (dp_replicate x dp_shard)."""
        return self.global_batch_size // self.dp_degree

    @property
    def microbatches(self) -> int:
        """Microbatches per pipeline (per DP rank) per step: gbs / (dp degree x mb)."""
        return self.global_batch_size // (self.dp_degree * self.microbatch_size)

    @property
    def virtual_stages(self) -> int:
        """Model chunks along the pipeline: pp x vpp."""
        return self.pp * self.vpp

    @property
    def dp_enabled(self) -> bool:
        """Whether the batch is split over more than one rank."""
        return self.dp_degree > 1

    @property
    def dp_replicate_enabled(self) -> bool:
        """Whether some ranks hold full replicas (DDP, or HSDP's replicate dimension)."""
        return self.dp_replicate > 1

    @property
    def fsdp_enabled(self) -> bool:
        """Whether FSDP shards parameters, gradients and optimizer state (dp_shard > 1)."""
        return self.dp_shard > 1

    @property
    def hsdp_enabled(self) -> bool:
        """Whether FSDP shards within groups that are replicated (both DP degrees > 1)."""
        return self.dp_replicate > 1 and self.dp_shard > 1

    tp_enabled = property(lambda self: self.tp > 1, doc="Whether tensor parallelism is on.")
    pp_enabled = property(lambda self: self.pp > 1, doc="Whether pipeline parallelism is on.")
    cp_enabled = property(lambda self: self.cp > 1, doc="Whether context parallelism is on.")
    ep_enabled = property(lambda self: self.ep > 1, doc="Whether expert parallelism is on.")

    @property
    def interleaved(self) -> bool:
        """Whether the pipeline runs the interleaved 1F1B schedule."""
        return self.schedule == "interleaved-1f1b"

    def _state_shard_degree(self, zero_stage: int) -> int:
        if self.fsdp_enabled:
            return self.dp_shard * self.cp
        if self.zero >= zero_stage:
            return self.dp_replicate * self.cp
        return 1

    @property
    def param_shard_degree(self) -> int:
        """Ranks one (non-expert) parameter is sharded over: dp_shard x cp under FSDP
        (torchtitan's dp_shard_cp mesh: CP ranks hold the same weights), dp_replicate x cp
        under ZeRO-3 (Megatron shards over its DP x CP group), else 1."""
        return self._state_shard_degree(3)

    @property
    def grad_shard_degree(self) -> int:
        """Ranks the gradients are sharded over (FSDP, or ZeRO >= 2; as `param_shard_degree`)."""
        return self._state_shard_degree(2)

    @property
    def optimizer_shard_degree(self) -> int:
        """Ranks the optimizer state is sharded over (FSDP, or ZeRO >= 1; as
        `param_shard_degree`)."""
        return self._state_shard_degree(1)

    @property
    def mesh_shape(self) -> dict[str, int]:
        """Device-mesh dimensions in torchtitan's order (pp, dp_replicate, dp_shard, cp, tp),
        with every degree; drop the 1s before `init_device_mesh`."""
        return {"pp": self.pp, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard,
                "cp": self.cp, "tp": self.tp}

    def degree(self, dim: str) -> int:
        """Degree of a mesh dimension named as in `MESH_DIMS` (`fsdp` = dp_shard, `dp` =
        dp_replicate)."""
        return getattr(self, KEYS[dim])

    @property
    def strides(self) -> dict[str, int]:
        """Rank distance between neighbours of each mesh dimension's groups, from `order`."""
        out, stride = {}, 1
        for dim in self.order.split("-"):
            out[dim] = stride
            stride *= self.degree(dim)
        return out

    # -- validation against a cluster and a model --------------------------------------
    def violations(self, world_size: int, graph: Any) -> list[Violation]:
        """Every rule this plan breaks on `world_size` ranks for `graph` (any object with
        `units`, `heads`, `kv_heads`, `seq`, `experts`, like `LayerGraph`); [] when none."""
        model = getattr(graph, "model", None) or "the model"
        heads, kv_heads, seq = graph.heads, graph.kv_heads, graph.seq
        out = []
        if self.world_size != world_size:
            out.append(Violation("world_size", "degrees multiply to the world size",
                                 f"dp x fsdp x cp x tp x pp = {self.dp_replicate} x "
                                 f"{self.dp_shard} x {self.cp} x {self.tp} x {self.pp} = "
                                 f"{self.world_size} must equal world_size={world_size}"))
        for name, key, on in (("tp", "tp", self.tp > 1), ("cp", "cp", self.cp > 1),
                              ("sequence_parallel", "sp", self.sequence_parallel)):
            if on and heads is None:
                out.append(Violation(name, "TP, CP and SP split attention, so they need a "
                                     "model with attention heads",
                                     f"{key}={_text(getattr(self, name))} but {model} has "
                                     "no attention heads"))
        if self.tp > 1 and heads is not None:
            if heads % self.tp:
                out.append(Violation("tp", "TP divides attention heads",
                                     f"tp={self.tp} must divide heads={heads}"))
            if kv_heads not in (None, heads) and kv_heads % self.tp:
                out.append(Violation("tp", "TP divides key/value heads",
                                     f"tp={self.tp} must divide kv_heads={kv_heads}"))
        if self.cp > 1 and heads is not None:
            if seq is None:
                out.append(Violation("cp", "CP splits the sequence, so it needs a sequence",
                                     f"cp={self.cp} but {model} has no sequence"))
            elif seq % self.cp:
                out.append(Violation("cp", "CP divides the sequence",
                                     f"cp={self.cp} must divide seq={seq}"))
        if self.sequence_parallel and heads is not None and seq is not None \
                and seq % self.cp == 0 and (seq // self.cp) % self.tp:
            out.append(Violation("sequence_parallel", "SP splits each sequence (CP shard) over "
                                 "the TP ranks, so tp divides seq / cp",
                                 f"tp={self.tp} must divide seq / cp = {seq // self.cp}"))
        if self.virtual_stages > 1 and graph.units < self.virtual_stages:
            out.append(Violation("pp", "each pipeline (virtual) stage gets at least one unit",
                                 f"pp x vpp = {self.pp} x {self.vpp} = {self.virtual_stages} "
                                 f"stages but {model} has {graph.units} units"))
        if self.ep > 1:
            if not graph.experts:
                out.append(Violation("ep", "EP splits experts, so it needs a mixture-of-experts "
                                     "model", f"ep={self.ep} but {model} has no experts"))
            elif graph.experts % self.ep:
                out.append(Violation("ep", "EP divides the experts",
                                     f"ep={self.ep} must divide experts={graph.experts}"))
        return out

    def validate(self, world_size: int, graph: Any) -> None:
        """Raise one `PlanError` listing every rule `violations` finds (none: return)."""
        _raise_if(self.violations(world_size, graph))


_DEFAULT_ITEMS = tuple(Plan()._items())


# -- pipeline stages ----------------------------------------------------------------------
