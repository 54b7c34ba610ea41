"""Analytic graph of `workbench.models.r2plus1d.R2Plus1D`: one unit per residual block."""
from __future__ import annotations

from dataclasses import asdict

from ...models.r2plus1d import R2Plus1DConfig, midplanes
from ..graph import POST_UNIT, GraphBuilder, LayerGraph
from . import graph_builder
from .common import FeatureMap


def _conv2plus1d(b: GraphBuilder, fm: FeatureMap, name: str, out_channels: int, mid: int,
                 stride: int, unit: int) -> FeatureMap:
    """`Conv2Plus1D` at `name`: 1x3x3 spatial conv, BN, ReLU, 3x1x1 temporal conv."""
    fm = fm.conv(b, f"{name}.0", mid, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False,
                 unit=unit)
    fm = fm.norm(b, f"{name}.1", unit).act(b, f"{name}.2", unit)
    return fm.conv(b, f"{name}.3", out_channels, (3, 1, 1), (stride, 1, 1), (1, 0, 0),
                   bias=False, unit=unit)


@graph_builder(R2Plus1DConfig)
def r2plus1d_graph(cfg: R2Plus1DConfig, batch: int, dtype_bytes: int) -> LayerGraph:
    """Stem (first stage), one unit per residual block, pool + classifier (last stage)."""
    b = GraphBuilder(dtype_bytes)
    fm = FeatureMap(batch, 3, (cfg.frames, cfg.image_size, cfg.image_size), requires_grad=False)
    fm = fm.conv(b, "stem.0", cfg.stem_mid, (1, 7, 7), (1, 2, 2), (0, 3, 3), bias=False)
    fm = fm.norm(b, "stem.1").act(b, "stem.2")
    fm = fm.conv(b, "stem.3", cfg.width, (3, 1, 1), 1, (1, 0, 0), bias=False)
    fm = fm.norm(b, "stem.4").act(b, "stem.5")
    for u, (q, cin, planes, stride) in enumerate(cfg.resnet_plan()):
        mid = midplanes(cin, planes)
        out = _conv2plus1d(b, fm, f"{q}.conv1.0", planes, mid, stride, u)
        out = out.norm(b, f"{q}.conv1.1", u).act(b, f"{q}.conv1.2", u)
        out = _conv2plus1d(b, out, f"{q}.conv2.0", planes, mid, 1, u)
        out = out.norm(b, f"{q}.conv2.1", u)
        if stride != 1 or cin != planes:  # the shortcut runs after the branch, as in the module
            fm.conv(b, f"{q}.downsample.0", planes, 1, stride, bias=False, unit=u) \
              .norm(b, f"{q}.downsample.1", u)
        fm = out.add(b, f"{q}.residual", u).act(b, f"{q}.relu", u)
    fm = fm.adaptive_pool(b, "avgpool", 1, unit=POST_UNIT)
    b.add("fc", "linear", tokens=batch, in_features=fm.channels, out_features=cfg.num_classes,
          unit=POST_UNIT)
    b.add("loss", "elementwise", elements=batch * cfg.num_classes, flops_per_element=4,
          unit=POST_UNIT)
    return LayerGraph(model="", family="r2plus1d", layers=b.layers, batch=batch,
                      units=sum(cfg.stages), dtype_bytes=dtype_bytes, config=asdict(cfg))
