"""Tests for lorakit.lora, with peft as the oracle.

Every comparison builds the peft adapter and the lorakit adapter on deep copies of the same base
module, gives peft's lora_B random non-zero values (at init B = 0 and every output is the base
output, which would hide almost any bug), copies peft's A and B into lorakit, and compares.
"""

from __future__ import annotations

import copy
import doctest
import functools
import math
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft_tools import copy_adapter, inputs, make_pair
from torch import nn
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit.lora
from lorakit.lora import (
    LoRALinear,
    add_lora,
    get_nb_trainable_parameters,
    lora_parameter_count,
    merge_lora,
    print_trainable_parameters,
    remove_lora,
)

# (in_features, out_features): square, in > out, out > in, and a single input feature.
SHAPES = [(8, 8), (16, 5), (5, 16), (1, 7)]
RANKS = [1, 4, 16]
DTYPES = [torch.float32, torch.float64]
ALPHA = 8


layer_cases = pytest.mark.parametrize(
    "in_features, out_features, bias, r, rslora, dtype",
    [
        (i, o, bias, r, rslora, dtype)
        for i, o in SHAPES
        for bias in (True, False)
        for r in RANKS
        for rslora in (False, True)
        for dtype in DTYPES
    ],
)


# --------------------------------------------------------------------------------------------------
# LoRALinear: shapes, initialisation, scaling


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("in_features, out_features", SHAPES)
def test_shapes_and_init(in_features, out_features, bias, r, dtype):
    base = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    layer = LoRALinear(base, r=r, alpha=ALPHA)
    assert layer.base is base
    assert (layer.in_features, layer.out_features, layer.r) == (in_features, out_features, r)
    assert layer.lora_A.shape == (r, in_features)
    assert layer.lora_B.shape == (out_features, r)
    assert layer.lora_A.dtype == layer.lora_B.dtype == dtype
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(in_features)  # kaiming_uniform_ with a=sqrt(5): gain * sqrt(3 / fan_in)
    assert layer.lora_A.abs().max() <= bound
    assert torch.count_nonzero(layer.lora_A) > 0
    assert not layer.merged


@pytest.mark.parametrize("in_features", [64, 1000])
def test_lora_A_is_kaiming_uniform_like_peft(in_features):
    """Over many values A fills [-1/sqrt(in), 1/sqrt(in)] uniformly, exactly like peft's lora_A."""
    r = 64
    _, _, peft_layer = make_pair(in_features, 3, r=r)
    ours = LoRALinear(nn.Linear(in_features, 3), r=r, alpha=ALPHA)
    bound = 1 / math.sqrt(in_features)
    for a in (ours.lora_A.detach(), peft_layer.lora_A["default"].weight.detach()):
        assert a.abs().max() <= bound
        assert a.abs().max() > 0.98 * bound and a.min() < -0.98 * bound
        assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # std of U(-b, b)
        assert a.mean().abs().item() < 0.05 * bound


@pytest.mark.parametrize("alpha", [1, 3, 16, 0.5])
@pytest.mark.parametrize("r", RANKS + [7])
@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_matches_paper_and_peft(r, alpha, rslora):
    ours, _, peft_layer = make_pair(6, 4, r=r, alpha=alpha, rslora=rslora)
    expected = alpha / math.sqrt(r) if rslora else alpha / r
    assert ours.scaling == pytest.approx(expected, rel=1e-15)
    assert ours.scaling == peft_layer.scaling["default"]
    assert ours.alpha == alpha and ours.rslora is rslora


def test_base_is_frozen_in_place():
    base = nn.Linear(6, 4)
    LoRALinear(base, r=2, alpha=4)
    assert not base.weight.requires_grad and not base.bias.requires_grad


# --------------------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("dropout", [0.0, 0.5])
@layer_cases
def test_noop_at_init(in_features, out_features, bias, r, rslora, dtype, dropout):
    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    layer = LoRALinear(copy.deepcopy(base), r=r, alpha=ALPHA, rslora=rslora, dropout=dropout)
    for train in (False, True):
        layer.train(train)
        for x in inputs(in_features, dtype):
            out = layer(x)
            assert out.dtype == dtype
            assert torch.equal(out, base(x))


