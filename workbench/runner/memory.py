"""Peak tensor memory of a training step on CPU (CUDA has `max_memory_allocated`).

RSS and tracemalloc do not see tensor memory, and `MemTracker` refuses modules called more
than once per step (microbatches, pipeline schedules). `StorageTracker` is a dispatch mode
that sees every tensor an op creates: it adds each new storage's bytes when it appears and
takes them off when the storage is freed (a weak-reference finaliser), starting from the
storages alive when it is entered (weights, gradients, optimizer state). Its peak is the
most tensor bytes alive at once.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class StorageTracker(TorchDispatchMode):
    """Live and peak bytes of tensor storages."""

    def __init__(self, *roots):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self._refs = {}
        for t in _tensors(roots):
            self._track(t)

    def _track(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # DTensor wrappers: track the local shard
            local = getattr(t, "_local_tensor", None)
            if local is not None:
                self._track(local)
            return
        try:
            key, nbytes = st.data_ptr() or id(st), st.nbytes()
        except RuntimeError:  # a storage FSDP has freed (resized to zero)
            return
        if key in self.live or nbytes == 0:
            return
        self.live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        try:
            self._refs[key] = weakref.finalize(st, self._free, key)
        except TypeError:
            pass

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def _tensors(roots) -> list[torch.Tensor]:
    """Every tensor reachable from modules (parameters, buffers, grads) and optimizers."""
    out = []
    for r in roots:
        if isinstance(r, torch.nn.Module):
            for p in r.parameters():
                out.append(p)
                if p.grad is not None:
                    out.append(p.grad)
            out += list(r.buffers())
        elif isinstance(r, torch.optim.Optimizer):
            for state in r.state.values():
                out += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return out
