"""Peak tensor memory of a training step on CPU (CUDA has `max_memory_allocated`).

RSS and tracemalloc do not see tensor memory, and `MemTracker` refuses modules called more
than once per step (microbatches, pipeline schedules). `StorageTracker` is a dispatch mode
that sees every tensor an op creates and keeps a weak reference to its storage, starting from
the storages alive when it is entered (weights, gradients, optimizer state; a DTensor's local
shard). After every op it sums the current size of every live storage: storages freed are
gone, and storages FSDP resizes in place (to zero after resharding, back to full before a
gather) count at their current size. Its peak is the most tensor bytes alive at once.
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
        self._live: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0
        for t in _tensors(roots):
            self._track(t)
        self._measure()

    def _track(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        local = getattr(t, "_local_tensor", None)  # a DTensor: its local shard holds memory
        if local is not None:
            return self._track(local)
        try:
            st = t.untyped_storage()
            key = st.data_ptr() or id(st)
        except (RuntimeError, NotImplementedError):  # storage-less subclasses, freed storages
            return
        if key not in self._live:
            try:
                self._live[key] = weakref.ref(st)
            except TypeError:
                pass

    def _measure(self) -> None:
        total, dead = 0, []
        for key, ref in self._live.items():
            st = ref()
            if st is None:
                dead.append(key)
                continue
            try:
                total += st.nbytes()
            except RuntimeError:
                dead.append(key)
        for key in dead:
            del self._live[key]
        self.current = total
        self.peak = max(self.peak, total)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        self._measure()
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
