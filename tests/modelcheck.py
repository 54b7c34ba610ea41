"""Shared checks that a model's analytic graph matches the real module.

- parameters: analytic == sum of the module's parameter sizes (meta device, exact);
- FLOPs: analytic counted forward / backward == torch's FlopCounterMode on the module;
- names: every counted op of the analytic graph appears, with the same cost, in the graph the
  tracer builds from the module.
"""
from __future__ import annotations

import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from workbench import costmodel, models
from workbench.costmodel.tracer import trace


def output_sum(out) -> torch.Tensor:
    """A scalar that depends on every tensor of a model's output (tensor, tuple or dict)."""
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    if isinstance(out, dict):
        out = list(out.values())
    return sum(output_sum(o) for o in out)


def flop_counter_flops(module, inputs) -> tuple[int, int]:
    """(forward, backward) FLOPs as FlopCounterMode counts them.

    The math attention backend and mkldnn-off LSTM make CPU/meta kernels visible to the
    counter (see shared/notes/torch-distributed-on-cpu.md).
    """
    with sdpa_kernel(SDPBackend.MATH), torch.backends.mkldnn.flags(enabled=False):
        with FlopCounterMode(display=False) as fwd:
            out = module(*inputs)
        loss = output_sum(out)
        with FlopCounterMode(display=False) as bwd:
            loss.backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


def counted_ops(graph) -> list[tuple]:
    """(name, kind, fwd, bwd) of the counted ops, in order."""
    return [(l.name, l.kind, l.fwd_flops, l.bwd_flops) for l in graph.layers if l.counted]


def check_model(name: str, batch: int = 2, **overrides) -> costmodel.LayerGraph:
    """Assert analytic graph == module for flavour `name`; returns the analytic graph."""
    cfg = models.get(name, **overrides)
    analytic = costmodel.graph(cfg, batch=batch)
    module = models.build(cfg, device="meta")
    module.train()
    params = sum(p.numel() for p in module.parameters())
    assert analytic.params == params, f"{name}: analytic params {analytic.params} != module {params}"
    inputs = models.example_inputs(cfg, batch, "meta")
    traced = trace(module, inputs)
    assert traced.params == params, f"{name}: traced params {traced.params} != module {params}"
    a_ops, t_ops = counted_ops(analytic), counted_ops(traced)
    diff = next((i for i, (x, y) in enumerate(zip(a_ops, t_ops)) if x != y), min(len(a_ops), len(t_ops)))
    assert a_ops == t_ops, (f"{name}: analytic and traced ops differ at op {diff}: "
                            f"analytic {a_ops[diff:diff + 1]} vs traced {t_ops[diff:diff + 1]}")
    fwd, bwd = flop_counter_flops(module, models.example_inputs(cfg, batch, "meta"))
    assert (analytic.counted_fwd_flops, analytic.counted_bwd_flops) == (fwd, bwd), (
        f"{name}: analytic fwd/bwd {analytic.counted_fwd_flops}/{analytic.counted_bwd_flops} "
        f"!= FlopCounterMode {fwd}/{bwd}")
    return analytic


def train_step(name: str, batch: int = 2) -> float:
    """One forward + backward + SGD step of a flavour on the CPU with real tensors; the loss."""
    torch.manual_seed(0)
    cfg = models.get(name)
    module = models.build(cfg)
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=1e-3)
    loss = output_sum(module(*models.example_inputs(cfg, batch))) / 1e3
    loss.backward()
    missing = [n for n, p in module.named_parameters() if p.grad is None]
    assert not missing, f"{name}: parameters without gradient: {missing[:5]}"
    before = [p.detach().clone() for p in module.parameters()]
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, module.parameters())), \
        f"{name}: the optimizer step changed no parameter"
    value = float(loss.detach())
    assert math.isfinite(value), f"{name}: loss {value}"
    return value
