"""Analytic graph of `workbench.models.vgg.VGG` (torchvision `vgg16` layout).

Pipeline units: each 3x3 convolution with its ReLU (and the stage's max pool after the
stage's last convolution) is one unit, then each hidden fully connected layer with its ReLU
and dropout is one unit (the average pool and flatten go with the first). VGG-16 has
13 + 2 = 15 units. Nothing comes before unit 0 (the first convolution is in it); the last
Linear and the loss come after the units.
"""
from __future__ import annotations

from ...models.vgg import VGGConfig
from ..graph import POST_UNIT, GraphBuilder, LayerGraph
from . import graph_builder
from .common import FeatureMap


def add_classifier_loss(b: GraphBuilder, batch: int, num_classes: int) -> None:
    """Softmax cross-entropy over (batch, num_classes) logits, about 4 FLOPs a logit."""
    b.add("loss", "elementwise", elements=batch * num_classes, flops_per_element=4,
          unit=POST_UNIT)


@graph_builder(VGGConfig)
def vgg_graph(cfg: VGGConfig, batch: int, dtype_bytes: int) -> LayerGraph:
    """features (conv 3x3 + ReLU, max pool per stage), avgpool, classifier, loss."""
    b = GraphBuilder(dtype_bytes)
    x = FeatureMap(batch, cfg.in_channels, (cfg.image_size, cfg.image_size), requires_grad=False)
    idx, unit = 0, 0
    for width, n in zip(cfg.widths, cfg.convs):
        for _ in range(n):
            x = x.conv(b, f"features.{idx}", width, 3, padding=1, unit=unit)
            x = x.act(b, f"features.{idx + 1}", unit=unit)
            idx += 2
            unit += 1
        x = x.pool(b, f"features.{idx}", 2, 2, unit=unit - 1)
        idx += 1
    x = x.adaptive_pool(b, "avgpool", cfg.pool_output, unit=unit)
    features = x.channels * cfg.pool_output ** 2
    for i, in_features in ((0, features), (3, cfg.fc_width)):
        b.add(f"classifier.{i}", "linear", tokens=batch, in_features=in_features,
              out_features=cfg.fc_width, unit=unit)
        b.add(f"classifier.{i + 1}", "elementwise", elements=batch * cfg.fc_width, unit=unit)
        b.add(f"classifier.{i + 2}", "elementwise", elements=batch * cfg.fc_width, unit=unit)
        unit += 1
    b.add("classifier.6", "linear", tokens=batch, in_features=cfg.fc_width,
          out_features=cfg.num_classes, unit=POST_UNIT)
    add_classifier_loss(b, batch, cfg.num_classes)
    return LayerGraph(model="", family="vgg", layers=b.layers, batch=batch, units=unit,
                      dtype_bytes=dtype_bytes, config=cfg.__dict__.copy())
