"""ViT, V-MoE and LSTM language model: analytic graphs against the modules, published sizes."""
from __future__ import annotations

import pytest
import torch
from modelcheck import check_model, flop_counter_flops, train_step

from workbench import costmodel, models

FLAVOURS = ["vit-b16", "vit-l16", "vit-h14", "vit-tiny", "vit-moe-b16", "vit-moe-tiny",
            "lstm-medium", "lstm-large", "lstm-large-tied", "lstm-tiny"]


@pytest.mark.parametrize("name", FLAVOURS)
def test_analytic_graph_matches_module(name):
    check_model(name, batch=2)


@pytest.mark.parametrize("name,params", [
    # torchvision models/vision_transformer.py weights meta `num_params` (IMAGENET1K_V1 for
    # B/16 and L/16, IMAGENET1K_SWAG_LINEAR_V1 at 224x224 for H/14).
    ("vit-b16", 86_567_656),
    ("vit-l16", 304_326_632),
    ("vit-h14", 632_045_800),
    # V-MoE-B/16: 86,567,656 + 6 MoE blocks x (31 extra experts x (768*3072 + 3072 + 3072*768
    # + 768 = 4,722,432) + router 768*32 = 24,576) = 86,567,656 + 878,519,808.
    ("vit-moe-b16", 965_087_464),
    # Zaremba medium: 10000*650 + 2*(4*650*1300 + 8*650) + 650*10000 + 10000.
    ("lstm-medium", 19_780_400),
    # Zaremba large: 10000*1500 + 2*(4*1500*3000 + 8*1500) + 1500*10000 + 10000.
    ("lstm-large", 66_034_000),
    # Tied: the 1500*10000 output weight is the embedding.
    ("lstm-large-tied", 51_034_000),
])
def test_published_parameter_counts(name, params):
    assert costmodel.graph(name).params == params


@pytest.mark.parametrize("name,overrides,millions", [
    # Riquelme et al. 2021 (arXiv 2106.05974), table of the main upstream models (JFT-300M:
    # 18,291 classes, 768/1024-wide pre-logits): ViT-B/16 100.5M, V-MoE-B/16 979.0M,
    # ViT-L/16 323.1M, V-MoE-L/16 (Every-2) 3446.0M.
    # 86,567,656 + 17,291*769 (bigger head) + 768*768 + 768 (pre_logits) = 100,455,027.
    ("vit-b16", dict(num_classes=18291, representation_size=768), 100.5),
    # 100,455,027 + 878,519,808 = 978,974,835.
    ("vit-moe-b16", dict(num_classes=18291, representation_size=768), 979.0),
    # 304,326,632 + 17,291*1025 + 1024*1024 + 1024 = 323,099,507.
    ("vit-l16", dict(num_classes=18291, representation_size=1024), 323.1),
    # 323,099,507 + 12 x (31 x 8,393,728 + 1024*32) = 3,445,959,539.
    ("vit-moe-b16", dict(layers=24, hidden=1024, heads=16, ffn=4096, num_classes=18291,
                         representation_size=1024), 3446.0),
])
def test_vmoe_paper_parameter_counts(name, overrides, millions):
    assert round(costmodel.graph(name, **overrides).params / 1e5) / 10 == millions


@pytest.mark.parametrize("name,gmacs", [
    # torchvision weights meta `_ops` (the docs' "GFLOPS", multiply-adds per 224x224 image):
    # vit_b_16 17.564, vit_l_16 61.555, vit_h_14 (SWAG_LINEAR) 167.295; half our counted
    # forward FLOPs per sample (17,563,828,224 / 61,554,712,576 / 167,295,109,120 MACs).
    ("vit-b16", 17.564), ("vit-l16", 61.555), ("vit-h14", 167.295),
])
def test_vit_flops_match_torchvision(name, gmacs):
    assert round(costmodel.graph(name, batch=1).counted_fwd_flops / 2 / 1e6) / 1000 == gmacs


def test_vit_b16_forward_flops_exact():
    g = costmodel.graph("vit-b16", batch=1)
    # Per block, 197 tokens: qkv 2*197*768*2304 + proj 2*197*768*768 + fc1, fc2 2*2*197*768*3072
    # + attention 2*2*12*197*197*64 = 2,907,909,120; patch conv 2*196*3*256*768 = 231,211,008;
    # head 2*768*1000 = 1,536,000. 12 * 2,907,909,120 + 231,211,008 + 1,536,000.
    assert g.counted_fwd_flops == 35_127_656_448
    assert g.seq == 197  # (224 / 16)^2 patches + the class token
    assert costmodel.graph("vit-h14").seq == 257  # (224 / 14)^2 + 1
    assert g.units == 12 and g.heads == 12 and g.experts is None


