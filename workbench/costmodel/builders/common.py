"""Shape arithmetic shared by the convolutional builders.

`FeatureMap` follows a (batch, channels, *spatial) activation through convolutions, pooling
and upsampling the way PyTorch computes output sizes, appending one layer per op to a
`GraphBuilder`. Builders of CNN, detection, segmentation and video families use it so that
no family writes the output-size formula again.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from ..graph import PRE_UNIT, GraphBuilder


def _tuple(v: int | Sequence[int], dims: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims


def conv_out_size(size: int, kernel: int, stride: int = 1, padding: int = 0,
                  dilation: int = 1) -> int:
    """Output length of a convolution or pooling window (PyTorch's floor rule)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_transpose_out_size(size: int, kernel: int, stride: int = 1, padding: int = 0,
                            output_padding: int = 0, dilation: int = 1) -> int:
    """Output length of a transposed convolution (PyTorch's rule)."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


@dataclass(frozen=True)
class FeatureMap:
    """An activation (batch, channels, *spatial) and whether it needs a gradient."""

    batch: int
    """Samples."""
    channels: int
    """Channels."""
    spatial: tuple[int, ...]
    """Spatial (or temporal + spatial) sizes."""
    requires_grad: bool = True
    """False for the raw input images, so the first conv computes no input gradient."""

    @property
    def elements(self) -> int:
        """batch x channels x prod(spatial)."""
        n = self.batch * self.channels
        for s in self.spatial:
            n *= s
        return n

    def conv(self, b: GraphBuilder, name: str, out_channels: int, kernel, stride=1, padding=0,
             dilation=1, groups: int = 1, bias: bool = True, unit: int = PRE_UNIT) -> "FeatureMap":
        """Append an `nn.ConvNd(self.channels, out_channels, ...)`; return its output map."""
        d = len(self.spatial)
        k, s, p, dl = (_tuple(v, d) for v in (kernel, stride, padding, dilation))
        out = tuple(conv_out_size(*a) for a in zip(self.spatial, k, s, p, dl))
        b.add(name, "conv", batch=self.batch, in_channels=self.channels,
              out_channels=out_channels, kernel=k, in_spatial=self.spatial, out_spatial=out,
              groups=groups, bias=bias, input_grad=self.requires_grad, unit=unit)
        return FeatureMap(self.batch, out_channels, out)

    def conv_transpose(self, b: GraphBuilder, name: str, out_channels: int, kernel, stride=1,
                       padding=0, output_padding=0, bias: bool = True,
                       unit: int = PRE_UNIT) -> "FeatureMap":
        """Append an `nn.ConvTransposeNd`; return its output map."""
        d = len(self.spatial)
        k, s, p, op = (_tuple(v, d) for v in (kernel, stride, padding, output_padding))
        out = tuple(conv_transpose_out_size(*a) for a in zip(self.spatial, k, s, p, op))
        b.add(name, "conv", batch=self.batch, in_channels=self.channels,
              out_channels=out_channels, kernel=k, in_spatial=self.spatial, out_spatial=out,
              bias=bias, transposed=True, input_grad=self.requires_grad, unit=unit)
        return FeatureMap(self.batch, out_channels, out)

    def norm(self, b: GraphBuilder, name: str, unit: int = PRE_UNIT) -> "FeatureMap":
        """Append a BatchNorm/GroupNorm with weight and bias over the channels."""
        b.add(name, "norm", elements=self.elements, channels=self.channels, unit=unit)
        return self

    def act(self, b: GraphBuilder, name: str, unit: int = PRE_UNIT,
            flops_per_element: int = 1) -> "FeatureMap":
        """Append an elementwise activation (ReLU: 1 FLOP an element)."""
        b.add(name, "elementwise", elements=self.elements, flops_per_element=flops_per_element,
              unit=unit)
        return self

    def pool(self, b: GraphBuilder, name: str, kernel, stride=None, padding=0,
             unit: int = PRE_UNIT, ceil_mode: bool = False) -> "FeatureMap":
        """Append a max/avg pool with PyTorch's output-size rule; return its output map."""
        d = len(self.spatial)
        k = _tuple(kernel, d)
        s = _tuple(stride if stride is not None else kernel, d)
        p = _tuple(padding, d)
        if ceil_mode:
            out = tuple(-(-(n + 2 * pp - kk) // ss) + 1 for n, kk, ss, pp in zip(self.spatial, k, s, p))
            out = tuple(o - 1 if (o - 1) * ss >= n + pp else o
                        for o, n, ss, pp in zip(out, self.spatial, s, p))
        else:
            out = tuple(conv_out_size(n, kk, ss, pp) for n, kk, ss, pp in zip(self.spatial, k, s, p))
        b.add(name, "pool", batch=self.batch, channels=self.channels, kernel=k,
              in_spatial=self.spatial, out_spatial=out, unit=unit)
        return replace(self, spatial=out)

    def adaptive_pool(self, b: GraphBuilder, name: str, output: int | Sequence[int],
                      unit: int = PRE_UNIT) -> "FeatureMap":
        """Append an adaptive pool to `output` size (window = ceil(in / out), as the tracer)."""
        out = _tuple(output, len(self.spatial))
        k = tuple(-(-i // o) for i, o in zip(self.spatial, out))
        b.add(name, "pool", batch=self.batch, channels=self.channels, kernel=k,
              in_spatial=self.spatial, out_spatial=out, unit=unit)
        return replace(self, spatial=out)

    def add(self, b: GraphBuilder, name: str, unit: int = PRE_UNIT) -> "FeatureMap":
        """Append a residual (or skip) addition of two maps of this shape."""
        b.add(name, "elementwise", elements=self.elements, inputs=2, saves_input=False, unit=unit)
        return self
