"""Video 3D CNNs (C3D, R(2+1)D, I3D): analytic graph == module, published parameter counts,
and I3D inflation that reproduces the 2D network on a static clip."""
import pytest
import torch

from modelcheck import check_model, train_step
from workbench import costmodel, models
from workbench.models.i3d import inflate, nonlocal_net_inflation
from workbench.models.r2plus1d import midplanes
from workbench.models.resnet import ResNetConfig

FLAVOURS = ["c3d-tiny", "c3d", "r2plus1d-tiny", "r2plus1d-18", "i3d-tiny", "i3d-r50"]


@pytest.mark.parametrize("name", FLAVOURS)
def test_analytic_graph_matches_module(name):
    check_model(name, batch=2)


def test_c3d_parameter_count():
    # Tran et al. 2015 Fig. 3 / DavideA/c3d-pytorch: 8 conv3d 3x3x3 with bias, fc6..fc8.
    convs = [(3, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512),
             (512, 512)]
    conv_params = sum(cin * cout * 27 + cout for cin, cout in convs)
    assert conv_params == 27_655_936  # 5,248 + 221,312 + 884,992 + 1,769,728 + 3,539,456
    #                                   + 3 x 7,078,400
    fc_params = (8192 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 487 + 487)
    assert fc_params == 52_335_079  # 33,558,528 + 16,781,312 + 1,995,239
    assert costmodel.graph("c3d").params == 79_991_015 == conv_params + fc_params


def test_c3d_pool5_leaves_512x1x4x4():
    cfg = models.get("c3d")
    assert cfg.feature_shape() == (1, 4, 4)  # T 16->16->8->4->2->1, H 112->56->28->14->7->4
    assert cfg.flat_features == 8192  # 512 x 1 x 4 x 4
    names = [l.name for l in costmodel.graph("c3d").layers if l.counted]
    assert names == ["conv1", "conv2", "conv3a", "conv3b", "conv4a", "conv4b", "conv5a",
                     "conv5b", "fc6", "fc7", "fc8"]


def test_r2plus1d_18_published_parameter_count():
    # torchvision.models.video.R2Plus1D_18_Weights.KINETICS400_V1 meta "num_params".
    assert costmodel.graph("r2plus1d-18").params == 31_505_325


def test_r2plus1d_midplanes_rule():
    assert midplanes(64, 64) == 144     # 110,592 // (576 + 192) = 144
    assert midplanes(64, 128) == 230    # 221,184 // (576 + 384) = 230.4
    assert midplanes(512, 512) == 1152  # 7,077,888 // (4,608 + 1,536) = 1,152


def test_r2plus1d_18_forward_flops_match_torchvision_gflops():
    # torchvision lists 40.52 GFLOPS (multiply-adds) per 16x112x112 clip for r2plus1d_18;
    # 2 FLOPs per multiply-add.
    assert round(costmodel.graph("r2plus1d-18").counted_fwd_flops / 2 / 1e9, 2) == 40.52


def test_i3d_r50_parameter_count():
    # mmaction2 configs/recognition/i3d/metafile.yml, i3d_r50 (400 classes): 28,043,472.
    # ResNet-50 without fc 23,508,032 (25,557,032 - 2,049,000) + fc 2048 x 400 + 400 = 819,600
    # + conv1 5x7x7: 4 x 9,408 = 37,632 + 3x1x1 conv1 of 9 blocks, 2 x (in x width) each:
    # 2 x (4,096 + 2 x 16,384 + 32,768 + 65,536 + 131,072 + 2 x 262,144 + 1,048,576)
    # = 3,678,208; total 23,508,032 + 819,600 + 37,632 + 3,678,208.
    assert costmodel.graph("i3d-r50").params == 28_043_472


def test_i3d_r50_follows_the_official_inflation_and_table1_time_sizes():
    cfg = models.get("i3d-r50")
    assert cfg.base == models.get("resnet50")
    assert models.get("i3d-tiny").base == models.get("resnet-tiny")
    assert cfg.block_inflation == (1, 1, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 1, 0)
    assert cfg.temporal_sizes() == (16, 8, 4)  # Table 1: conv1 16, pool1 8, pool2 4
    assert nonlocal_net_inflation((3, 4, 23, 3))[7:30] == (1, 0) * 11 + (1,)  # R101 res4
    g = costmodel.graph("i3d-r50")
    assert g.units == 16
    kernels = {l.name: l.shape["kernel"] for l in g.layers if l.kind == "conv"}
    assert kernels["conv1"] == (5, 7, 7)
    assert kernels["layer1.0.conv1"] == (3, 1, 1) and kernels["layer2.1.conv1"] == (1, 1, 1)
    assert kernels["layer4.1.conv1"] == (3, 1, 1) and kernels["layer4.0.conv1"] == (1, 1, 1)
    assert [l.unit for l in g.layers if l.name == "pool2"] == [2]  # last block of res2


def _random_batchnorm(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial affine parameters and running statistics for every BatchNorm."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


@pytest.mark.parametrize("base", [
    models.get("resnet-tiny", image_size=32),
    ResNetConfig(block="basic", stages=(1, 2, 1, 1), width=8, num_classes=7, image_size=32),
])
def test_inflated_network_reproduces_2d_logits_on_a_static_clip(base):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    resnet2d = models.build(base)
    _random_batchnorm(resnet2d, gen)
    resnet2d.eval()
    i3d = inflate(resnet2d, frames=8)
    assert not i3d.training and i3d.cfg.base == base
    image = torch.randn(2, 3, 32, 32, generator=gen)
    clip = image.unsqueeze(2).expand(2, 3, 8, 32, 32)  # the same frame 8 times
    with torch.no_grad():
        expected, got = resnet2d(image), i3d(clip)
        moving = i3d(torch.randn(2, 3, 8, 32, 32, generator=gen))
    assert got.shape == expected.shape == (2, base.num_classes)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(moving, expected, atol=1e-3)  # a moving clip is not a frame


def test_inflate_repeats_kernels_over_time_divided_by_their_length():
    resnet2d = models.build(models.get("resnet-tiny"))
    i3d = inflate(resnet2d, frames=8, num_classes=5)
    w2d, w3d = resnet2d.conv1.weight, i3d.conv1.weight
    assert w3d.shape == (8, 3, 5, 7, 7)
    for t in range(5):
        torch.testing.assert_close(w3d[:, :, t], w2d / 5)
    torch.testing.assert_close(i3d.layer1[0].conv1.weight.sum(2), resnet2d.layer1[0].conv1.weight)
    assert i3d.fc.out_features == 5  # a new head for new classes, trunk inflated
    with pytest.raises(ValueError, match="base"):
        inflate(resnet2d, base=models.get("resnet50"))


@pytest.mark.parametrize("name, overrides, message", [
    ("c3d", {"frames": 8}, "frames"),
    ("c3d", {"convs": (1, 1, 2, 2)}, "convs"),
    ("r2plus1d-18", {"stem_mid": 0}, "stem_mid"),
    ("i3d-r50", {"inflated": (1, 0)}, "inflated"),
    ("i3d-r50", {"conv1_t": 4}, "conv1_t"),
    ("i3d-r50", {"block_t": 0}, "block_t"),
])
def test_bad_configs_are_rejected(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        models.get(name, **overrides)


@pytest.mark.parametrize("name", ["c3d-tiny", "r2plus1d-tiny", "i3d-tiny"])
def test_tiny_trains_a_step(name):
    train_step(name)
