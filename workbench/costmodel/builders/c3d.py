"""Analytic graph of `workbench.models.c3d.C3D`: one unit per 3x3x3 convolution."""
from __future__ import annotations

from dataclasses import asdict

from ...models.c3d import C3DConfig, conv_names, fc_names
from ..graph import POST_UNIT, GraphBuilder, LayerGraph
from . import graph_builder
from .common import FeatureMap


@graph_builder(C3DConfig)
def c3d_graph(cfg: C3DConfig, batch: int, dtype_bytes: int) -> LayerGraph:
    """Conv layer i (with its ReLU and the pool closing its stage) is unit i; fc6..fc8 last."""
    b = GraphBuilder(dtype_bytes)
    fm = FeatureMap(batch, 3, (cfg.frames, cfg.image_size, cfg.image_size), requires_grad=False)
    unit = 0
    for s, (names, width, (kernel, pad)) in enumerate(
            zip(conv_names(cfg), cfg.widths, cfg.pool_shapes())):
        for name in names:
            fm = fm.conv(b, name, width, 3, 1, 1, bias=True, unit=unit)
            fm = fm.act(b, f"{name}.relu", unit)
            unit += 1
        fm = fm.pool(b, f"pool{s + 1}", kernel, kernel, pad, unit=unit - 1)
    features = fm.channels * fm.spatial[0] * fm.spatial[1] * fm.spatial[2]
    hidden, out, head = fc_names(cfg)
    width = features
    for name in (hidden, out):
        b.add(name, "linear", tokens=batch, in_features=width, out_features=cfg.fc,
              unit=POST_UNIT)
        b.add(f"{name}.relu", "elementwise", elements=batch * cfg.fc, unit=POST_UNIT)
        b.add(f"{name}.dropout", "elementwise", elements=batch * cfg.fc, unit=POST_UNIT)
        width = cfg.fc
    b.add(head, "linear", tokens=batch, in_features=cfg.fc, out_features=cfg.num_classes,
          unit=POST_UNIT)
    b.add("loss", "elementwise", elements=batch * cfg.num_classes, flops_per_element=4,
          unit=POST_UNIT)
    return LayerGraph(model="", family="c3d", layers=b.layers, batch=batch,
                      units=sum(cfg.convs), dtype_bytes=dtype_bytes, config=asdict(cfg))