def test_vmoe_every_other_block_is_moe():
    cfg = models.get("vit-moe-b16")
    assert cfg.moe_layers == (1, 3, 5, 7, 9, 11)
    g = costmodel.graph(cfg, batch=8)
    assert g.experts == 32 and g.units == 12
    names = {l.name: l for l in g.layers}
    for i in range(12):
        assert (f"encoder.layers.{i}.mlp.experts.w1" in names) == (i % 2 == 1)
        assert (f"encoder.layers.{i}.mlp.fc1" in names) == (i % 2 == 0)
    # 8 images x 197 tokens = 1576 tokens; capacity ceil(2 * 1576 * 1.05 / 32) = ceil(103.425).
    assert names["encoder.layers.1.mlp.experts.w1"].shape["m"] == 104
    # ViT-B/16 x 8 = 281,021,251,584; each MoE block adds experts 2*2*32*104*768*3072
    # = 31,406,948,352 and the router 2*1576*768*32 = 77,463,552, and drops the dense MLP
    # 2*2*1576*768*3072 = 14,873,001,984: 281,021,251,584 + 6 * 16,611,409,920.
    assert g.counted_fwd_flops == 380_689_711_104
    module = models.build(cfg, device="meta")
    assert type(module.encoder.layers[1].mlp).__name__ == "MoE"
    assert type(module.encoder.layers[0].mlp).__name__ == "MLP"


def test_lstm_medium_forward_flops_exact():
    g = costmodel.graph("lstm-medium", batch=1)
    # Per layer: input projection 2*35*650*2600 + 35 steps of 2*650*2600 = 236,600,000;
    # decoder 2*35*650*10000 = 455,000,000. 2 * 236,600,000 + 455,000,000.
    assert g.counted_fwd_flops == 928_200_000
    # Backward: input projections twice the forward (weight + input grad) = 2 * 2 * 118,300,000;
    # recurrent weight grads 35 steps and hidden grads 34 steps: 2 * 69 * 3,380,000;
    # decoder 2 * 455,000,000. 473,200,000 + 466,440,000 + 910,000,000.
    assert g.counted_bwd_flops == 1_849_640_000
    assert g.seq == 35 and g.units == 2
    assert [l.unit for l in g.layers if l.kind == "lstm"] == [0, 1]


@pytest.mark.parametrize("batch,overrides", [(1, {}), (3, dict(seq=5, layers=3, embed=24))])
def test_lstm_flops_on_cpu_kernel(batch, overrides):
    # Real CPU tensors take RNN.cpp's CPU branch (one input projection for all steps) where the
    # meta device runs one per step; both must equal the `lstm` formula.
    cfg = models.get("lstm-tiny", **overrides)
    g = costmodel.graph(cfg, batch=batch)
    module = models.build(cfg)
    assert flop_counter_flops(module, models.example_inputs(cfg, batch)) == (
        g.counted_fwd_flops, g.counted_bwd_flops)


def test_lstm_tied_weights():
    g = costmodel.graph("lstm-large-tied")
    decoder = next(l for l in g.layers if l.name == "decoder")
    assert decoder.tied_to == "encoder" and decoder.params == 10000  # its own bias only
    cfg = models.get("lstm-tiny", tied=True)
    torch.manual_seed(0)
    module = models.build(cfg)
    assert module.decoder.weight is module.encoder.weight
    module(*models.example_inputs(cfg, 2)).sum().backward()
    assert module.encoder.weight.grad is not None
    # 23,396 untied - 100*32 borrowed decoder weight.
    assert costmodel.graph(cfg).params == sum(p.numel() for p in module.parameters()) == 20_196


@pytest.mark.parametrize("name,overrides,field", [
    ("vit-tiny", dict(image_size=30), "image_size"),
    ("vit-tiny", dict(heads=3), "hidden"),
    ("vit-moe-tiny", dict(top_k=5), "top_k"),
    ("vit-moe-tiny", dict(capacity_factor=0), "capacity_factor"),
    ("lstm-tiny", dict(tied=True, embed=16), "tied"),
    ("lstm-tiny", dict(dropout=1.0), "dropout"),
])
def test_bad_config_names_field(name, overrides, field):
    with pytest.raises(ValueError, match=field):
        models.get(name, **overrides)


@pytest.mark.parametrize("name", ["vit-tiny", "vit-moe-tiny", "lstm-tiny"])
def test_train_step(name):
    assert torch.isfinite(torch.tensor(train_step(name)))
