"""Expert parallelism of the shared MoE against the single-process module (gloo, world 2 and 4).

Every rank builds the same seeded full MoE in float64, keeps its experts, and routes its own
slice of the tokens. With capacity_factor = experts / top_k nothing is dropped, so the EP
output must equal the full MoE on the concatenation of all ranks' tokens; with a small
capacity factor (drops) it must equal the full MoE on the rank's own tokens (the capacity is
local). Gradients: the local expert weights and the input against the reference's slices, the
router after a sum all-reduce (as data parallelism does).

Bytes: a TorchDispatchMode records every all-to-all a rank issues and counts what it sends,
the input buffer less its own chunk (the chunk addressed to itself never leaves the rank).
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from workbench.costmodel.comm import wire_factor
from workbench.models.moe import MoE
from workbench.runner.expert_parallel import (ExpertParallelExperts, all_to_all_sent_bytes,
                                              apply_expert_parallel, load_full_experts,
                                              local_expert_range, shard_expert_state)

DIM, FFN, EXPERTS, TOP_K = 8, 12, 8, 2
BATCH, SEQ = 2, 3  # tokens per rank: 2 x 3 = 6
TOL = 1e-5
# No drops: capacity = ceil(top_k x tokens x (E / top_k) / E) = tokens on every rank.
NO_DROP = EXPERTS / TOP_K
# Sent bytes per all-to-all, float64, local capacity C = ceil(2 x 6 x 4 / 8) = 6:
# (ep - 1) x (E / ep) x C x d x 8 = (ep - 1) x (8 / ep) x 6 x 8 x 8.
SENT_BYTES = {2: 1 * 4 * 6 * 8 * 8,   # = 1536
              4: 3 * 2 * 6 * 8 * 8}   # = 2304


class AllToAllBytes(TorchDispatchMode):
    """Records (bytes sent to other ranks) for every all-to-all op dispatched on this rank."""

    def __init__(self, rank: int, world: int):
        super().__init__()
        self.rank, self.world, self.sent_bytes = rank, world, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in ("_c10d_functional.all_to_all_single", "c10d.alltoall_base_"):
            if name == "c10d.alltoall_base_":  # (output, input, out_splits, in_splits, ...)
                x, splits = args[1], args[3]
            else:                               # (input, out_splits, in_splits, group)
                x, splits = args[0], args[2]
            row_bytes = x[0].numel() * x.element_size() if x.shape[0] else 0
            own_rows = splits[self.rank] if splits else x.shape[0] // self.world
            self.sent_bytes.append((x.shape[0] - own_rows) * row_bytes)
        return func(*args, **(kwargs or {}))


def _full_moe(gated: bool, capacity_factor: float) -> MoE:
    torch.manual_seed(0)
    moe = MoE(DIM, FFN, EXPERTS, TOP_K, capacity_factor, gated=gated, bias=not gated).double()
    if not gated:  # nonzero biases, so that their gradients and slicing are checked
        with torch.no_grad():
            moe.experts.b1.normal_()
            moe.experts.b2.normal_()
    return moe


def _check(name, got, want):
    err = (got - want).abs().max().item()
    assert err <= TOL, f"{name}: max abs error {err:.3g} > {TOL}"


def _no_drop_case(rank: int, world: int, gated: bool, via_load: bool) -> None:
    """EP with nothing dropped == the full MoE on all ranks' tokens: outputs, gradients, bytes."""
    torch.manual_seed(1)
    x_all = torch.randn(world * BATCH, SEQ, DIM, dtype=torch.float64)
    w_all = torch.randn(world * BATCH, SEQ, DIM, dtype=torch.float64)  # loss weights
    ref = _full_moe(gated, NO_DROP)
    xr = x_all.clone().requires_grad_()
    out_ref = ref(xr)
    (out_ref * w_all).sum().backward()

    if via_load:  # a differently initialised model, then the full weights loaded
        torch.manual_seed(123 + rank)
        moe = MoE(DIM, FFN, EXPERTS, TOP_K, NO_DROP, gated=gated, bias=not gated).double()
        apply_expert_parallel(moe, dist.group.WORLD)
        load_full_experts(moe, ref.state_dict(), rank, world)
    else:
        moe = _full_moe(gated, NO_DROP)
        apply_expert_parallel(moe, dist.group.WORLD)
    assert isinstance(moe.experts, ExpertParallelExperts)
    first, last = local_expert_range(EXPERTS, rank, world)
    assert moe.experts.w1.shape == (EXPERTS // world, DIM, FFN)

    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    x = x_all[rows].clone().requires_grad_()
    counter = AllToAllBytes(rank, world)
    with counter:
        out = moe(x)
    assert counter.sent_bytes == [SENT_BYTES[world]] * 2  # dispatch + combine
    _check("output", out, out_ref[rows])
    with counter:
        (out * w_all[rows]).sum().backward()
    assert counter.sent_bytes == [SENT_BYTES[world]] * 4  # + their two backward all-to-alls

    _check("input grad", x.grad, xr.grad[rows])
    for p in ("w1", "w2", "w3", "b1", "b2"):
        mine = getattr(moe.experts, p)
        if mine is not None:
            full = getattr(ref.experts, p)
            _check(f"{p}", mine.detach(), full.detach()[first:last])
            _check(f"{p} grad", mine.grad, full.grad[first:last])
    gate_grad = moe.gate.weight.grad.clone()
    dist.all_reduce(gate_grad)  # what data parallelism does with the replicated router
    _check("router grad", gate_grad, ref.gate.weight.grad)


def _drop_case(rank: int, world: int) -> None:
    """With drops, EP == the full MoE on this rank's tokens alone (capacity is local)."""
    torch.manual_seed(2)
    x = torch.randn(BATCH, SEQ, DIM, dtype=torch.float64) + rank
    ref = _full_moe(True, 0.5)  # capacity ceil(2 x 6 x 0.5 / 8) = 1 slot per expert
    no_drop = _full_moe(True, NO_DROP)
    moe = _full_moe(True, 0.5)
    apply_expert_parallel(moe, dist.group.WORLD)
    out, out_ref = moe(x), ref(x)
    _check("output with drops", out, out_ref)
    # 12 routed (token, expert) pairs for 8 slots: some were dropped, and that changed the output.
    assert (out_ref - no_drop(x)).abs().max() > 1e-3


def _errors(rank: int, world: int) -> None:
    moe = _full_moe(True, NO_DROP)
    apply_expert_parallel(moe, dist.group.WORLD)
    with pytest.raises(ValueError, match="already expert-parallel"):
        apply_expert_parallel(moe, dist.group.WORLD)
    with pytest.raises(ValueError, match="asked to load rank"):
        load_full_experts(moe, _full_moe(True, NO_DROP).state_dict(), rank, 2 * world)
    odd = MoE(DIM, FFN, world + 1, TOP_K, 1.0, gated=True, bias=False)
    with pytest.raises(ValueError, match=r"num_experts \(\d+\) must be divisible by ep"):
        apply_expert_parallel(odd, dist.group.WORLD)
    with pytest.raises(ValueError, match="call apply_expert_parallel"):
        load_full_experts(odd, odd.state_dict(), rank, world)


def _worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    _no_drop_case(rank, world, gated=True, via_load=False)   # Llama-MoE: SwiGLU, no bias
    _no_drop_case(rank, world, gated=False, via_load=True)   # V-MoE: GELU with biases
    _drop_case(rank, world)
    _errors(rank, world)
    dist.destroy_process_group()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_matches_single_process(world):
    mp.spawn(_worker, args=(world, _free_port()), nprocs=world, join=True)


def test_sent_bytes_formula_matches_cost_model():
    # (ep - 1) x (E / ep) x C x d x bytes: 3 x 2 x 6 x 8 x 8 = 2304 for ep = 4, E = 8.
    assert all_to_all_sent_bytes(8, 6, 8, 4, 8) == 2304
    # The cost model's all-to-all: buffer E x C x d x bytes = 3072 times wire factor 3/4.
    assert all_to_all_sent_bytes(8, 6, 8, 4, 8) == 8 * 6 * 8 * 8 * wire_factor("all_to_all",
                                                                             np.array(4))
    assert all_to_all_sent_bytes(8, 6, 8, 1, 8) == 0  # one rank keeps everything
    for world, sent in SENT_BYTES.items():
        assert all_to_all_sent_bytes(EXPERTS, 6, DIM, world, 8) == sent


def test_shard_expert_state_and_ranges():
    assert local_expert_range(8, 3, 4) == (6, 8)  # 8 / 4 = 2 experts per rank
    full = _full_moe(False, 1.0).state_dict()
    part = shard_expert_state({f"layers.0.mlp.{k}": v for k, v in full.items()} | {"x": 0},
                              EXPERTS, 1, 2, prefix="layers.0.mlp.")
    assert sorted(part) == sorted(full)
    assert torch.equal(part["experts.b2"], full["experts.b2"][4:8])
    assert torch.equal(part["gate.weight"], full["gate.weight"])
    with pytest.raises(ValueError, match="rank must be in"):
        local_expert_range(8, 4, 4)
    with pytest.raises(ValueError, match="expected num_experts=8"):
        shard_expert_state({"experts.w1": torch.zeros(4, 1, 1)}, 8, 0, 2)
