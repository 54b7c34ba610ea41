"""Analytic graph of `workbench.models.fcn.FCN8s` (wkentaro/pytorch-fcn `FCN8s` layout).

Pipeline units: each backbone 3x3 convolution with its ReLU (and the stage's max pool after
the stage's last convolution) is one unit, then fc6 and fc7 (each with ReLU and Dropout2d)
are one unit each: 13 + 2 = 15 units for FCN-8s. The three-stream head (score_fr, upscore2,
score_pool4, upscore_pool4, score_pool3, upscore8, the crops and the pixel-wise loss) comes
after the units: it runs last, and reads the pool3 and pool4 maps of earlier units (a
pipeline must carry those skip maps to the last stage).
"""
from __future__ import annotations

from dataclasses import replace

from ...models.fcn import FIRST_PADDING, FCNConfig
from ..graph import POST_UNIT, GraphBuilder, LayerGraph, carried_across
from . import graph_builder
from .common import FeatureMap


@graph_builder(FCNConfig)
def fcn_graph(cfg: FCNConfig, batch: int, dtype_bytes: int) -> LayerGraph:
    """VGG-16 backbone (conv1_1 padded by 100), fc6/fc7 convs, FCN-8s head, crops, loss."""
    b = GraphBuilder(dtype_bytes)
    x = FeatureMap(batch, cfg.in_channels, (cfg.image_size, cfg.image_size), requires_grad=False)
    pools: dict[int, FeatureMap] = {}
    pool_units: dict[int, int] = {}
    unit = 0
    for stage, (width, n) in enumerate(zip(cfg.widths, cfg.convs), start=1):
        for j in range(1, n + 1):
            pad = FIRST_PADDING if (stage, j) == (1, 1) else 1
            x = x.conv(b, f"conv{stage}_{j}", width, 3, padding=pad, unit=unit)
            x = x.act(b, f"relu{stage}_{j}", unit=unit)
            unit += 1
        x = pools[stage] = x.pool(b, f"pool{stage}", 2, 2, unit=unit - 1, ceil_mode=True)
        pool_units[stage] = unit - 1
    x = x.conv(b, "fc6", cfg.fc_width, 7, unit=unit)
    x = x.act(b, "relu6", unit=unit)
    x = x.act(b, "drop6", unit=unit)
    unit += 1
    x = x.conv(b, "fc7", cfg.fc_width, 1, unit=unit)
    x = x.act(b, "relu7", unit=unit)
    x = x.act(b, "drop7", unit=unit)
    units = unit + 1
    k, post = cfg.num_classes, POST_UNIT
    x = x.conv(b, "score_fr", k, 1, unit=post)
    up2 = x.conv_transpose(b, "upscore2", k, 4, 2, bias=False, unit=post)
    s4 = pools[4].conv(b, "score_pool4", k, 1, unit=post)
    x = replace(s4, spatial=up2.spatial).add(b, "fuse_pool4", unit=post)   # crop is a view
    up4 = x.conv_transpose(b, "upscore_pool4", k, 4, 2, bias=False, unit=post)
    s3 = pools[3].conv(b, "score_pool3", k, 1, unit=post)
    x = replace(s3, spatial=up4.spatial).add(b, "fuse_pool3", unit=post)
    x = x.conv_transpose(b, "upscore8", k, 16, 8, bias=False, unit=post)
    x = replace(x, spatial=(cfg.image_size, cfg.image_size))
    b.add("crop", "elementwise", elements=x.elements, flops_per_element=0, saves_input=False,
          unit=post)                                                     # .contiguous() copy
    b.add("loss", "elementwise", elements=x.elements, flops_per_element=4, unit=post)
    carried = carried_across(units, [(pools[i].elements * dtype_bytes, pool_units[i], POST_UNIT)
                                     for i in (3, 4)])           # the head reads them
    return LayerGraph(model="", family="fcn", layers=b.layers, batch=batch, units=units,
                      dtype_bytes=dtype_bytes, config=cfg.__dict__.copy(), carried=carried)
