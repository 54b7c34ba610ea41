"""Expert parallelism for `workbench.models.moe.MoE` (CPU gloo and CUDA nccl alike).

Layout: an expert-parallel group of `ep` ranks splits the `E` experts into contiguous blocks;
rank r holds experts [r * E/ep, (r + 1) * E/ep) (the (E, ...) expert parameters are sliced on
dim 0). The router (`gate`) stays replicated: its gradient must be all-reduced across the
ranks like any data-parallel parameter, since every rank routes different tokens.

Forward (GShard, Lepikhin et al. 2020, arXiv:2006.16668, section 2.2; the same dispatch and
combine as torchtitan's `ExpertParallel`): every rank routes its own tokens and fills the
module's (E, C, d) dispatch buffer exactly as the single-process MoE does, with the capacity
C computed from its *local* tokens (GShard computes it per group). The buffer, read as
(ep, E/ep, C, d), is exchanged with one all-to-all so that rank r receives, from every rank,
the C slots of each of its own experts: (ep source ranks, E/ep, C, d). The local experts run
on (E/ep, ep x C, d), and a second all-to-all returns every slot to the rank that owns its
token, where the module's weighted combine runs unchanged. The backward is the same two
all-to-alls in reverse order.

Implementation: `apply_expert_parallel` changes the class of `moe.experts` to
`ExpertParallelExperts` (a subclass of `Experts`, the way FSDP2's `fully_shard` swaps classes),
whose forward wraps the expert computation in the two all-to-alls; `MoE.forward` (routing,
capacity, dispatch, combine) is not touched, so the module keeps a single definition of the
routing. Parameter names are unchanged (`experts.w1` has shape (E/ep, d, ffn) instead of
(E, d, ffn)).

The all-to-all is `torch.distributed._functional_collectives.all_to_all_single_autograd`,
the autograd-aware functional collective that torch 2.13 recommends (the older
`torch.distributed.nn.functional.all_to_all_single` still works on gloo but emits a
FutureWarning saying it is deprecated in its favour); both were checked on gloo with CPU
tensors, and the same call runs on nccl with CUDA tensors.

Bytes: each all-to-all call moves an (E, C, d) buffer of which a rank keeps the 1/ep that
belongs to its own experts, so one rank sends `all_to_all_sent_bytes(...)` =
(ep - 1)/ep x E x C x d x element bytes per call; a forward makes 2 calls (dispatch and
combine), a backward 2 more. This is the cost model's convention (`costmodel.comm`: size =
the all-to-all buffer, wire factor (n - 1)/n).

Requirement: every rank of the group passes the same number of tokens per call (so that all
ranks compute the same C), as with equal microbatches in data-parallel training; it is not
checked (that would cost a collective per call), and a mismatch aborts the processes on gloo
(`gloo::EnforceNotMet`, SIGABRT). Tokens a rank drops for lack of capacity are dropped from
its own buffer before the exchange, as in the single-process module applied to that rank's
tokens alone.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from ..models.moe import Experts, MoE

EXPERT_PARAMS = ("w1", "w2", "w3", "b1", "b2")
"""Names of `Experts`' parameters, each of shape (E, ...) and sliced on dim 0 by EP."""


def local_expert_range(num_experts: int, rank: int, ep: int) -> tuple[int, int]:
    """[first, last) global indices of the experts that rank `rank` of an `ep`-rank group holds.

    Raises ValueError when `num_experts` is not divisible by `ep` or `rank` is outside [0, ep).
    """
    if ep < 1:
        raise ValueError(f"expert parallel: ep must be >= 1, got {ep}")
    if num_experts % ep:
        raise ValueError(f"expert parallel: num_experts ({num_experts}) must be divisible by "
                         f"ep ({ep})")
    if not 0 <= rank < ep:
        raise ValueError(f"expert parallel: rank must be in [0, ep={ep}), got {rank}")
    per_rank = num_experts // ep
    return rank * per_rank, (rank + 1) * per_rank


