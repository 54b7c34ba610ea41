"""Analytic graph of `workbench.models.alexnet.AlexNet` (torchvision `alexnet` layout).

Pipeline units: each convolution with its ReLU (and the max pool after it, if any) is one
unit, then each hidden fully connected group (dropout, Linear, ReLU) is one unit (the
average pool and flatten go with the first). AlexNet has 5 + 2 = 7 units. Nothing comes
before unit 0; the last Linear and the loss come after the units.
"""
from __future__ import annotations

from ...models.alexnet import CONV_SPECS, POOL_KERNEL, POOL_STRIDE, AlexNetConfig
from ..graph import POST_UNIT, GraphBuilder, LayerGraph
from . import graph_builder
from .common import FeatureMap
from .vgg import add_classifier_loss


@graph_builder(AlexNetConfig)
def alexnet_graph(cfg: AlexNetConfig, batch: int, dtype_bytes: int) -> LayerGraph:
    """features (5 conv + ReLU, 3 max pools), avgpool, classifier, loss."""
    b = GraphBuilder(dtype_bytes)
    x = FeatureMap(batch, cfg.in_channels, (cfg.image_size, cfg.image_size), requires_grad=False)
    idx = 0
    for unit, (width, (kernel, stride, padding, pool)) in enumerate(zip(cfg.widths, CONV_SPECS)):
        x = x.conv(b, f"features.{idx}", width, kernel, stride, padding, unit=unit)
        x = x.act(b, f"features.{idx + 1}", unit=unit)
        idx += 2
        if pool:
            x = x.pool(b, f"features.{idx}", POOL_KERNEL, POOL_STRIDE, unit=unit)
            idx += 1
    unit = len(CONV_SPECS)
    x = x.adaptive_pool(b, "avgpool", cfg.pool_output, unit=unit)
    features = x.channels * cfg.pool_output ** 2
    for i, in_features in ((0, features), (3, cfg.fc_width)):
        b.add(f"classifier.{i}", "elementwise", elements=batch * in_features, unit=unit)
        b.add(f"classifier.{i + 1}", "linear", tokens=batch, in_features=in_features,
              out_features=cfg.fc_width, unit=unit)
        b.add(f"classifier.{i + 2}", "elementwise", elements=batch * cfg.fc_width, unit=unit)
        unit += 1
    b.add("classifier.6", "linear", tokens=batch, in_features=cfg.fc_width,
          out_features=cfg.num_classes, unit=POST_UNIT)
    add_classifier_loss(b, batch, cfg.num_classes)
    return LayerGraph(model="", family="alexnet", layers=b.layers, batch=batch, units=unit,
                      dtype_bytes=dtype_bytes, config=cfg.__dict__.copy())
