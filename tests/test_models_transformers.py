"""Llama (dense and MoE) and GPT: analytic graph == module, published sizes, FLOP identities."""
import pytest

from modelcheck import check_model, train_step
from workbench import costmodel, models


@pytest.mark.parametrize("name, batch", [
    ("llama-tiny", 2), ("llama-moe-tiny", 2), ("llama3-8b", 1), ("llama3-70b", 1),
    ("mixtral-8x7b", 1), ("gpt-tiny", 2), ("gpt", 1), ("gpt3-175b", 1),
])
def test_analytic_graph_matches_module(name, batch):
    check_model(name, batch=batch)


@pytest.mark.parametrize("name, params", [
    # Published by Meta / Mistral (model cards; e.g. HF safetensors totals).
    ("llama3-8b", 8_030_261_248),
    ("llama3-70b", 70_553_706_496),
    ("llama3-405b", 405_853_388_800),
    ("mixtral-8x7b", 46_702_792_704),
    # Megatron GPT: V h + s h + l (12 h^2 + 13 h) + 2 h with l=128, h=25600, V=51200, s=2048
    # = 1,310,720,000 + 52,428,800 + 1,006,675,558,400 + 51,200 (Narayanan et al.: 1008.0 B).
    ("gpt-1t", 1_310_720_000 + 52_428_800 + 128 * (12 * 25600**2 + 13 * 25600) + 2 * 25600),
])
def test_published_parameter_counts(name, params):
    assert costmodel.graph(name).params == params


def test_untied_gpt_counts_its_own_output_layer():
    # gpt-tiny: the untied head adds vocab x hidden = 256 x 64 = 16,384 parameters.
    tied, untied = costmodel.graph("gpt-tiny"), check_model("gpt-tiny", tied=False)
    assert untied.params - tied.params == 256 * 64


def test_gpt_flops_equal_megatron_formula():
    # Narayanan et al. 2021 Eq. 3 without recomputation (3 passes, not 4):
    # 72 B s l h^2 (1 + s/(6h) + V/(12 l h)) = 72 B s l h^2 + 12 B s^2 l h + 6 B s h V.
    B, s, l, h, V = 4, 2048, 24, 2304, 51200
    g = costmodel.graph("gpt", batch=B)
    assert g.counted_fwd_flops + g.counted_bwd_flops == (
        72 * B * s * l * h**2 + 12 * B * s**2 * l * h + 6 * B * s * h * V)


def test_llama_flops_equal_palm_formula():
    # PaLM Appendix B: 6 N + 12 L H Q T FLOPs per token, N = matmul parameters (embedding
    # lookup and norms excluded), H Q = hidden (heads x head dim), T = sequence.
    g = costmodel.graph("llama3-8b", batch=1)
    cfg = models.get("llama3-8b")
    matmul_params = sum(l.params for l in g.layers if l.kind == "linear")
    assert matmul_params == g.params - cfg.vocab * cfg.hidden - (2 * cfg.layers + 1) * cfg.hidden
    per_token = 6 * matmul_params + 12 * cfg.layers * cfg.hidden * cfg.seq
    assert g.counted_fwd_flops + g.counted_bwd_flops == per_token * cfg.seq


def test_moe_experts_cost_capacity_slots():
    # mixtral-8x7b, batch 1: 4096 tokens, top-2 of 8 experts, capacity factor 1:
    # capacity = ceil(2 * 4096 * 1.0 / 8) = 1024 slots per expert; w1 = 8 x (1024 x 4096 x 14336).
    g = costmodel.graph("mixtral-8x7b", batch=1)
    w1 = next(l for l in g.layers if l.name == "layers.0.feed_forward.experts.w1")
    assert w1.shape["m"] == 1024 and w1.ep
    assert w1.fwd_flops == 8 * 2 * 1024 * 4096 * 14336
    assert g.experts == 8


@pytest.mark.parametrize("name", ["llama-tiny", "llama-moe-tiny", "gpt-tiny"])
def test_tiny_flavours_train_a_step(name):
    train_step(name)  # asserts gradients everywhere, a finite loss and a changed model


def test_invalid_transformer_configs_name_the_field():
    with pytest.raises(ValueError, match="heads"):
        models.get("llama-tiny", heads=5)
    with pytest.raises(ValueError, match="kv_heads"):
        models.get("llama-tiny", kv_heads=3)
    with pytest.raises(ValueError, match="top_k"):
        models.get("llama-moe-tiny", top_k=9)
    with pytest.raises(ValueError, match="no field 'depth'"):
        models.get("gpt", depth=3)