@layer_cases
def test_forward_matches_peft(in_features, out_features, bias, r, rslora, dtype):
    ours, peft_model, peft_layer = make_pair(in_features, out_features, bias=bias, r=r, rslora=rslora, dtype=dtype)
    assert peft_layer.lora_A["default"].weight.dtype == ours.lora_A.dtype == dtype
    with torch.no_grad():
        for x in inputs(in_features, dtype):
            out = ours(x)
            assert out.shape == (*x.shape[:-1], out_features) and out.dtype == dtype
            assert_close(out, peft_model(x))
            assert not torch.allclose(out, ours.base(x))  # the adapter really contributes


def test_delta_weight_matches_peft():
    ours, _, peft_layer = make_pair(12, 5, r=4, dtype=torch.float64)
    delta = ours.delta_weight()
    assert delta.shape == (5, 12)
    assert_close(delta, peft_layer.get_delta_weight("default"))
    x = torch.randn(3, 12, dtype=torch.float64)
    assert_close(ours(x), ours.base(x) + x @ delta.T)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_float32_adapter_like_peft(dtype):
    ours, peft_model, peft_layer = make_pair(16, 8, r=4, dtype=dtype)
    assert ours.lora_A.dtype == ours.lora_B.dtype == peft_layer.lora_A["default"].weight.dtype == torch.float32
    assert ours.base.weight.dtype == dtype
    x = torch.randn(2, 3, 16, dtype=dtype)
    with torch.no_grad():
        out = ours(x)
        assert out.dtype == dtype
        assert_close(out, peft_model(x))
        ours.merge()
        assert ours.base.weight.dtype == dtype
        # the float32 update is added to the half weight with a single rounding, as peft does: bit for bit
        assert torch.equal(ours.base.weight, peft_model.merge_and_unload().proj.weight)


# --------------------------------------------------------------------------------------------------
# Gradients


@layer_cases
def test_gradients_match_peft(in_features, out_features, bias, r, rslora, dtype):
    ours, peft_model, peft_layer = make_pair(in_features, out_features, bias=bias, r=r, rslora=rslora, dtype=dtype)
    for x in inputs(in_features, dtype):
        ours.zero_grad(set_to_none=True)
        peft_model.zero_grad(set_to_none=True)
        g = torch.randn(*x.shape[:-1], out_features, dtype=dtype)  # a random upstream gradient
        x_ours, x_peft = x.clone().requires_grad_(), x.clone().requires_grad_()
        (ours(x_ours) * g).sum().backward()
        (peft_model(x_peft) * g).sum().backward()
        assert_close(ours.lora_A.grad, peft_layer.lora_A["default"].weight.grad)
        assert_close(ours.lora_B.grad, peft_layer.lora_B["default"].weight.grad)
        assert_close(x_ours.grad, x_peft.grad)
        frozen = [ours.base.weight] + ([ours.base.bias] if bias else [])
        for p in frozen:
            assert not p.requires_grad and p.grad is None
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


def test_gradient_of_B_at_init_is_nonzero_and_A_is_zero():
    """At init B = 0, so dL/dA = 0 but dL/dB != 0: training starts by moving B (as in peft)."""
    layer = LoRALinear(nn.Linear(6, 4), r=2, alpha=4)
    layer(torch.randn(5, 6)).pow(2).sum().backward()
    assert torch.count_nonzero(layer.lora_A.grad) == 0
    assert torch.count_nonzero(layer.lora_B.grad) > 0


# --------------------------------------------------------------------------------------------------
# Dropout


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_features, out_features", SHAPES)
def test_dropout_never_touches_the_base_path(in_features, out_features, dtype):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(in_features, out_features, dtype=dtype), r=4, alpha=ALPHA, dropout=0.9).train()
    assert isinstance(layer.dropout, nn.Dropout) and layer.dropout.p == 0.9
    for x in inputs(in_features, dtype):
        for _ in range(3):
            assert torch.equal(layer(x), layer.base(x))  # B = 0: only the base path is left, and it is exact


