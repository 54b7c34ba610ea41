"""Ring attention against plain SDPA on the full sequence, in spawned gloo worlds of 2 and 4.

Each world is one spawn (process start-up dominates: ~5 s for 2 ranks, ~10 s for 4), and each
worker runs every check and writes its measurements to a JSON file that the parent asserts on,
so a failure names the case, the rank and the error.
"""
from __future__ import annotations

import json
import os
import socket
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from workbench.runner.ring_attention import gather_sequence, ring_attention, shard_sequence

B, H, S_LOCAL, D = 2, 4, 4, 8
"""Batch, query heads, positions per rank and head width of every case."""
TOL = {"float64": 1e-12, "float32": 1e-5}
"""Largest absolute difference from SDPA allowed per dtype (measured: float64 <= 3.1e-15,
float32 <= 9.5e-7 at world 2 and 4)."""


def _free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _compare(name: str, world: int, rank: int, group, causal: bool, h_kv: int, dtype: torch.dtype,
             seed: int, errors: dict, scale: float | None = None) -> None:
    """Run one case on `group` and record max |ring - SDPA| of output and q/k/v gradients."""
    gen = torch.Generator().manual_seed(seed)  # identical full tensors on every rank of the group
    s_full = S_LOCAL * world
    q = torch.randn(B, H, s_full, D, generator=gen, dtype=dtype, requires_grad=True)
    k = torch.randn(B, h_kv, s_full, D, generator=gen, dtype=dtype, requires_grad=True)
    v = torch.randn(B, h_kv, s_full, D, generator=gen, dtype=dtype, requires_grad=True)
    dout = torch.randn(B, H, s_full, D, generator=gen, dtype=dtype)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=h_kv != H)
    ref.backward(dout)

    def local(t):
        return shard_sequence(t.detach(), 2, rank, world).requires_grad_()

    ql, kl, vl = local(q), local(k), local(v)
    out = ring_attention(ql, kl, vl, group, causal=causal, scale=scale)
    out.backward(shard_sequence(dout, 2, rank, world))
    for part, got, want in (("out", out, ref), ("dq", ql.grad, q.grad), ("dk", kl.grad, k.grad),
                            ("dv", vl.grad, v.grad)):
        errors[f"{name}/{part}"] = (got.detach() - shard_sequence(want.detach(), 2, rank, world)).abs().max().item()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """All checks of one rank; results go to out_dir/rank{r}.json."""
    torch.set_num_threads(1)
    result: dict = {"errors": {}, "exact": {}}
    code = 0
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        errors, exact = result["errors"], result["exact"]
        for causal in (False, True):
            for h_kv in (H, 2):  # plain multi-head, and GQA with 2 query heads per kv head
                name = f"{'causal' if causal else 'full'}/h_kv={h_kv}/float64"
                _compare(name, world, rank, None, causal, h_kv, torch.float64, 0, errors)
        _compare("causal/h_kv=1/float32/scale=0.3", world, rank, None, True, 1, torch.float32, 1, errors, scale=0.3)

        # Causal blocks from later ranks are skipped: rank r multiplies r + 1 blocks, each
        # 2 matmuls of 2 * B * H * S_LOCAL^2 * D FLOPs = 2 * 2 * 2*4*4*4*8 = 4096 FLOPs per block.
        per_block = 2 * 2 * B * H * S_LOCAL * S_LOCAL * D
        for causal, blocks in ((False, world), (True, rank + 1)):
            x = torch.randn(B, H, S_LOCAL, D, dtype=torch.float64)
            with FlopCounterMode(display=False) as fc:
                ring_attention(x, x, x, None, causal=causal)
            exact[f"forward_flops/causal={causal}"] = [fc.get_total_flops(), blocks * per_block]

        # Sharding helpers: gather(shard) is the identity; the gradient is the local slice.
        full = torch.arange(3 * 2 * world * 5, dtype=torch.float64).reshape(3, 2 * world, 5)
        shard = shard_sequence(full, 1, rank, world).requires_grad_()
        gathered = gather_sequence(shard, 1, None)
        weight = full * 0.5 + 1.0
        (gathered * weight).sum().backward()
        exact["gather_sequence_is_identity"] = [bool(torch.equal(gathered.detach(), full)), True]
        exact["gather_sequence_grad_is_slice"] = [
            bool(torch.equal(shard.grad, shard_sequence(weight, 1, rank, world))), True]

        # Group ranks differ from global ranks: interleaved sub-rings {0, 2} and {1, 3}.
        if world == 4:
            groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
            _compare("subgroup/causal/h_kv=2/float64", 2, rank // 2, groups[rank % 2], True, 2, torch.float64,
                     10 + rank % 2, errors)
        # A group of one rank takes the local path (no communication).
        singles = [dist.new_group([r]) for r in range(world)]
        _compare("single/causal/h_kv=2/float64", 1, 0, singles[rank], True, 2, torch.float64, 20 + rank, errors)
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # reported by the parent with the rank's traceback
        result["traceback"] = traceback.format_exc()
        code = 1
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    os._exit(code)


