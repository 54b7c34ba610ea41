"""ResNets: analytic graph == torchvision-layout module, published parameter counts."""
import pytest

from modelcheck import check_model, train_step
from workbench import costmodel

# torchvision.models "num_params" (docs, weights tables: ResNet*_Weights.IMAGENET1K_V1).
PUBLISHED = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
             "resnet101": 44_549_160, "resnet152": 60_192_808}


@pytest.mark.parametrize("name", ["resnet-tiny", *PUBLISHED])
def test_analytic_graph_matches_module(name):
    check_model(name, batch=2)


@pytest.mark.parametrize("name, params", PUBLISHED.items())
def test_published_parameter_counts(name, params):
    assert costmodel.graph(name).params == params


def test_resnet50_forward_flops_match_published_gmacs():
    # torchvision lists 4.09 GFLOPS (multiply-adds) per 224x224 image for ResNet-50;
    # 2 FLOPs per multiply-add: 8.18 GFLOP for the convolutions and the classifier.
    flops = costmodel.graph("resnet50").counted_fwd_flops
    assert round(flops / 2 / 1e9, 2) == 4.09


def test_units_are_residual_blocks():
    g = costmodel.graph("resnet50")
    assert g.units == 16  # 3 + 4 + 6 + 3 bottleneck blocks
    groups = g.unit_layers()
    assert [l.name for l in groups[0] if l.kind == "conv"] == [
        "layer1.0.downsample.0", "layer1.0.conv1", "layer1.0.conv2", "layer1.0.conv3"]


def test_tiny_trains_a_step():
    train_step("resnet-tiny")
