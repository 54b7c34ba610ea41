"""Analytic graph of `workbench.models.i3d.I3D`: one unit per residual block."""
from __future__ import annotations

from dataclasses import asdict, replace

from ...models.i3d import I3DConfig
from ...models.resnet import block_plan
from ..graph import POST_UNIT, PRE_UNIT, GraphBuilder, LayerGraph
from . import graph_builder
from .common import FeatureMap


def _temporal_conv(b: GraphBuilder, fm: FeatureMap, name: str, out_channels: int, kt: int,
                   k: int, stride=1, unit: int = PRE_UNIT) -> FeatureMap:
    """`temporal_conv`: replicate-pad time by (kt - 1) // 2 (a copy), then a kt x k x k conv
    with spatial padding (k - 1) // 2 only."""
    pad = (kt - 1) // 2
    if pad:
        t, h, w = fm.spatial
        fm = replace(fm, spatial=(t + 2 * pad, h, w))
        b.add(f"{name}.pad", "elementwise", elements=fm.elements, flops_per_element=0,
              saves_input=False, unit=unit)
    return fm.conv(b, name, out_channels, (kt, k, k), stride, (0, (k - 1) // 2, (k - 1) // 2),
                   bias=False, unit=unit)


@graph_builder(I3DConfig)
def i3d_graph(cfg: I3DConfig, batch: int, dtype_bytes: int) -> LayerGraph:
    """Stem (first stage), one unit per residual block, pool + classifier (last stage)."""
    base = cfg.base
    b = GraphBuilder(dtype_bytes)
    fm = FeatureMap(batch, 3, (cfg.frames, cfg.image_size, cfg.image_size), requires_grad=False)
    fm = _temporal_conv(b, fm, "conv1", base.width, cfg.conv1_t, 7, (cfg.conv1_stride_t, 2, 2))
    fm = fm.norm(b, "bn1").act(b, "relu")
    fm = fm.pool(b, "maxpool", (cfg.pool1_t, 3, 3), (cfg.pool1_stride_t, 2, 2),
                 ((cfg.pool1_t - 1) // 2, 1, 1))
    plan = block_plan(base)
    for u, ((q, cin, width, stride), flag) in enumerate(zip(plan, cfg.block_inflation)):
        kt = cfg.block_t if flag else 1
        out_channels = width * base.expansion
        if stride != 1 or cin != out_channels:  # the shortcut runs first, as in the module
            fm.conv(b, f"{q}.downsample.0", out_channels, 1, (1, stride, stride), bias=False,
                    unit=u).norm(b, f"{q}.downsample.1", u)
        if base.block == "bottleneck":
            out = _temporal_conv(b, fm, f"{q}.conv1", width, kt, 1, 1, u)
            out = out.norm(b, f"{q}.bn1", u).act(b, f"{q}.relu1", u)
            out = out.conv(b, f"{q}.conv2", width, (1, 3, 3), (1, stride, stride), (0, 1, 1),
                           bias=False, unit=u)
            out = out.norm(b, f"{q}.bn2", u).act(b, f"{q}.relu2", u)
            out = out.conv(b, f"{q}.conv3", out_channels, 1, bias=False, unit=u)
            out = out.norm(b, f"{q}.bn3", u)
        else:
            out = _temporal_conv(b, fm, f"{q}.conv1", width, kt, 3, (1, stride, stride), u)
            out = out.norm(b, f"{q}.bn1", u).act(b, f"{q}.relu1", u)
            out = out.conv(b, f"{q}.conv2", width, (1, 3, 3), 1, (0, 1, 1), bias=False, unit=u)
            out = out.norm(b, f"{q}.bn2", u)
        fm = out.add(b, f"{q}.residual", u).act(b, f"{q}.relu3", u)
        if u == base.stages[0] - 1:
            fm = fm.pool(b, "pool2", (cfg.pool2_t, 1, 1), (cfg.pool2_stride_t, 1, 1),
                         ((cfg.pool2_t - 1) // 2, 0, 0), unit=u)
    fm = fm.adaptive_pool(b, "avgpool", 1, unit=POST_UNIT)
    b.add("dropout", "elementwise", elements=fm.elements, unit=POST_UNIT)
    b.add("fc", "linear", tokens=batch, in_features=fm.channels, out_features=cfg.num_classes,
          unit=POST_UNIT)
    b.add("loss", "elementwise", elements=batch * cfg.num_classes, flops_per_element=4,
          unit=POST_UNIT)
    return LayerGraph(model="", family="i3d", layers=b.layers, batch=batch,
                      units=sum(base.stages), dtype_bytes=dtype_bytes, config=asdict(cfg))
