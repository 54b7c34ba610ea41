"""Analytic graph of `workbench.models.resnet.ResNet`, and its backbone for other families."""
from __future__ import annotations

from dataclasses import asdict

from ...models.resnet import ResNetConfig, block_plan
from ..graph import POST_UNIT, GraphBuilder, LayerGraph
from . import graph_builder
from .common import FeatureMap


def add_resnet_features(b: GraphBuilder, cfg: ResNetConfig, fm: FeatureMap, prefix: str = "",
                        first_unit: int = 0) -> FeatureMap:
    """Stem and residual blocks (`ResNet.features`); block i is unit `first_unit + i`.

    The stem is `PRE_UNIT`. Returns the last stage's feature map.
    """
    p = prefix
    fm = fm.conv(b, f"{p}conv1", cfg.width, 7, 2, 3, bias=False)
    fm = fm.norm(b, f"{p}bn1").act(b, f"{p}relu")
    fm = fm.pool(b, f"{p}maxpool", 3, 2, 1)
    for i, (path, cin, width, stride) in enumerate(block_plan(cfg)):
        u, q = first_unit + i, f"{p}{path}"
        out_channels = width * cfg.expansion
        if stride != 1 or cin != out_channels:  # the shortcut runs first, as in the module
            fm.conv(b, f"{q}.downsample.0", out_channels, 1, stride, bias=False, unit=u) \
              .norm(b, f"{q}.downsample.1", u)
        if cfg.block == "bottleneck":
            fm = fm.conv(b, f"{q}.conv1", width, 1, bias=False, unit=u)
            fm = fm.norm(b, f"{q}.bn1", u).act(b, f"{q}.relu1", u)
            fm = fm.conv(b, f"{q}.conv2", width, 3, stride, 1, bias=False, unit=u)
            fm = fm.norm(b, f"{q}.bn2", u).act(b, f"{q}.relu2", u)
            fm = fm.conv(b, f"{q}.conv3", width * 4, 1, bias=False, unit=u)
            fm = fm.norm(b, f"{q}.bn3", u)
        else:
            fm = fm.conv(b, f"{q}.conv1", width, 3, stride, 1, bias=False, unit=u)
            fm = fm.norm(b, f"{q}.bn1", u).act(b, f"{q}.relu1", u)
            fm = fm.conv(b, f"{q}.conv2", width, 3, 1, 1, bias=False, unit=u)
            fm = fm.norm(b, f"{q}.bn2", u)
        fm = fm.add(b, f"{q}.residual", u).act(b, f"{q}.relu3", u)
    return fm


@graph_builder(ResNetConfig)
def resnet_graph(cfg: ResNetConfig, batch: int, dtype_bytes: int) -> LayerGraph:
    """Stem (first stage), one unit per residual block, pool + classifier (last stage)."""
    b = GraphBuilder(dtype_bytes)
    image = FeatureMap(batch, 3, (cfg.image_size, cfg.image_size), requires_grad=False)
    fm = add_resnet_features(b, cfg, image)
    fm = fm.adaptive_pool(b, "avgpool", 1, unit=POST_UNIT)
    b.add("fc", "linear", tokens=batch, in_features=fm.channels, out_features=cfg.num_classes,
          unit=POST_UNIT)
    b.add("loss", "elementwise", elements=batch * cfg.num_classes, flops_per_element=4,
          unit=POST_UNIT)
    return LayerGraph(model="", family="resnet", layers=b.layers, batch=batch,
                      units=sum(cfg.stages), dtype_bytes=dtype_bytes,
                      config=asdict(cfg))