def _run_world(world: int, tmp_path) -> list[dict]:
    """Spawn `world` gloo ranks and return each rank's result dictionary."""
    try:
        mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    except Exception as exc:  # a rank exited non-zero: show its own traceback
        details = []
        for r in range(world):
            path = tmp_path / f"rank{r}.json"
            details.append(json.loads(path.read_text()).get("traceback", "") if path.exists() else "no result")
        pytest.fail(f"world {world} failed: {exc}\n" + "\n".join(f"rank {r}: {t}" for r, t in enumerate(details)))
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def _check(results: list[dict], world: int) -> None:
    """Every rank: every error under TOL, every exact quantity equal to its expectation."""
    for rank, res in enumerate(results):
        assert "traceback" not in res, f"world {world} rank {rank}:\n{res['traceback']}"
        expected_cases = 4 * 4 + 4 + 4 + (4 if world == 4 else 0)  # 5 cases + single (+ subgroup), 4 parts each
        assert len(res["errors"]) == expected_cases, sorted(res["errors"])
        for name, err in res["errors"].items():
            tol = TOL["float32" if "float32" in name else "float64"]
            assert err < tol, f"world {world} rank {rank} {name}: max |ring - SDPA| = {err:.3g}"
        for name, (got, want) in res["exact"].items():
            assert got == want, f"world {world} rank {rank} {name}: got {got}, want {want}"


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_matches_sdpa(world, tmp_path):
    """Outputs and q/k/v gradients match SDPA on every rank; causal skips later blocks."""
    _check(_run_world(world, tmp_path), world)


def test_ring_attention_rejects_bad_shapes():
    """Shape errors are raised before any communication, naming the argument and the rule."""
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="q must be 4-D"):
        ring_attention(q[0], q, q, None, causal=True)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        ring_attention(q, q, q[:, :2], None, causal=True)
    with pytest.raises(ValueError, match=r"q heads \(4\) must be divisible by k heads \(3\)"):
        ring_attention(q, q[:, :3], q[:, :3], None, causal=True)
    with pytest.raises(ValueError, match="S_local of q"):
        ring_attention(q, q[:, :, :1], q[:, :, :1], None, causal=True)
    with pytest.raises(ValueError, match="scale must be > 0"):
        ring_attention(q, q, q, None, causal=True, scale=0.0)


def test_shard_sequence_layout_and_errors():
    """Rank r gets positions [r*n, (r+1)*n); lengths that do not divide are refused."""
    x = torch.arange(12).reshape(2, 6)
    assert shard_sequence(x, 1, 1, 3).tolist() == [[2, 3], [8, 9]]  # n = 6 / 3 = 2, rank 1: [2, 4)
    assert shard_sequence(x, -1, 2, 3).tolist() == [[4, 5], [10, 11]]
    with pytest.raises(ValueError, match=r"length of dim 1 \(6\) must be divisible by world \(4\)"):
        shard_sequence(x, 1, 0, 4)
    with pytest.raises(ValueError, match="rank must be in"):
        shard_sequence(x, 1, 3, 3)
