"""DETR and the Show-and-Tell captioner: analytic graph == module, published counts, details."""
import math

import pytest
import torch
from torch import nn

from modelcheck import check_model, train_step
from workbench import costmodel, models
from workbench.models.detr import (DetrAttention, DetrConfig, FrozenBatchNorm2d,
                                   sine_position_encoding)

# ResNet-50 without its classifier: torchvision num_params 25,557,032 - fc (2048 x 1000 + 1000)
# = 25,557,032 - 2,049,000 = 23,508,032; of which BatchNorm weight + bias = 2 x 26,560 channels
# = 53,120, so the conv weights alone are 23,454,912.
R50_FEATURES = 23_508_032
R50_CONVS = 23_454_912

# DETR-R50 (facebookresearch/detr, d=256, 8 heads, 6 + 6 layers, FFN 2048, 100 queries):
#   encoder layer: attention 4 x (256*256 + 256) = 263,168; FFN (256*2048 + 2048)
#                  + (2048*256 + 256) = 1,050,880; 2 LayerNorms 1,024 -> 1,315,072; x 6 = 7,890,432
#   decoder layer: 2 attentions 526,336 + FFN 1,050,880 + 3 LayerNorms 1,536 = 1,578,752;
#                  x 6 = 9,472,512; final decoder norm 512
#   input_proj 2048*256 + 256 = 524,544; query_embed 100*256 = 25,600;
#   class_embed 256*92 + 92 = 23,644; bbox_embed 2 x 65,792 + (256*4 + 4) = 132,612
#   backbone (FrozenBatchNorm2d: no BN parameters) 23,454,912
#   total 23,454,912 + 7,890,432 + 9,472,512 + 512 + 524,544 + 25,600 + 23,644 + 132,612
#       = 41,524,768
DETR_R50_PARAMS = 41_524_768
# The reference's main.py prints "number of params: 41302368" (its trainable parameters: the
# stem and layer1 are frozen). Frozen: conv1 7*7*3*64 = 9,408; layer1 block 0 64*64 + 9*64*64
# + 64*256 + 64*256 (downsample) = 73,728; blocks 1-2 2 x (256*64 + 9*64*64 + 64*256) = 139,264
# -> 222,400; 41,524,768 - 222,400 = 41,302,368 (the paper's Table 1 rounds it to 41M).
DETR_R50_REFERENCE_TRAINABLE = 41_302_368

# captioner-r50: ResNet-50 features 23,508,032 + image_embedding 2048*512 (no bias) 1,048,576
#   + seq_embedding 12,000*512 = 6,144,000 + LSTM 4*512*(512 + 512) + 2*4*512 = 2,101,248
#   + logits 512*12,000 + 12,000 = 6,156,000 = 38,957,856
CAPTIONER_R50_PARAMS = 38_957_856

FLAVOURS = ["detr-tiny", "detr-r50", "captioner-tiny", "captioner-r50"]


@pytest.mark.parametrize("name", FLAVOURS)
def test_analytic_graph_matches_module(name):
    check_model(name, batch=2)


@pytest.mark.parametrize("name, params", [("detr-r50", DETR_R50_PARAMS),
                                          ("captioner-r50", CAPTIONER_R50_PARAMS)])
def test_published_parameter_counts(name, params):
    assert costmodel.graph(name).params == params


def test_detr_backbone_has_only_conv_parameters():
    g = costmodel.graph("detr-r50")
    assert sum(l.params for l in g.layers if l.name.startswith("backbone.")) == R50_CONVS
    assert R50_FEATURES - R50_CONVS == 53_120  # the BatchNorm parameters DETR freezes


def test_detr_reference_trainable_count():
    g = costmodel.graph("detr-r50")
    frozen = sum(l.params for l in g.layers
                 if l.name == "backbone.conv1" or l.name.startswith("backbone.layer1."))
    assert frozen == 222_400
    assert g.params - frozen == DETR_R50_REFERENCE_TRAINABLE


def test_detr_graph_shape_facts():
    g = costmodel.graph("detr-r50")
    assert (g.units, g.heads, g.kv_heads) == (28, 8, 8)  # 16 residual blocks + 6 + 6 layers
    cross = next(l for l in g.layers
                 if l.name == "transformer.decoder.layers.3.multihead_attn.sdpa")
    # 800/32 = 25 rows, 1216/32 = 38 columns of memory tokens
    assert (cross.shape["q_len"], cross.shape["kv_len"]) == (100, 25 * 38)
    enc = sum(l.fwd_flops for l in g.layers
              if l.counted and l.name.startswith("transformer.encoder.layers.0."))
    # s = 950 tokens: 4 projections 4 x 2*950*256*256 = 498,073,600; FFN 2 x 2*950*256*2048
    # = 1,992,294,400; attention 2 x 2*8*950*950*32 = 924,160,000
    assert enc == 498_073_600 + 1_992_294_400 + 924_160_000
    heads = next(l for l in g.layers if l.name == "class_embed")
    assert heads.shape["tokens"] == 6 * 100  # every decoder layer's 100 queries, batch 1


