"""Seeded synthetic inputs, shared by every family's `example_inputs` (and the runner's data).

One generator seed, so every process and every run draws the same batch.
"""
from __future__ import annotations

import torch


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(batch: int, size: int | tuple[int, int], device,
           channels: int = 3) -> tuple[torch.Tensor]:
    """Random images (batch, channels, H, W); `size` is H = W or (H, W)."""
    h, w = (size, size) if isinstance(size, int) else size
    return (torch.randn(batch, channels, h, w, generator=_generator()).to(device),)


def clips(batch: int, frames: int, size: int, device, channels: int = 3) -> tuple[torch.Tensor]:
    """Random clips (batch, channels, frames, size, size)."""
    x = torch.randn(batch, channels, frames, size, size, generator=_generator())
    return (x.to(device),)


def tokens(vocab: int, seq: int, batch: int, device) -> tuple[torch.Tensor]:
    """Random token ids (batch, seq) below `vocab`."""
    return (torch.randint(0, vocab, (batch, seq), generator=_generator()).to(device),)
