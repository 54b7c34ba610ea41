"""Build a LayerGraph from any nn.Module by running it on the meta device.

Forward hooks on leaf modules (linear, convolutions, norms, embeddings, LSTM, pooling, MoE
experts) and a function mode that catches `F.scaled_dot_product_attention` record each op's
real shapes, then cost it with the same formulas (`ops.py`) as the analytic builders.
Parameters that no handled module owns (class tokens, position tables, queries) become
`parameter` layers. Elementwise functional ops are not seen (they carry no parameters and
no counted FLOPs); the analytic graphs include them.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .graph import Layer, LayerGraph, make_layer

Handler = Callable[[str, nn.Module, tuple, Any], list[Layer]]


def _requires_grad(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.requires_grad


def _linear(name, m: nn.Linear, inputs, out):
    x = inputs[0]
    return [make_layer(name, "linear", tokens=x.numel() // m.in_features,
                       in_features=m.in_features, out_features=m.out_features,
                       bias=m.bias is not None, input_grad=_requires_grad(x))]


def _conv(name, m, inputs, out):
    x = inputs[0]
    dims = len(m.kernel_size)
    batch = x.shape[0] if x.dim() == dims + 2 else 1
    return [make_layer(name, "conv", batch=batch, in_channels=m.in_channels,
                       out_channels=m.out_channels, kernel=tuple(m.kernel_size),
                       in_spatial=tuple(x.shape[-dims:]), out_spatial=tuple(out.shape[-dims:]),
                       groups=m.groups, bias=m.bias is not None,
                       transposed=isinstance(m, nn.modules.conv._ConvTransposeNd),
                       input_grad=_requires_grad(x))]


def _norm(name, m, inputs, out):
    affine = [p for p in m.parameters(recurse=False)]
    channels = affine[0].numel() if affine else 0
    return [make_layer(name, "norm", elements=inputs[0].numel(), channels=channels,
                       affine_params=len(affine))]


def _embedding(name, m: nn.Embedding, inputs, out):
    return [make_layer(name, "embedding", tokens=inputs[0].numel(),
                       num_embeddings=m.num_embeddings, dim=m.embedding_dim)]


def _lstm(name, m: nn.LSTM, inputs, out):
    x = inputs[0]
    if m.bidirectional or m.proj_size:
        raise ValueError(f"{name}: the tracer handles unidirectional LSTMs without projection")
    seq, batch = (x.shape[1], x.shape[0]) if m.batch_first else (x.shape[0], x.shape[1])
    if x.dim() == 2:
        seq, batch = x.shape[0], 1
    return [make_layer(f"{name}.layer{i}", "lstm", batch=batch, seq=seq,
                       input_size=m.input_size if i == 0 else m.hidden_size,
                       hidden=m.hidden_size, bias=m.bias,
                       input_grad=_requires_grad(x) if i == 0 else True)
            for i in range(m.num_layers)]


def _pool(name, m, inputs, out):
    x = inputs[0]
    dims = x.dim() - 2
    in_sp, out_sp = tuple(x.shape[2:]), tuple(out.shape[2:])
    k = getattr(m, "kernel_size", None)
    if k is None:  # adaptive pools: the effective window
        kernel = tuple(-(-i // o) for i, o in zip(in_sp, out_sp))
    else:
        kernel = tuple(k) if isinstance(k, (tuple, list)) else (k,) * dims
    return [make_layer(name, "pool", batch=x.shape[0], channels=x.shape[1], kernel=kernel,
                       in_spatial=in_sp, out_spatial=out_sp)]


def _experts(name, m, inputs, out):
    x = inputs[0]  # (E, C, dim)
    e, cap, dim = x.shape
    ffn = m.w1.shape[-1]
    layers = [make_layer(f"{name}.w1", "batched_matmul", batch=e, m=cap, k=dim, n=ffn,
                         params=True, bias=m.b1 is not None, input_grad=_requires_grad(x))]
    if m.w3 is not None:
        layers.append(make_layer(f"{name}.w3", "batched_matmul", batch=e, m=cap, k=dim, n=ffn,
                                 params=True, input_grad=_requires_grad(x)))
    layers.append(make_layer(f"{name}.w2", "batched_matmul", batch=e, m=cap, k=ffn, n=dim,
                             params=True, bias=m.b2 is not None))
    return layers


def default_handlers() -> dict[type, Handler]:
    """Module class -> handler; more specific classes are matched first (exact type)."""
    from ..models.moe import Experts

    handlers: dict[type, Handler] = {nn.Linear: _linear, nn.Embedding: _embedding,
                                     nn.LSTM: _lstm, Experts: _experts}
    for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                nn.ConvTranspose3d):
        handlers[cls] = _conv
    for cls in (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d,
                nn.BatchNorm3d):
        handlers[cls] = _norm
    for cls in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                nn.AdaptiveMaxPool2d):
        handlers[cls] = _pool
    return handlers


class _AttentionCatcher(TorchFunctionMode):
    """Records every scaled_dot_product_attention call under the current module's name."""

    def __init__(self, stack: list[str], layers: list[Layer]):
        super().__init__()
        self.stack, self.layers = stack, layers

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            owner = self.stack[-1] if self.stack else ""
            self.layers.append(make_layer(
                f"{owner}.sdpa" if owner else "sdpa", "attention",
                batch=q.shape[:-3].numel() if q.dim() > 3 else 1, heads=q.shape[-3],
                q_len=q.shape[-2], kv_len=k.shape[-2], head_dim=q.shape[-1],
                kv_heads=k.shape[-3], causal=bool(kwargs.get("is_causal", False))))
        return func(*args, **kwargs)


def trace(module: nn.Module, inputs: tuple, *, model: str = "", family: str = "",
          handlers: dict[type, Handler] | None = None) -> LayerGraph:
    """Run `module(*inputs)` once (meta tensors recommended) and return its LayerGraph.

    Layers appear in execution order; a module called twice appears twice (weights shared by
    reuse count once). `units`, heads and the TP/CP/EP rules are not inferred (they are
    left at their defaults).
    """
    handlers = handlers or default_handlers()
    layers: list[Layer] = []
    stack: list[str] = []
    covered: set[int] = set()
    seen_params: set[int] = set()
    hooks = []

    def pre(name):
        def hook(mod, args):
            stack.append(name)
        return hook

    def post(name, handler):
        def hook(mod, args, out):
            stack.pop()
            if handler is not None:
                new = handler(name, mod, args, out)
                own = list(mod.parameters())
                fresh = sum(p.numel() for p in own if id(p) not in seen_params)
                if fresh != sum(l.params for l in new):  # reused module or tied weight
                    new = [replace(l, params=fresh if j == 0 else 0) for j, l in enumerate(new)]
                seen_params.update(id(p) for p in own)
                layers.extend(new)
        return hook

    for name, mod in module.named_modules():
        handler = handlers.get(type(mod))
        if handler is not None:
            covered.update(id(p) for p in mod.parameters())
        hooks.append(mod.register_forward_pre_hook(pre(name)))
        hooks.append(mod.register_forward_hook(post(name, handler)))
    try:
        with _AttentionCatcher(stack, layers):
            module(*inputs)
    finally:
        for h in hooks:
            h.remove()
    for pname, p in module.named_parameters():
        if id(p) not in covered and id(p) not in seen_params:
            layers.append(make_layer(pname, "parameter", elements=p.numel()))
    return LayerGraph(model=model, family=family, layers=layers,
                      batch=inputs[0].shape[0] if inputs and inputs[0].dim() else 1)