def test_detr_image_size_override():
    g = costmodel.graph("detr-r50", image_size="640x960")
    cross = next(l for l in g.layers
                 if l.name == "transformer.decoder.layers.0.multihead_attn.sdpa")
    assert cross.shape["kv_len"] == 20 * 30


@pytest.mark.parametrize("overrides, rule", [
    ({"heads": 7}, "divisible by heads"),
    ({"heads": 2, "hidden": 258}, "divisible by 4"),
    ({"dropout": 1.0}, "dropout"),
    ({"num_queries": 0}, "num_queries"),
    ({"image_size": (16, 64)}, "image_size"),
])
def test_detr_rejects_bad_config(overrides, rule):
    with pytest.raises(ValueError, match=rule):
        models.get("detr-r50", **overrides)


@pytest.mark.parametrize("overrides, rule", [({"vocab": 0}, "vocab"),
                                             ({"caption_len": 0}, "caption_len"),
                                             ({"dropout": -0.1}, "dropout")])
def test_captioner_rejects_bad_config(overrides, rule):
    with pytest.raises(ValueError, match=rule):
        models.get("captioner-r50", **overrides)


def _reference_sine(mask: torch.Tensor, feats: int, temperature=10000, scale=2 * math.pi):
    """facebookresearch/detr models/position_encoding.py PositionEmbeddingSine, normalize=True."""
    not_mask = ~mask
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    eps = 1e-6
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(feats, dtype=torch.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # (B, d, H, W)


def test_sine_encoding_matches_reference():
    h, w, d = 5, 7, 32
    ref = _reference_sine(torch.zeros(1, h, w, dtype=torch.bool), d // 2)
    ours = sine_position_encoding(h, w, d, torch.zeros(1))  # (h*w, d)
    torch.testing.assert_close(ours, ref[0].flatten(1).T)


def test_attention_equals_multihead_attention():
    torch.manual_seed(0)
    d, heads = 16, 4
    mha = nn.MultiheadAttention(d, heads, batch_first=True).eval()
    ours = DetrAttention(d, heads, dropout=0.0).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in mha.parameters())
    with torch.no_grad():
        for proj, w, b in zip((ours.q_proj, ours.k_proj, ours.v_proj),
                              mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        ours.out_proj.load_state_dict(mha.out_proj.state_dict())
        q, k, v = torch.randn(2, 3, d), torch.randn(2, 5, d), torch.randn(2, 5, d)
        torch.testing.assert_close(ours(q, k, v), mha(q, k, v, need_weights=False)[0])


def test_frozen_batchnorm_is_eval_batchnorm_without_parameters():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.copy_(torch.randn(4))
        bn.running_var.copy_(torch.rand(4) + 0.5)
    frozen = FrozenBatchNorm2d(4)
    frozen.load_state_dict({k: v for k, v in bn.state_dict().items()
                            if k != "num_batches_tracked"})
    assert list(frozen.parameters()) == []
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(frozen(x), bn(x))


def test_detr_outputs():
    cfg = models.get("detr-tiny")
    out = models.build(cfg)(*models.example_inputs(cfg, 2))
    # 10 queries, 10 classes + no-object, 2 decoder layers (1 auxiliary)
    assert out["pred_logits"].shape == (2, 10, 11)
    assert out["pred_boxes"].shape == (2, 10, 4)
    assert out["aux_logits"].shape == (1, 2, 10, 11)
    assert 0 < float(out["pred_boxes"].detach().min()) and float(out["pred_boxes"].detach().max()) < 1


def test_captioner_forward_flops():
    # ResNet-50 at 224 minus its fc (2*2048*1000), plus the image embedding 2*2048*512, the
    # LSTM over 17 + 1 steps (input and recurrent products 2 x 2*18*512*2048) and the logits
    # over the 17 caption positions 2*17*512*12,000.
    r50 = costmodel.graph("resnet50").counted_fwd_flops
    expected = (r50 - 2 * 2048 * 1000 + 2 * 2048 * 512 + 2 * (2 * 18 * 512 * 2048)
                + 2 * 17 * 512 * 12_000)
    assert costmodel.graph("captioner-r50").counted_fwd_flops == expected == 8_460_763_136


def test_captioner_shapes():
    cfg = models.get("captioner-tiny")
    images, captions = models.example_inputs(cfg, 2)
    assert images.shape == (2, 3, 64, 64) and captions.shape == (2, 6)
    assert captions.dtype == torch.int64 and 0 <= int(captions.min()) <= int(captions.max()) < 50
    assert models.build(cfg)(images, captions).shape == (2, 6, 50)  # image step has no logits
    g = costmodel.graph("captioner-r50")
    assert g.units == 16
    assert [l.shape["seq"] for l in g.layers if l.kind == "lstm"] == [18]


@pytest.mark.parametrize("name", ["detr-tiny", "captioner-tiny"])
def test_tiny_trains_a_step(name):
    train_step(name)
