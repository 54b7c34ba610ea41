"""Op formulas, the layer graph, the tracer and the model registry, with the arithmetic."""
import json

import pytest
import torch
from torch import nn

from modelcheck import flop_counter_flops
from workbench import costmodel, models
from workbench.cli import main
from workbench.costmodel import ops
from workbench.costmodel.builders.common import FeatureMap, conv_out_size
from workbench.costmodel.graph import GraphBuilder
from workbench.costmodel.tracer import trace


def test_linear_formula():
    # 10 tokens x (32 -> 64): fwd 2*10*32*64 = 40,960; bwd weight + input = 81,920;
    # params 32*64 + 64 = 2,112; saved input 10*32*2 bytes = 640.
    c = ops.cost("linear", tokens=10, in_features=32, out_features=64)
    assert (c.fwd_flops, c.bwd_flops, c.params, c.saved_bytes) == (40_960, 81_920, 2_112, 640)
    # The first layer of a network needs no input gradient: backward = weight grad only.
    assert ops.cost("linear", tokens=10, in_features=32, out_features=64,
                    input_grad=False).bwd_flops == 40_960


def test_conv_formula_and_transposed():
    # Conv2d 3->8, 3x3, 2 images, 16x16 out: 2*2*256*3*8*9 = 221,184 FLOPs; params 3*8*9+8 = 224.
    c = ops.cost("conv", batch=2, in_channels=3, out_channels=8, kernel=(3, 3),
                 in_spatial=(16, 16), out_spatial=(16, 16))
    assert (c.fwd_flops, c.bwd_flops, c.params) == (221_184, 442_368, 224)
    # Transposed 8->4, 2x2 stride 2 from 5x5 to 10x10: each of the 25 input pixels is scattered
    # through 8*4*4 weights: 2*1*25*8*4*4 = 6,400.
    t = ops.cost("conv", batch=1, in_channels=8, out_channels=4, kernel=(2, 2),
                 in_spatial=(5, 5), out_spatial=(10, 10), transposed=True)
    assert t.fwd_flops == 6_400 and t.params == 8 * 4 * 4 + 4


def test_attention_formula():
    # b=2, h=4, s=16, d=8: QK^T and AV each 2*2*4*16*16*8 = 32,768 -> fwd 65,536, bwd 131,072.
    c = ops.cost("attention", batch=2, heads=4, q_len=16, kv_len=16, head_dim=8)
    assert (c.fwd_flops, c.bwd_flops, c.params) == (65_536, 131_072, 0)


def test_lstm_formula():
    # batch 3, 5 steps, input 4, hidden 6 (24 gates): ih 2*15*4*24 = 2,880; hh 5 * 2*3*6*24 = 4,320.
    # bwd: ih weight+input 5,760; hh weight 4,320 + hidden grads of steps 2..5 3,456 = 13,536.
    c = ops.cost("lstm", batch=3, seq=5, input_size=4, hidden=6)
    assert (c.fwd_flops, c.bwd_flops) == (7_200, 13_536)
    assert c.params == 24 * (4 + 6) + 2 * 24


@pytest.mark.parametrize("kind, shape", [
    ("linear", dict(tokens=7, in_features=5, out_features=3)),
    ("attention", dict(batch=2, heads=2, q_len=3, kv_len=5, head_dim=4)),
])
def test_formulas_match_flop_counter_on_real_ops(kind, shape):
    if kind == "linear":
        mod = nn.Linear(5, 3)
        inputs = (torch.randn(7, 5, requires_grad=True),)
    else:
        class Attn(nn.Module):
            def forward(self, q, k, v):
                return nn.functional.scaled_dot_product_attention(q, k, v)
        mod = Attn()
        inputs = tuple(torch.randn(2, 2, n, 4, requires_grad=True) for n in (3, 5, 5))
    c = ops.cost(kind, **shape)
    assert flop_counter_flops(mod, inputs) == (c.fwd_flops, c.bwd_flops)


def test_lstm_formula_matches_flop_counter():
    lstm = nn.LSTM(4, 6, num_layers=2, batch_first=True)
    x = torch.randn(3, 5, 4)
    l0 = ops.cost("lstm", batch=3, seq=5, input_size=4, hidden=6, input_grad=False)
    l1 = ops.cost("lstm", batch=3, seq=5, input_size=6, hidden=6)
    fwd, bwd = flop_counter_flops(lstm, (x,))
    assert (fwd, bwd) == (l0.fwd_flops + l1.fwd_flops, l0.bwd_flops + l1.bwd_flops)


def test_registry_refuses_duplicates_and_unknown_kinds():
    with pytest.raises(ValueError, match="registered twice"):
        ops.register("linear")(lambda: None)
    with pytest.raises(ValueError, match="unknown op kind 'matmul3'"):
        ops.cost("matmul3")


def test_feature_map_follows_pytorch_sizes():
    assert conv_out_size(224, 7, 2, 3) == 112
    b = GraphBuilder()
    fm = FeatureMap(1, 3, (224, 224), requires_grad=False).conv(b, "c", 64, 7, 2, 3)
    fm = fm.pool(b, "p", 3, 2, 1)
    assert fm.spatial == (56, 56) and b.layers[0].bwd_flops == b.layers[0].fwd_flops
    ceil = FeatureMap(1, 1, (5, 5)).pool(b, "q", 2, 2, ceil_mode=True)
    assert ceil.spatial == tuple(nn.MaxPool2d(2, 2, ceil_mode=True)(torch.zeros(1, 1, 5, 5)).shape[2:])


