"""VGG-16, AlexNet, FCN-8s, U-Net and YOLO v1: analytic graph == module, published sizes."""
from __future__ import annotations

import pytest
import torch

from modelcheck import check_model, train_step
from workbench import costmodel, models

FLAVOURS = ["vgg16", "vgg-tiny", "alexnet", "alexnet-tiny", "fcn8s", "fcn-tiny", "unet",
            "unet-tiny", "yolov1", "yolo-tiny"]


@pytest.mark.parametrize("name", FLAVOURS)
def test_analytic_graph_matches_module(name):
    check_model(name)


@pytest.mark.parametrize("name, params", [
    ("vgg16", 138_357_544),     # torchvision VGG16_Weights.IMAGENET1K_V1 num_params
    ("alexnet", 61_100_840),    # torchvision AlexNet_Weights.IMAGENET1K_V1 num_params
    # 14,714,688 (VGG-16 convs) + 102,764,544 (fc6) + 16,781,312 (fc7) + 102,207 (3 score
    # layers, 21 classes) + 127,008 (3 transposed convs): derivation in workbench/models/fcn.py
    ("fcn8s", 134_489_759),
    # 18,842,048 (contracting) + 12,188,480 (expansive) + 130 (1x1 head): workbench/models/unet.py
    ("unet", 31_030_658),
    # 60,155,968 (24 convs) + 205,524,992 (fc1) + 6,022,590 (fc2): workbench/models/yolo.py
    ("yolov1", 271_703_550),
])
def test_published_parameter_count(name, params):
    assert costmodel.graph(name).params == params
    module = models.build(models.get(name), device="meta")
    assert sum(p.numel() for p in module.parameters()) == params


@pytest.mark.parametrize("name, gmacs", [("vgg16", 15.47), ("alexnet", 0.71)])
def test_forward_flops_match_torchvision_docs(name, gmacs):
    # torchvision's model table lists "GFLOPS" that are multiply-adds (fvcore convention);
    # here a multiply-add is 2 FLOPs.
    assert round(costmodel.graph(name).counted_fwd_flops / 2 / 1e9, 2) == gmacs


@pytest.mark.parametrize("family", ["vgg", "alexnet", "fcn", "unet", "yolo"])
def test_tiny_train_step(family):
    loss = train_step(f"{family}-tiny")
    assert torch.isfinite(torch.tensor(loss))


@pytest.mark.parametrize("name, units", [
    ("vgg16", 13 + 2),        # 13 convs, fc6, fc7
    ("alexnet", 5 + 2),       # 5 convs, fc6, fc7
    ("fcn8s", 13 + 2),        # 13 backbone convs, fc6, fc7 (as convolutions)
    ("unet", 2 * (4 + 1 + 4)),  # two 3x3 convs per level: 4 down, bottom, 4 up
    ("yolov1", 24 + 1),       # 24 convs, fc1
])
def test_pipeline_units(name, units):
    g = costmodel.graph(name)
    assert g.units == units
    groups = g.unit_layers()
    inner = [u for u in groups if 0 <= u < units]
    assert inner == list(range(units))
    assert all(any(l.counted for l in groups[u]) for u in inner)
    # The images need no gradient: only the first conv's weight gradient is counted.
    first = next(l for l in g.layers if l.counted)
    assert first.unit == 0 and first.bwd_flops == first.fwd_flops


def _output_shape(name, batch=2):
    cfg = models.get(name)
    module = models.build(cfg, device="meta")
    return tuple(module(*models.example_inputs(cfg, batch, "meta")).shape)


def test_unet_572_to_388():
    # Ronneberger et al. 2015, Figure 1: 572x572 tile -> 388x388 map, 2 classes.
    assert _output_shape("unet") == (2, 2, 388, 388)
    # 572-4 = 568 -> 284-4 = 280 -> 140-4 = 136 -> 68-4 = 64 -> 32-4 = 28 (bottom);
    # up: 56-4 = 52, 104-4 = 100, 200-4 = 196, 392-4 = 388
    assert models.get("unet").sizes() == ([568, 280, 136, 64], [52, 100, 196, 388])


def test_fcn_output_is_input_size_and_fc6_flops():
    assert _output_shape("fcn8s") == (2, 21, 500, 500)
    sizes = models.get("fcn8s").sizes()
    # conv1_1 pad 100: 500+200-2 = 698; ceil-mode pools: 349, 175, 88, 44, 22; fc6 7x7: 16;
    # upscore2 (16-1)*2+4 = 34; upscore_pool4 (34-1)*2+4 = 70; upscore8 (70-1)*8+16 = 568
    assert [sizes[k] for k in ("pool1", "pool2", "pool3", "pool4", "pool5", "score_fr",
                               "upscore2", "upscore_pool4", "upscore8")] == [
        349, 175, 88, 44, 22, 16, 34, 70, 568]
    fc6 = next(l for l in costmodel.graph("fcn8s").layers if l.name == "fc6")
    assert fc6.fwd_flops == 2 * 16 * 16 * 512 * 7 * 7 * 4096   # 26,306,674,688
    up8 = next(l for l in costmodel.graph("fcn8s").layers if l.name == "upscore8")
    # transposed conv: every input pixel (70x70) scattered through a 21x21x16x16 kernel
    assert up8.fwd_flops == 2 * 70 * 70 * 21 * 21 * 16 * 16 and up8.params == 21 * 21 * 16 * 16


def test_yolo_output_grid_and_fc1_flops():
    assert _output_shape("yolov1") == (2, 7, 7, 2 * 5 + 20)   # S x S x (B*5 + C)
    fc1 = next(l for l in costmodel.graph("yolov1").layers if l.name == "fc1")
    assert fc1.fwd_flops == 2 * (7 * 7 * 1024) * 4096          # 411,041,792
    convs = [l for l in costmodel.graph("yolov1").layers if l.kind == "conv"]
    assert len(convs) == 24


@pytest.mark.parametrize("name, overrides, field", [
    ("vgg16", {"convs": (2, 2, 3)}, "convs"),
    ("alexnet", {"image_size": 62}, "image_size"),
    ("fcn8s", {"widths": (64, 128, 256, 512)}, "widths"),
    ("unet", {"image_size": 570}, "image_size"),      # 566 -> 283: odd max-pool input
    # 152, 72, 32, 12 are even, but the bottom is 12/2-4 = 2 and the first up level 2*2-4 = 0
    ("unet", {"image_size": 156}, "image_size 156 is too small"),
    ("yolov1", {"image_size": 450}, "image_size"),
    ("yolov1", {"width_divisor": 5}, "width_divisor"),
])
def test_bad_config_names_the_field(name, overrides, field):
    with pytest.raises(ValueError, match=field):
        models.get(name, **overrides)
