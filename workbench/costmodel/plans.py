"""Plans as columns of numpy arrays, and the options of the cost model.

The cost model evaluates many plans at once (`search`) and one plan (`estimate`) with the same
code: a single plan is a batch of one.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from ..plan import MESH_DIMS, RECOMPUTE, SCHEDULES, Plan

FRAMEWORK_ALLOWANCE_BYTES = 2 * 2**30
"""Memory every rank loses to the framework: CUDA context (~0.5 GiB), NCCL buffers and
allocator fragmentation. A named constant, documented in the README."""

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}
"""Bytes per activation element of each compute dtype."""


@dataclass(frozen=True)
class CostOptions:
    """Modelling choices that are not part of the plan (README: "Cost model options")."""

    optimizer: str = "adam"
    """`adam` (mixed precision: 16 bytes per parameter with weights and grads) or `sgd`
    (momentum: 12)."""
    attention: str = "flash"
    """`flash` (fused kernel, no score matrix in memory) or `unfused` (scores written, softmax,
    dropout and read back: Megatron-LM before FlashAttention)."""
    dp_algorithm: str = "ring"
    """Collective algorithm of DP/FSDP reductions: ring, tree or hierarchical."""
    overlap_dp: bool = True
    """Overlap gradient reduction with the last microbatch's backward (bucketed, DDP/FSDP);
    the last bucket is always exposed."""
    overlap_tp: bool = False
    """Hide TP collectives behind the unit's GEMMs (Megatron `--tp-comm-overlap`)."""
    overlap_cp: bool = False
    """Hide CP K/V exchange behind the attention compute (ring attention double buffering)."""
    cp_algorithm: str = "ring"
    """`ring` (pass K/V blocks around the CP group) or `all-to-all` (DeepSpeed-Ulysses)."""
    bucket_bytes: float = 25e6
    """Gradient bucket size (DDP default 25 MB)."""
    pp_scatter_gather: bool = False
    """Send 1/tp of each pipeline activation across nodes and all-gather over NVLink
    (Megatron-LM 2021's scatter/gather optimisation)."""
    framework_bytes: float = FRAMEWORK_ALLOWANCE_BYTES
    """Fixed per-rank memory allowance."""

    def __post_init__(self):
        for name, allowed in (("optimizer", ("adam", "sgd")), ("attention", ("flash", "unfused")),
                              ("dp_algorithm", ("ring", "tree", "hierarchical")),
                              ("cp_algorithm", ("ring", "all-to-all"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"cost option {name}={getattr(self, name)!r} must be one of "
                                 f"{', '.join(allowed)}")


@dataclass
class PlanArrays:
    """N plans column by column (degrees, batch split, choices); one dtype and mesh order."""

    dp: np.ndarray
    """Replicate degree."""
    fsdp: np.ndarray
    """Shard degree."""
    tp: np.ndarray
    """Tensor-parallel degree."""
    pp: np.ndarray
    """Pipeline stages."""
    vpp: np.ndarray
    """Model chunks per stage."""
    cp: np.ndarray
    """Context-parallel degree."""
    ep: np.ndarray
    """Expert-parallel degree."""
    mb: np.ndarray
    """Microbatch size (samples)."""
    gbs: np.ndarray
    """Global batch (samples)."""
    sp: np.ndarray
    """Sequence parallel (bool)."""
    recompute: np.ndarray
    """Index into `RECOMPUTE` (0 none, 1 selective, 2 full)."""
    schedule: np.ndarray
    """Index into `SCHEDULES` (0 gpipe, 1 1f1b, 2 interleaved-1f1b)."""
    zero: np.ndarray
    """ZeRO stage."""
    dtype: str = "bf16"
    """Compute dtype of every plan in the batch."""
    order: str = "tp-cp-fsdp-dp-pp"
    """Mesh order of every plan in the batch."""

    def __post_init__(self):
        for f in fields(self):
            if f.name not in ("dtype", "order"):
                setattr(self, f.name, np.atleast_1d(np.asarray(getattr(self, f.name))))
        self.sp = self.sp.astype(bool)

    def __len__(self) -> int:
        return len(self.tp)

    @property
    def microbatches(self) -> np.ndarray:
        """Microbatches per DP rank per step."""
        return self.gbs // (self.dp * self.fsdp * self.mb)

    @property
    def n_chips(self) -> np.ndarray:
        """World size of each plan."""
        return self.dp * self.fsdp * self.tp * self.pp * self.cp

    def degree(self, dim: str) -> np.ndarray:
        """Degree array of a mesh dimension (`MESH_DIMS` names)."""
        return getattr(self, dim)

    def stride(self, dim: str) -> np.ndarray:
        """Rank distance between neighbours of `dim`'s groups, from the mesh order."""
        stride = np.ones(len(self), dtype=np.int64)
        for d in self.order.split("-"):
            if d == dim:
                return stride
            stride = stride * self.degree(d)
        raise ValueError(f"unknown mesh dimension {dim!r}; dimensions: {MESH_DIMS}")

    def group(self, dims: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(size, stride) of the group spanning `dims` together: the product of their degrees
        at the stride of the innermost one with degree > 1 (exact when the dims are adjacent
        in the mesh order)."""
        size = np.prod([self.degree(d) for d in dims], axis=0)
        strides = np.stack([np.where(self.degree(d) > 1, self.stride(d), np.iinfo(np.int64).max)
                            for d in dims])
        stride = strides.min(axis=0)
        return size, np.where(stride == np.iinfo(np.int64).max, 1, stride)

    def take(self, index) -> "PlanArrays":
        """The plans at `index` (an index array or boolean mask)."""
        kw = {f.name: getattr(self, f.name)[index] for f in fields(self)
              if f.name not in ("dtype", "order")}
        return PlanArrays(dtype=self.dtype, order=self.order, **kw)

    @classmethod
    def from_plans(cls, plans: list[Plan]) -> "PlanArrays":
        """Columns of a list of plans (which must share dtype and order)."""
        if not plans:
            raise ValueError("no plans")
        if len({(p.dtype, p.order) for p in plans}) != 1:
            raise ValueError("plans evaluated together must share dtype and order")
        col = lambda name: np.array([getattr(p, name) for p in plans])  # noqa: E731
        return cls(dp=col("dp_replicate"), fsdp=col("dp_shard"), tp=col("tp"), pp=col("pp"),
                   vpp=col("vpp"), cp=col("cp"), ep=col("ep"), mb=col("microbatch_size"),
                   gbs=col("global_batch_size"), sp=col("sequence_parallel"),
                   recompute=np.array([RECOMPUTE.index(p.recompute) for p in plans]),
                   schedule=np.array([SCHEDULES.index(p.schedule) for p in plans]),
                   zero=col("zero"), dtype=plans[0].dtype, order=plans[0].order)

    def plan(self, i: int) -> Plan:
        """Plan `i` as a `Plan`."""
        return Plan(dp_replicate=int(self.dp[i]), dp_shard=int(self.fsdp[i]), tp=int(self.tp[i]),
                    pp=int(self.pp[i]), vpp=int(self.vpp[i]), cp=int(self.cp[i]),
                    ep=int(self.ep[i]), microbatch_size=int(self.mb[i]),
                    global_batch_size=int(self.gbs[i]), sequence_parallel=bool(self.sp[i]),
                    recompute=RECOMPUTE[int(self.recompute[i])],
                    schedule=SCHEDULES[int(self.schedule[i])], zero=int(self.zero[i]),
                    dtype=self.dtype, order=self.order)
