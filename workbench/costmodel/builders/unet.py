"""Analytic graph of `workbench.models.unet.UNet` (Ronneberger et al. 2015, Figure 1).

Pipeline units: each 3x3 convolution with its ReLU is one unit. A level's max pool goes with
the unit of the convolution before it; an up-convolution and the crop-and-concat go with the
unit of the convolution after them. U-Net (depth 4) has 2 x (4 + 1 + 4) = 18 units; the 1x1
head and the pixel-wise loss come after them. The skips cross units: a pipeline must carry
each contracting map to the stage of its expansive level.
"""
from __future__ import annotations

from dataclasses import replace

from ...models.unet import UNetConfig
from ..graph import POST_UNIT, GraphBuilder, LayerGraph, carried_across
from . import graph_builder
from .common import FeatureMap


def _double_conv(b: GraphBuilder, x: FeatureMap, name: str, width: int, unit: int) -> FeatureMap:
    """conv1 + relu1 in `unit`, conv2 + relu2 in `unit + 1`."""
    x = x.conv(b, f"{name}.conv1", width, 3, unit=unit).act(b, f"{name}.relu1", unit=unit)
    return x.conv(b, f"{name}.conv2", width, 3, unit=unit + 1).act(b, f"{name}.relu2",
                                                                    unit=unit + 1)


@graph_builder(UNetConfig)
def unet_graph(cfg: UNetConfig, batch: int, dtype_bytes: int) -> LayerGraph:
    """Contracting path, bottom, expansive path with crop-and-concat, 1x1 head, loss."""
    b = GraphBuilder(dtype_bytes)
    x = FeatureMap(batch, cfg.in_channels, (cfg.image_size, cfg.image_size), requires_grad=False)
    widths = [cfg.base_width * 2 ** i for i in range(cfg.depth + 1)]
    skips, made, read, unit = [], [], [], 0
    for i in range(cfg.depth):
        x = _double_conv(b, x, f"encoder.{i}", widths[i], unit)
        skips.append(x)
        made.append(unit + 1)
        x = x.pool(b, f"pools.{i}", 2, 2, unit=unit + 1)
        unit += 2
    x = _double_conv(b, x, f"encoder.{cfg.depth}", widths[-1], unit)
    unit += 2
    for i, skip in enumerate(reversed(skips)):
        w = widths[cfg.depth - 1 - i]
        read.append(unit)
        x = x.conv_transpose(b, f"upconvs.{i}", w, 2, 2, unit=unit)
        x = replace(x, channels=skip.channels + w)
        b.add(f"concat{i}", "elementwise", elements=x.elements, flops_per_element=0, inputs=2,
              saves_input=False, unit=unit)                      # crop is a view; cat copies
        x = _double_conv(b, x, f"decoder.{i}", w, unit)
        unit += 2
    x = x.conv(b, "head", cfg.num_classes, 1, unit=POST_UNIT)
    b.add("loss", "elementwise", elements=x.elements, flops_per_element=4, unit=POST_UNIT)
    carried = carried_across(unit, [(skip.elements * dtype_bytes, m, r) for skip, m, r
                                    in zip(reversed(skips), reversed(made), read)])
    return LayerGraph(model="", family="unet", layers=b.layers, batch=batch, units=unit,
                      dtype_bytes=dtype_bytes, config=cfg.__dict__.copy(), carried=carried)
