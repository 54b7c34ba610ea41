"""Count the bytes of every collective a rank issues, by kind and by group.

A `TorchDispatchMode` sees the c10d ops (eager `torch.distributed` calls, FSDP2, pipeline
send/recv) and the functional collectives (DTensor redistributions for TP and SP); the
all-reduces of `loss_parallel` run inside DTensor's dispatch and are counted from the loss's
aten ops (`_VOCAB_LOSS`). Sizes follow `costmodel.comm`'s conventions: an all-reduce counts
its buffer, an all-gather its output (all shards), a reduce-scatter its input, an all-to-all
the rank's buffer, a send or receive its message. DDP's reducer calls the process group from
C++, out of the dispatcher's sight, so DDP buckets are counted by a comm hook
(`ddp_counting_hook`).

On gloo, FSDP2 runs a reduce-scatter as an all-reduce of the whole gradient followed by a
local slice; the counter records the collective that ran, and `logical()` maps it back to
the reduce-scatter the plan issued where it can tell (an all-reduce inside an FSDP
reduce-scatter region).
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

_C10D = {  # c10d op -> (kind, index of the argument whose tensors are counted)
    "allreduce_": ("all_reduce", 0), "allreduce_coalesced_": ("all_reduce", 0),
    "allgather_": ("all_gather", 0), "_allgather_base_": ("all_gather", 0),
    "allgather_into_tensor_coalesced_": ("all_gather", 0),
    "reduce_scatter_": ("reduce_scatter", 1), "_reduce_scatter_base_": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "alltoall_": ("all_to_all", 1), "alltoall_base_": ("all_to_all", 1),
    "send": ("send", 0), "recv_": ("recv", 0), "broadcast_": ("broadcast", 0),
}
_FUNCTIONAL = {  # functional collective -> (kind, count the output instead of the input)
    "all_reduce": ("all_reduce", False), "all_reduce_coalesced": ("all_reduce", False),
    "all_gather_into_tensor": ("all_gather", True),
    "all_gather_into_tensor_coalesced": ("all_gather", True),
    "reduce_scatter_tensor": ("reduce_scatter", False),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", False),
    "all_to_all_single": ("all_to_all", False), "broadcast": ("broadcast", False),
}


_VOCAB_LOSS = {"_log_softmax": 2, "nll_loss_forward": 1}
"""All-reduces `loss_parallel` issues per aten op on vocabulary-split logits (the row maximum
and the sum of exponentials; the target's logit), each of one value per row. Its handlers run
inside DTensor's dispatch, out of this mode's sight, so the mode counts them from the op."""


def _vocab_loss_allreduces(name: str, args) -> tuple[int, int, object] | None:
    """(calls, bytes per call, process group) of `loss_parallel`'s all-reduces inside aten op
    `name`, or None when its input is not a DTensor split along the class dimension."""
    from torch.distributed.tensor import DTensor
    x = args[0] if args else None
    if name not in _VOCAB_LOSS or not isinstance(x, DTensor):
        return None
    dim = args[1] if name == "_log_softmax" else min(1, x.dim() - 1)  # nll: classes on dim 1
    dim %= x.dim()
    for mesh_dim, placement in enumerate(x.placements):
        if placement.is_shard(dim):
            rows = x.numel() // x.shape[dim]
            return _VOCAB_LOSS[name], rows * x.element_size(), x.device_mesh.get_group(mesh_dim)
    return None


def _process_group(func, args):
    """The collective's process group: the c10d op's argument, or the functional op's group
    name resolved."""
    for arg, value in zip(func._schema.arguments, args):
        if arg.name == "process_group":
            return value if hasattr(value, "size") else dist.ProcessGroup.unbox(value)
        if arg.name == "group_name":
            from torch.distributed.distributed_c10d import _resolve_process_group
            return _resolve_process_group(value)
    return None


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


class CommCounter(TorchDispatchMode):
    """Bytes and calls per collective kind (and per kind x group size)."""

    def __init__(self):
        super().__init__()
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.by_group: dict[tuple[str, str], int] = defaultdict(int)
        self.group_labels: dict[str, str] = {}
        """Process-group name -> what the group is (a mesh dimension: tp, pp, dp_shard_cp...)."""
        self.active = False

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def add(self, kind: str, nbytes: int, group: str | None = None) -> None:
        """Record one collective (only while the counter is entered)."""
        if not self.active:
            return
        self.bytes[kind] += nbytes
        self.calls[kind] += 1
        if group:
            self.by_group[(kind, group)] += nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns, name = func.namespace, func._schema.name.split("::")[-1]
        table = _C10D if ns == "c10d" else _FUNCTIONAL if ns == "_c10d_functional" else None
        out = func(*args, **kwargs)
        if table and name in table:
            kind, where = table[name]
            if ns == "c10d":
                nbytes = _nbytes(args[where])
            else:
                nbytes = _nbytes(out if where else args[0])
            self.add(kind, nbytes, self._label(_process_group(func, args)))
        elif self.active and (loss := _vocab_loss_allreduces(name, args)) is not None:
            calls, nbytes, pg = loss
            for _ in range(calls):
                self.add("all_reduce", nbytes, self._label(pg))
        return out

    def _label(self, pg) -> str | None:
        """What process group `pg` is (its mesh dimension), its size if unnamed, None if none."""
        if pg is None:
            return None
        return self.group_labels.get(pg.group_name, f"{pg.size()} ranks")

    def summary(self) -> dict[str, dict[str, int]]:
        """{kind: {"bytes": ..., "calls": ..., "by_group": {group: bytes}}}."""
        return {k: {"bytes": int(self.bytes[k]), "calls": int(self.calls[k]),
                    "by_group": {g: int(b) for (kind, g), b in self.by_group.items()
                                 if kind == k}}
                for k in self.bytes}


def ddp_counting_hook(counter: CommCounter):
    """A DDP comm hook that runs each bucket's all-reduce from Python, as DDP would, so that
    the dispatch mode sees (and counts) it."""
    def hook(state, bucket):  # unannotated: DDP checks real annotations, not strings
        buf = bucket.buffer()
        world = dist.get_world_size(state)
        fut = dist.all_reduce(buf, group=state, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0].div_(world))
    return hook