def all_to_all_sent_bytes(num_experts: int, capacity: int, dim: int, ep: int,
                          dtype_bytes: int) -> int:
    """Bytes one rank sends in one EP all-to-all (dispatch or combine): the (E, C, d) buffer
    less the E/ep experts' slots it keeps, (ep - 1) x (E/ep) x C x d x dtype_bytes."""
    local_expert_range(num_experts, 0, ep)  # validates num_experts and ep
    return (ep - 1) * (num_experts // ep) * capacity * dim * dtype_bytes


class ExpertParallelExperts(Experts):
    """`Experts` holding only this rank's E/ep experts; its forward takes the full (E, C, d)
    dispatch buffer of this rank's tokens and returns the (E, C, d) expert outputs for them,
    exchanging slots with the other ranks of `ep_group` by all-to-all.

    Made by `apply_expert_parallel` (class swap); never constructed directly.
    """

    ep_group: dist.ProcessGroup
    """The expert-parallel process group."""
    ep_size: int
    """Ranks in `ep_group`."""
    ep_rank: int
    """This rank's index in `ep_group`."""
    num_experts: int
    """Experts of the whole layer (E)."""
    num_local_experts: int
    """Experts held by this rank (E / ep)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (E, C, d), this rank's tokens
        """All-to-all the slots to their experts' ranks, run the local experts, send back."""
        e, cap, dim = x.shape
        if e != self.num_experts:
            raise ValueError(f"expert parallel: dispatch buffer has {e} experts, the layer "
                             f"has num_experts={self.num_experts}")
        ep, local = self.ep_size, self.num_local_experts
        # Chunk j of dim 0 (experts of rank j) goes to rank j; chunk i received comes from
        # rank i: (ep source ranks, E/ep, C, d).
        received = all_to_all_single_autograd(x.contiguous(), None, None, self.ep_group)
        slots = received.view(ep, local, cap, dim).transpose(0, 1).reshape(local, ep * cap, dim)
        y = super().forward(slots)                                       # (E/ep, ep*C, d)
        y = y.view(local, ep, cap, dim).transpose(0, 1).reshape(e, cap, dim)
        return all_to_all_single_autograd(y, None, None, self.ep_group).view(e, cap, dim)


def apply_expert_parallel(moe: MoE, group: dist.ProcessGroup) -> None:
    """Shard `moe`'s experts over `group` in place (see the module docstring).

    Rank r of the group keeps experts [r * E/ep, (r + 1) * E/ep) of the weights the module
    holds now (so ranks that built the same seeded model need no loading; otherwise use
    `load_full_experts` afterwards). The router stays replicated. Build the optimizer after
    this call: the expert parameters are new (smaller) tensors.

    Raises ValueError when `moe` is not an MoE, is already expert-parallel, or its number of
    experts is not divisible by the group size.
    """
    if not isinstance(moe, MoE):
        raise ValueError(f"expert parallel: moe must be a workbench.models.moe.MoE, got "
                         f"{type(moe).__name__}")
    experts = moe.experts
    if isinstance(experts, ExpertParallelExperts):
        raise ValueError("expert parallel: moe.experts is already expert-parallel")
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    first, last = local_expert_range(moe.num_experts, rank, ep)
    for name in EXPERT_PARAMS:
        p = getattr(experts, name)
        if p is not None:
            setattr(experts, name, nn.Parameter(p.detach()[first:last].clone(),
                                                requires_grad=p.requires_grad))
    experts.__class__ = ExpertParallelExperts
    experts.ep_group, experts.ep_size, experts.ep_rank = group, ep, rank
    experts.num_experts, experts.num_local_experts = moe.num_experts, last - first


def shard_expert_state(full_state: Mapping[str, torch.Tensor], num_experts: int, rank: int,
                       ep: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """The entries of an unsharded MoE state dict that rank `rank` of `ep` holds: every key
    under `prefix` (e.g. `layers.0.feed_forward.`), the expert parameters sliced on dim 0 to
    this rank's experts, the rest (the router) as is. Keys lose `prefix`.

    Raises ValueError when an expert tensor does not have `num_experts` rows.
    """
    first, last = local_expert_range(num_experts, rank, ep)
    out = {}
    for key, value in full_state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in {f"experts.{p}" for p in EXPERT_PARAMS}:
            if value.shape[0] != num_experts:
                raise ValueError(f"expert parallel: {key} has {value.shape[0]} experts on "
                                 f"dim 0, expected num_experts={num_experts}")
            value = value[first:last]
        out[name] = value
    return out


def load_full_experts(moe: MoE, full_state: Mapping[str, torch.Tensor], rank: int, ep: int,
                      prefix: str = "") -> None:
    """Load an unsharded MoE state dict (keys `gate.weight`, `experts.w1`, ..., under
    `prefix`) into an expert-parallel `moe`: the router whole, the experts of `rank` of `ep`.

    Raises ValueError when `moe` is not expert-parallel with this `ep` and `rank`; missing or
    unexpected keys raise as in `load_state_dict(strict=True)`.
    """
    experts = moe.experts
    if not isinstance(experts, ExpertParallelExperts):
        raise ValueError("expert parallel: call apply_expert_parallel(moe, group) before "
                         "load_full_experts")
    if (experts.ep_size, experts.ep_rank) != (ep, rank):
        raise ValueError(f"expert parallel: moe is sharded as rank {experts.ep_rank} of ep="
                         f"{experts.ep_size}, asked to load rank {rank} of ep={ep}")
    moe.load_state_dict(shard_expert_state(full_state, moe.num_experts, rank, ep, prefix))