def test_tracer_counts_shared_weights_once_and_free_parameters():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10)
            self.out.weight = self.emb.weight
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return self.out(self.emb(x) * self.scale)

    g = trace(Tied(), (torch.zeros(2, 3, dtype=torch.long),))
    # 10*4 shared table + 10 output bias + 4 free scale = 54 = the module's parameters.
    assert g.params == 54 == sum(p.numel() for p in Tied().parameters())
    assert [l.kind for l in g.layers] == ["embedding", "linear", "parameter"]


def test_graph_totals_and_units():
    g = costmodel.graph("llama-tiny", batch=2)
    assert g.units == 2 and g.heads == 4 and g.kv_heads == 2 and g.seq == 32
    assert g.tokens == 64
    groups = g.unit_layers()
    assert list(groups)[0] == -1 and groups[-1][0].name == "tok_embeddings"
    assert g.model_flops == g.fwd_flops + g.bwd_flops
    assert json.loads(json.dumps(g.to_json()))["params"] == g.params


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'resnet51'.*resnet50"):
        models.get("resnet51")
    with pytest.raises(ValueError, match="batch must be >= 1"):
        costmodel.graph("resnet50", batch=0)


def test_every_family_has_a_tiny_flavour():
    names = set(models.flavours())
    for family in models.families():
        assert any(n.endswith("-tiny") and models.flavours()[n].family == family
                   for n in names), f"family {family} has no tiny flavour"


def test_cli_models_json_and_graph(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["model"]: r for r in rows}
    assert by_name["llama3-8b"]["params"] == 8_030_261_248
    assert main(["graph", "gpt", "--set", "layers=2,hidden=128,heads=4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["units"] == 2 and out["config"]["hidden"] == 128
    assert main(["graph", "gpt", "--set", "layers=two"]) == 2
    assert "layers='two': expected int" in capsys.readouterr().err


def test_cli_hardware_and_plan(capsys):
    assert main(["hardware", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {c["name"] for c in out["chips"]} >= {"a100-sxm-80gb", "h100-sxm", "b200", "cpu"}
    assert main(["plan", "dp=128,tp=8,pp=16,gbs=2048", "--model", "llama3-405b",
                 "--chips", "16384"]) == 0
    text = capsys.readouterr().out
    # 126 layers on 16 stages: 7 on the first and last, 8 on the 14 others (Llama 3 paper).
    assert "    0      7         0..6" in text and "   15      7     119..125" in text
    assert main(["plan", "tp=3", "--model", "llama3-8b", "--chips", "3"]) == 2
    assert "rule: TP divides attention heads" in capsys.readouterr().err


def test_recompute_flops():
    # llama-tiny, batch 1: attention forward per layer = QK^T + AV = 2 x (2 x 4 heads x 32 x 16
    # x 32) = 262,144 FLOPs, 2 layers -> selective reruns 524,288; full reruns every unit op.
    g = costmodel.graph("llama-tiny")
    assert g.recompute_flops("selective") == 2 * 262_144
    assert g.recompute_flops("full") == sum(l.fwd_flops for l in g.layers if 0 <= l.unit < 2)
    assert g.recompute_flops("none") == 0
    with pytest.raises(ValueError, match="recompute='some'"):
        g.recompute_flops("some")


def test_unet_and_fcn_carry_their_skip_maps_across_pipeline_boundaries():
    from workbench.costmodel.profile import profile
    from workbench.costmodel.volumes import p2p_tensors
    g = costmodel.graph(models.get("unet-tiny"))
    # skip sides 184, 88, 40, 16 (188 - 4, then halved and - 4) at widths 4, 8, 16, 32, in
    # 2-byte elements: 4*184^2*2 = 270,848, 8*88^2*2 = 123,904, 16*40^2*2 = 51,200 and
    # 32*16^2*2 = 16,384 bytes; level i's map is made in unit 2i + 1 and read by the
    # up-convolution of unit 16 - 2i
    assert g.units == 18 and len(g.carried) == 17
    assert g.carried[0] == (0, 0)                           # before unit 1: none made yet
    assert g.carried[1] == (1, 270848)                      # before unit 2
    assert g.carried[8] == (4, 270848 + 123904 + 51200 + 16384)  # before unit 9: all four
    assert g.carried[10] == (3, 270848 + 123904 + 51200)    # before 11: level 3's read in 10
    assert g.carried[16] == (0, 0)                          # before 17: level 0's read in 16
    # tensors per message, over the 17 boundaries: 1 + (0+1+1+2+2+3+3+4+4+4+3+3+2+2+1+1+0)/17
    assert p2p_tensors(profile(g)) == pytest.approx(1 + 36 / 17)
    # FCN-8s: pool3 after unit 6 and pool4 after unit 9, both read by the head after the units
    f = costmodel.graph(models.get("fcn-tiny"))
    assert [n for n, _ in f.carried] == [0] * 6 + [1] * 3 + [2] * 5
    assert f.carried[-1][1] == f.carried[9][1] > f.carried[6][1] > 0
    # a model without skips across units carries nothing: one tensor per message
    assert p2p_tensors(profile(costmodel.graph(models.get("llama-tiny")))) == 1.0
