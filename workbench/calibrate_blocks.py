"""Reference blocks: per-op dispatch as models pay it (`workbench calibrate`).

Small blocks written the way PyTorch models are (modules inside modules, 3-D activations,
head reshapes around attention, RoPE as rotate-half, residuals), each listed as the
layer-graph ops the cost model charges for it. `measure_blocks` times them (the slope of
chains of 1 and 3, every rank at once); `fit_dispatch` fits the per-kind dispatch to their
seconds beyond their ops' kernel time, by non-negative least squares.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .calibrate import Settings, _module_chain, chain_times, nnls


def _blocks(device) -> dict:
    """name -> (make(L) of a chain of L blocks, [(op kind, cost-model shape)] of one block)."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    b, s, d, c, hw = 2, 16, 32, 8, 8
    t = b * s
    lin = lambda i, o: ("linear", dict(tokens=t, in_features=i, out_features=o))  # noqa: E731
    elem = ("elementwise", dict(elements=t * d))
    norm = ("norm", dict(elements=t * d, channels=d))
    conv = ("conv", dict(batch=b, in_channels=c, out_channels=c, kernel=(3, 3),
                         in_spatial=(hw, hw), out_spatial=(hw, hw)))
    img = ("elementwise", dict(elements=b * c * hw * hw))
    bn = ("norm", dict(elements=b * c * hw * hw, channels=c))

    class Attn(nn.Module):
        def __init__(self, rope=False, causal=False):
            super().__init__()
            self.norm, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.rope, self.causal = rope, causal

        def forward(self, x):
            q, k, v = self.qkv(self.norm(x)).view(b, s, 3, 4, d // 4).permute(2, 0, 3, 1, 4)
            if self.rope:
                q, k = _rope(q), _rope(k)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
            return x + self.proj(y.transpose(1, 2).reshape(b, s, d))

    def _rope(x):  # GPT-NeoX rotate-half with fixed angles
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin
    cos = torch.cos(torch.arange(s * d // 4, device=device).view(s, d // 4) * 0.01)
    sin = torch.sin(torch.arange(s * d // 4, device=device).view(s, d // 4) * 0.01)

    class Seq(nn.Sequential):
        def forward(self, x):
            return x + super().forward(x) if self.residual else super().forward(x)

    def seq(*mods, residual=False):
        m = Seq(*mods)
        m.residual = residual
        return m

    class SwiGLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w3, self.w2 = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

        def forward(self, x):
            return x + self.w2(F.silu(self.w1(x)) * self.w3(x))

    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(64, d)
            self.idx = torch.randint(0, 64, (b, s), device=device)

        def forward(self, x):
            return x + self.emb(self.idx)

    class LSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(d, d, batch_first=True)

        def forward(self, x):
            return self.lstm(x)[0]
    attn = [norm, lin(d, 3 * d), ("attention", dict(batch=b, heads=4, q_len=s, kv_len=s,
                                                   head_dim=d // 4)), lin(d, d), elem]
    tokens, image = (b, s, d), (b, c, hw, hw)
    return {
        "mlp": (lambda: seq(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d), residual=True),
                tokens, [("linear", lin(d, 2 * d)[1]), elem, lin(2 * d, d), elem]),
        "attention": (lambda: Attn(), tokens, attn),
        "attention_rope": (lambda: Attn(rope=True, causal=True), tokens, attn + [elem]),
        "swiglu": (SwiGLU, tokens, [lin(d, 2 * d), lin(d, 2 * d), elem, lin(2 * d, d), elem]),
        "linear_dropout": (lambda: seq(nn.Linear(d, d), nn.ReLU(), nn.Dropout(0.1)), tokens,
                           [lin(d, d), elem, ("dropout", dict(elements=t * d))]),
        "norm_linear": (lambda: seq(nn.RMSNorm(d), nn.Linear(d, d), residual=True), tokens,
                        [norm, lin(d, d), elem]),
        "embed": (Embed, tokens, [("embedding", dict(tokens=t, num_embeddings=64, dim=d)), elem]),
        "lstm": (LSTM, tokens, [("lstm", dict(batch=b, seq=s, input_size=d, hidden=d))]),
        "conv_bn_relu": (lambda: seq(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()),
                         image, [conv, bn, img]),
        "conv_relu_pool": (lambda: seq(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                                       nn.MaxPool2d(3, 1, 1)), image,
                           [conv, img, ("pool", dict(batch=b, channels=c, kernel=(3, 3),
                                                     in_spatial=(hw, hw), out_spatial=(hw, hw)))]),
        "residual_conv": (lambda: seq(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                      nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c),
                                      residual=True), image, [conv, bn, img, conv, bn, img]),
    }


def measure_blocks(settings: Settings, sync: Callable[[], None] = lambda: None) -> dict:
    """Forward and backward seconds of one reference block (slope of chains of 1 and 3) and
    its ops: name -> {fwd_s, bwd_s, ops: [[kind, shape]]}."""
    import torch
    torch.manual_seed(0)
    out = {}
    for name, (factory, shape, ops) in _blocks(settings.device).items():
        sync()
        f, b = chain_times(_module_chain(factory, shape, settings.device), settings, (1, 3))
        out[name] = {"fwd_s": f, "bwd_s": b, "ops": [[k, sh] for k, sh in ops]}
    return out


def fit_dispatch(blocks: dict, kernel_s: Callable[[str, dict, bool], float]) -> dict:
    """Per op kind (forward, backward) dispatch seconds that best explain the reference blocks:
    block seconds - its ops' kernel seconds (`kernel_s(kind, shape, backward)`) = sum of its
    ops' dispatch, solved by least squares on relative errors with every figure >= 0."""
    kinds = sorted({k for v in blocks.values() for k, _ in v["ops"]})
    out = {}
    for backward, key in ((False, "fwd_s"), (True, "bwd_s")):
        a = np.array([[sum(k == kind for k, _ in v["ops"]) for kind in kinds]
                      for v in blocks.values()], dtype=float)
        y = np.array([v[key] - sum(kernel_s(k, sh, backward) for k, sh in v["ops"])
                      for v in blocks.values()])
        w = 1.0 / np.maximum(np.abs([v[key] for v in blocks.values()]), 1e-9)
        coef = nnls(a * w[:, None], y * w)  # relative errors
        out[key] = {kind: float(v) for kind, v in zip(kinds, coef)}
    return out
