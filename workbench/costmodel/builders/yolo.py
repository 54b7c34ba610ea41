"""Analytic graph of `workbench.models.yolo.YOLOv1` (Redmon et al. 2016, Figure 3).

Pipeline units: each convolution with its leaky ReLU (and the max pool after it, where
Figure 3 has one) is one unit, then the first fully connected layer with its leaky ReLU and
dropout (the flatten goes with it) is one unit: 24 + 1 = 25 units. Nothing comes before unit
0; the second fully connected layer and the sum-squared detection loss come after the units.
"""
from __future__ import annotations

from ...models.yolo import CONV_SPECS, YOLOConfig
from ..graph import POST_UNIT, GraphBuilder, LayerGraph
from . import graph_builder
from .common import FeatureMap


@graph_builder(YOLOConfig)
def yolo_graph(cfg: YOLOConfig, batch: int, dtype_bytes: int) -> LayerGraph:
    """24 x (conv, leaky ReLU, [max pool]), fc1 + leaky ReLU + dropout, fc2, loss."""
    b = GraphBuilder(dtype_bytes)
    x = FeatureMap(batch, cfg.in_channels, (cfg.image_size, cfg.image_size), requires_grad=False)
    for i, (width, (kernel, _, stride, pool)) in enumerate(zip(cfg.widths(), CONV_SPECS)):
        p = f"features.{i}"
        x = x.conv(b, f"{p}.conv", width, kernel, stride, kernel // 2, unit=i)
        x = x.act(b, f"{p}.act", unit=i)
        if pool:
            x = x.pool(b, f"{p}.pool", 2, 2, unit=i)
    unit = len(CONV_SPECS)
    b.add("fc1", "linear", tokens=batch, in_features=x.elements // batch,
          out_features=cfg.fc_width, unit=unit)
    b.add("fc1_act", "elementwise", elements=batch * cfg.fc_width, unit=unit)
    b.add("dropout", "elementwise", elements=batch * cfg.fc_width, unit=unit)
    out = cfg.grid ** 2 * cfg.cell_outputs
    b.add("fc2", "linear", tokens=batch, in_features=cfg.fc_width, out_features=out,
          unit=POST_UNIT)
    # Sum-squared error over every prediction (section 2.2): difference, square, weight, sum.
    b.add("loss", "elementwise", elements=batch * out, flops_per_element=4, unit=POST_UNIT)
    return LayerGraph(model="", family="yolo", layers=b.layers, batch=batch, units=unit + 1,
                      dtype_bytes=dtype_bytes, config=cfg.__dict__.copy())