def test_dropout_matches_peft_in_train_mode_and_is_off_in_eval_mode():
    ours, peft_model, _ = make_pair(16, 8, r=4, dropout=0.5)
    ref, _, _ = make_pair(16, 8, r=4, dropout=0.0)  # same base, same A and B, no dropout
    x = torch.randn(4, 5, 16)
    ours.train()
    peft_model.train()
    with torch.no_grad():
        for seed in range(3):
            torch.manual_seed(seed)
            out = ours(x)
            torch.manual_seed(seed)
            assert_close(out, peft_model(x))  # same mask on the adapter input, same output
        assert not torch.allclose(ours(x), ours(x))  # a fresh mask per call
        assert not torch.allclose(ours(x), ref(x))
        ours.eval()
        assert torch.equal(ours(x), ours(x))
        assert_close(ours(x), ref(x))


def test_no_dropout_module_when_dropout_is_zero():
    assert isinstance(LoRALinear(nn.Linear(4, 4), r=2, alpha=4, dropout=0.0).dropout, nn.Identity)


# --------------------------------------------------------------------------------------------------
# Merge / unmerge


@layer_cases
def test_merge_unmerge(in_features, out_features, bias, r, rslora, dtype):
    ours, peft_model, _ = make_pair(in_features, out_features, bias=bias, r=r, rslora=rslora, dtype=dtype)
    w0 = ours.base.weight.detach().clone()
    b0 = ours.base.bias.detach().clone() if bias else None
    xs = inputs(in_features, dtype)
    with torch.no_grad():
        before = [ours(x) for x in xs]

        ours.merge()
        assert ours.merged
        merged_weight = ours.base.weight.detach().clone()
        assert not torch.equal(merged_weight, w0)
        assert_close(merged_weight, w0 + ours.delta_weight())
        for x, y in zip(xs, before, strict=True):
            assert_close(ours(x), y)
            assert torch.equal(ours(x), ours.base(x))  # merged: the base alone carries the update

        ours.merge()  # idempotent
        assert ours.merged and torch.equal(ours.base.weight, merged_weight)

        peft_linear = peft_model.merge_and_unload().proj
        assert type(peft_linear) is nn.Linear
        assert_close(merged_weight, peft_linear.weight)

        ours.unmerge()
        assert not ours.merged
        assert_close(ours.base.weight, w0)
        ours.unmerge()  # idempotent too
        assert not ours.merged
        assert_close(ours.base.weight, w0)
        for x, y in zip(xs, before, strict=True):
            assert_close(ours(x), y)
    if bias:
        assert torch.equal(ours.base.bias, b0)
    assert not ours.base.weight.requires_grad


# --------------------------------------------------------------------------------------------------
# add_lora / merge_lora on a tiny Llama

Q_V = ["q_proj", "v_proj"]
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = [Q_V, "all-linear", ALL_PROJ, ["self_attn.o_proj", "down_proj"]]
TARGET_IDS = ["q_v", "all-linear", "all-proj", "dotted"]


@functools.cache
def _tiny_llama(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


def tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    """A fresh copy of a cached random tiny Llama (building one is the slow part)."""
    return copy.deepcopy(_tiny_llama(tie))


def llama_pair(targets, *, r: int = 4, alpha: float = ALPHA, rslora: bool = False, tie: bool = False):
    """(our adapted model, peft model) on the same tiny Llama, with the same random A and B."""
    base = tiny_llama(tie)
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=copy.copy(targets))
    peft_model = get_peft_model(copy.deepcopy(base), config).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for m in peft_model.modules():
            if isinstance(m, LoraLayer):
                m.lora_B["default"].weight.normal_(std=0.1)
    ours = add_lora(base, targets, r=r, alpha=alpha, rslora=rslora).eval()
    peft_layers = peft_wrapped(peft_model)
    for name, m in ours.named_modules():
        if isinstance(m, LoRALinear):
            copy_adapter(m, peft_layers[name])
    return ours, peft_model


def peft_wrapped(peft_model) -> dict[str, LoraLayer]:
    """peft's adapter layers, by their name in the underlying transformers model."""
    return {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def ours_wrapped(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def token_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("targets", TARGETS, ids=TARGET_IDS)
def test_add_lora_wraps_what_peft_wraps(targets, tie):
    ours, peft_model = llama_pair(targets, tie=tie)
    wrapped = ours_wrapped(ours)
    assert set(wrapped) == set(peft_wrapped(peft_model))
    assert wrapped  # non-empty
    assert "lm_head" not in wrapped and isinstance(ours.lm_head, nn.Linear)
    if targets == "all-linear":
        n_linear = sum(isinstance(m, nn.Linear) for m in tiny_llama(tie).modules())
        assert len(wrapped) == n_linear - 1  # every linear layer but the output head
    for layer in wrapped.values():
        assert (layer.r, layer.alpha, layer.scaling) == (4, ALPHA, ALPHA / 4)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("targets", TARGETS, ids=TARGET_IDS)
def test_add_lora_parameter_counts_match_peft(targets, tie, capsys):
    ours, peft_model = llama_pair(targets, tie=tie)
    counts = get_nb_trainable_parameters(ours)
    assert counts == peft_model.get_nb_trainable_parameters()
    expected = sum(lora_parameter_count(m.in_features, m.out_features, m.r) for m in ours_wrapped(ours).values())
    assert counts[0] == expected
    assert counts[1] == sum(p.numel() for p in tiny_llama(tie).parameters()) + expected

    capsys.readouterr()
    print_trainable_parameters(ours)
    line = capsys.readouterr().out
    peft_model.print_trainable_parameters()
    assert line == capsys.readouterr().out
    assert line.startswith(f"trainable params: {counts[0]:,d} || all params: {counts[1]:,d} || trainable%: ")


@pytest.mark.parametrize("targets", TARGETS, ids=TARGET_IDS)
def test_add_lora_only_adapters_are_trainable(targets):
    ours, _ = llama_pair(targets)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    adapters = {f"{n}.{p}" for n in ours_wrapped(ours) for p in ("lora_A", "lora_B")}
    assert trainable == adapters
    ours(token_ids()).logits.sum().backward()
    for n, p in ours.named_parameters():
        assert (p.grad is not None) == (n in adapters), n


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("targets", TARGETS, ids=TARGET_IDS)
def test_add_lora_logits_match_peft(targets, rslora):
    ours, peft_model = llama_pair(targets, r=8, alpha=16, rslora=rslora)
    ids = token_ids()
    with torch.no_grad():
        logits = ours(ids).logits
        assert_close(logits, peft_model(input_ids=ids).logits)
        assert not torch.allclose(logits, tiny_llama()(ids).logits, atol=1e-4)  # the adapters matter


def test_add_lora_passes_settings_to_every_layer():
    model = add_lora(tiny_llama(), ALL_PROJ, r=16, alpha=4, dropout=0.1, rslora=True)
    for layer in ours_wrapped(model).values():
        assert (layer.r, layer.alpha, layer.rslora, layer.scaling) == (16, 4.0, True, 4 / math.sqrt(16))
        assert isinstance(layer.dropout, nn.Dropout) and layer.dropout.p == 0.1


def test_add_lora_returns_the_same_model_and_a_second_call_adds_layers():
    model = tiny_llama()
    assert add_lora(model, ["q_proj"], r=2, alpha=4) is model
    add_lora(model, ["v_proj"], r=2, alpha=4)
    assert {n.rsplit(".", 1)[-1] for n in ours_wrapped(model)} == {"q_proj", "v_proj"}
    add_lora(model, "all-linear", r=2, alpha=4)  # wraps the rest, never an adapter's own base
    wrapped = ours_wrapped(model)
    assert len(wrapped) == 2 * len(ALL_PROJ)
    assert not any(isinstance(m, LoRALinear) for layer in wrapped.values() for m in layer.base.modules())
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        add_lora(model, ["q_proj"], r=2, alpha=4)


@pytest.mark.parametrize("targets", TARGETS, ids=TARGET_IDS)
def test_merge_lora_matches_adapted_model_and_peft(targets):
    ours, peft_model = llama_pair(targets)
    names = set(ours_wrapped(ours))
    ids = token_ids()
    with torch.no_grad():
        adapted = ours(ids).logits
        merged = merge_lora(ours)
        assert merged is ours
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        for name in names:
            assert type(merged.get_submodule(name)) is nn.Linear
        assert_close(merged(ids).logits, adapted)

        peft_merged = peft_model.merge_and_unload()
        assert_close(merged(ids).logits, peft_merged(ids).logits)
        ours_state, peft_state = merged.state_dict(), peft_merged.state_dict()
        assert ours_state.keys() == peft_state.keys() == tiny_llama().state_dict().keys()
        for key in ours_state:
            assert_close(ours_state[key], peft_state[key])
    assert merge_lora(merged) is merged  # nothing left to merge


@pytest.mark.parametrize("targets", TARGETS, ids=TARGET_IDS)
def test_remove_lora_gives_back_the_pretrained_model_unmerged(targets):
    ours, _ = llama_pair(targets)
    wrapped = ours_wrapped(ours)
    bases = {name: layer.base for name, layer in wrapped.items()}
    ids = token_ids()
    with torch.no_grad():
        assert not torch.equal(ours(ids).logits, tiny_llama()(ids).logits)  # the copied adapters change the output
        assert remove_lora(ours) is ours
        assert not any(isinstance(m, LoRALinear) for m in ours.modules())
        for name, base in bases.items():
            assert ours.get_submodule(name) is base  # the frozen layer itself, its weight untouched
        assert_close(ours(ids).logits, tiny_llama()(ids).logits, rtol=0, atol=0)
    assert remove_lora(ours) is ours  # nothing left to remove


# --------------------------------------------------------------------------------------------------
# Errors

BAD_RANKS = [0, -1, 1.5, True, "4", None]
BAD_ALPHAS = [0, -1, -0.5, float("nan"), float("inf"), True]
BAD_DROPOUTS = [-0.1, 1.0, 1.5, float("nan"), True]


@pytest.mark.parametrize("r", BAD_RANKS, ids=repr)
def test_bad_rank(r):
    with pytest.raises(ValueError, match=re.escape(repr(r))):
        LoRALinear(nn.Linear(4, 4), r=r, alpha=4)
    with pytest.raises(ValueError, match=re.escape(repr(r))):
        add_lora(tiny_llama(), Q_V, r=r, alpha=4)
    with pytest.raises(ValueError, match=re.escape(repr(r))):
        lora_parameter_count(8, 8, r)


@pytest.mark.parametrize("alpha", BAD_ALPHAS, ids=repr)
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match=re.escape(repr(alpha))):
        LoRALinear(nn.Linear(4, 4), r=2, alpha=alpha)
    with pytest.raises(ValueError, match=re.escape(repr(alpha))):
        add_lora(tiny_llama(), Q_V, r=2, alpha=alpha)


@pytest.mark.parametrize("dropout", BAD_DROPOUTS, ids=repr)
def test_bad_dropout(dropout):
    with pytest.raises(ValueError, match=re.escape(repr(dropout))):
        LoRALinear(nn.Linear(4, 4), r=2, alpha=4, dropout=dropout)
    with pytest.raises(ValueError, match=re.escape(repr(dropout))):
        add_lora(tiny_llama(), Q_V, r=2, alpha=4, dropout=dropout)


@pytest.mark.parametrize("base", [nn.Conv1d(4, 4, 1), nn.Embedding(10, 4), nn.LayerNorm(4), nn.Bilinear(4, 4, 4)])
def test_base_must_be_linear(base):
    with pytest.raises(TypeError, match=type(base).__name__):
        LoRALinear(base, r=2, alpha=4)


def test_valid_edge_values_are_accepted():
    layer = LoRALinear(nn.Linear(4, 3), r=1, alpha=1e-3, dropout=0.0)
    assert layer.scaling == pytest.approx(1e-3)
    assert LoRALinear(nn.Linear(4, 3), r=2, alpha=2, dropout=0.999).dropout.p == 0.999


def assert_untouched(model: nn.Module) -> None:
    """A failed add_lora must leave the model as it was: nothing wrapped, nothing frozen."""
    assert not ours_wrapped(model)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("targets, missing", [(["nope"], "nope"), (["q_proj", "qproj"], "qproj"), (["proj"], "proj")])
def test_add_lora_unknown_target(targets, missing):
    model = tiny_llama()
    with pytest.raises(ValueError, match=re.escape(repr(missing))):
        add_lora(model, targets, r=2, alpha=4)
    assert_untouched(model)


@pytest.mark.parametrize(
    "target, kind",
    [
        ("input_layernorm", "LlamaRMSNorm"),
        ("norm", "LlamaRMSNorm"),
        ("embed_tokens", "Embedding"),
        ("mlp", "LlamaMLP"),
        ("self_attn", "LlamaAttention"),
    ],
)
def test_add_lora_target_not_linear(target, kind):
    model = tiny_llama()
    with pytest.raises(TypeError, match=re.escape(target)) as info:
        add_lora(model, ["q_proj", target], r=2, alpha=4)
    assert kind in str(info.value)
    assert_untouched(model)


@pytest.mark.parametrize("targets", ["q_proj", "all_linear", "", ".*q_proj"])
def test_add_lora_bare_string_other_than_all_linear(targets):
    model = tiny_llama()
    with pytest.raises(ValueError, match=re.escape(repr(targets))):
        add_lora(model, targets, r=2, alpha=4)
    assert_untouched(model)


@pytest.mark.parametrize("targets", [[], [""], ["q_proj", 3]], ids=repr)
def test_add_lora_bad_target_list(targets):
    model = tiny_llama()
    with pytest.raises(ValueError, match="target_modules"):
        add_lora(model, targets, r=2, alpha=4)
    assert_untouched(model)


def test_add_lora_all_linear_without_linear_layers():
    with pytest.raises(ValueError, match="all-linear"):
        add_lora(nn.Sequential(nn.LayerNorm(4), nn.ReLU()), "all-linear", r=2, alpha=4)


def test_add_lora_needs_a_module():
    with pytest.raises(TypeError, match="dict"):
        add_lora({}, Q_V, r=2, alpha=4)


# --------------------------------------------------------------------------------------------------
# Parameter counts and doctests


def test_lora_parameter_count_llama_sized():
    assert lora_parameter_count(4096, 4096, 16) == 131072
    assert lora_parameter_count(4096, 11008, 8) == 8 * (4096 + 11008)


@pytest.mark.parametrize("seed", range(8))
def test_lora_parameter_count_equals_numel_and_peft(seed):
    g = torch.Generator().manual_seed(seed)
    in_features, out_features, r = (int(v) for v in torch.randint(1, 40, (3,), generator=g))
    layer = LoRALinear(nn.Linear(in_features, out_features), r=r, alpha=ALPHA)
    count = lora_parameter_count(in_features, out_features, r)
    assert count == layer.lora_A.numel() + layer.lora_B.numel() == r * (in_features + out_features)
    _, peft_model, _ = make_pair(in_features, out_features, r=r)
    assert count == peft_model.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize(
    "d_in, d_out, name, bad",
    [
        (0, 4, "d_in", 0),
        (4, 0, "d_out", 0),
        (-3, 4, "d_in", -3),
        (4.0, 4, "d_in", 4.0),
        (True, 4, "d_in", True),
        (4, "4", "d_out", "4"),
    ],
)
def test_lora_parameter_count_bad_sizes(d_in, d_out, name, bad):
    with pytest.raises(ValueError, match=rf"`{name}`.*{re.escape(repr(bad))}"):
        lora_parameter_count(d_in, d_out, 4)


def test_doctests():
    result = doctest.testmod(lorakit.lora, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5
    assert result.failed == 0
