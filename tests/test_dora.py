"""Tests for lorakit.dora, with peft (LoraConfig(use_dora=True)) as the oracle.

Every comparison builds the peft adapter and the lorakit adapter on deep copies of the same base
module, gives peft's lora_B random non-zero values and perturbs its magnitude (at init B = 0 and
m = ||W0||, so every output is the base output, which would hide almost any bug), copies peft's A, B
and m into lorakit, and compares.
"""

from __future__ import annotations

import copy
import doctest
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft_tools import Tiny, inputs
from peft_tools import make_pair as _make_pair
from torch import nn
from torch.nn import functional as F
from torch.testing import assert_close

import lorakit.dora
from lorakit.dora import DoRALinear, magnitude_and_direction
from lorakit.lora import get_nb_trainable_parameters, lora_parameter_count

# (in_features, out_features): square, in > out, out > in.
SHAPES = [(8, 8), (16, 5), (5, 16)]
RANKS = [1, 4]
ALPHA = 8


def make_pair(*args, **kwargs):
    """(lorakit DoRALinear, peft model, peft's lora.Linear with use_dora) on the same base and adapter."""
    return _make_pair(*args, dora=True, **kwargs)


layer_cases = pytest.mark.parametrize(
    "in_features, out_features, bias, r, rslora",
    [(i, o, bias, r, rslora) for i, o in SHAPES for bias in (True, False) for r in RANKS for rslora in (False, True)],
)


# --------------------------------------------------------------------------------------------------
# Shapes, initialisation, the decomposition


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("in_features, out_features", SHAPES)
def test_shapes_and_init(in_features, out_features, bias, dtype):
    torch.manual_seed(0)
    tiny = Tiny(in_features, out_features, bias).to(dtype)
    config = LoraConfig(r=4, lora_alpha=ALPHA, use_dora=True, target_modules=["proj"])
    peft_layer = get_peft_model(copy.deepcopy(tiny), config).base_model.model.proj
    base = tiny.proj
    layer = DoRALinear(base, r=4, alpha=ALPHA)
    assert layer.base is base
    assert (layer.in_features, layer.out_features, layer.r) == (in_features, out_features, 4)
    assert (layer.alpha, layer.scaling) == (ALPHA, ALPHA / 4)
    assert layer.lora_A.shape == (4, in_features) and layer.lora_B.shape == (out_features, 4)
    assert layer.magnitude.shape == (out_features,)
    assert layer.lora_A.dtype == layer.lora_B.dtype == layer.magnitude.dtype == dtype
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.lora_A.abs().max() <= 1 / in_features**0.5  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), ..)
    # m starts as the norm of each output row of W0 (dim=1 of the (out, in) weight), not of each column
    assert torch.equal(layer.magnitude, torch.linalg.norm(base.weight, dim=1))
    assert_close(layer.magnitude, (base.weight**2).sum(dim=1).sqrt())
    assert_close(layer.magnitude, peft_layer.lora_magnitude_vector["default"].weight.to(dtype))
    assert not layer.merged
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B", "magnitude"}
    assert not any(p.requires_grad for p in base.parameters())


def test_magnitude_and_direction():
    w = torch.randn(5, 7, dtype=torch.float64)
    m, v = magnitude_and_direction(w)
    assert m.shape == (5,) and v.shape == (5, 7)
    assert_close(m.unsqueeze(1) * v, w)
    assert_close(torch.linalg.norm(v, dim=1), torch.ones(5, dtype=torch.float64))
    assert torch.equal(m, torch.linalg.norm(w, dim=1))


@pytest.mark.parametrize("weight", [torch.randn(3), torch.randn(2, 3, 4), [[1.0, 2.0]]], ids=["1d", "3d", "list"])
def test_magnitude_and_direction_needs_a_matrix(weight):
    with pytest.raises(ValueError, match="2-D"):
        magnitude_and_direction(weight)


# --------------------------------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("in_features, out_features", SHAPES)
def test_noop_at_init(in_features, out_features, bias, dropout, dtype):
    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    layer = DoRALinear(copy.deepcopy(base), r=4, alpha=ALPHA, dropout=dropout)
    for train in (False, True):
        layer.train(train)
        for x in inputs(in_features, dtype):
            out = layer(x)
            assert out.dtype == dtype
            assert torch.equal(out, base(x))  # m / ||W0|| is exactly 1 and B A x exactly 0


@layer_cases
def test_forward_matches_peft(in_features, out_features, bias, r, rslora):
    ours, peft_model, peft_layer = make_pair(in_features, out_features, bias=bias, r=r, rslora=rslora)
    assert ours.scaling == peft_layer.scaling["default"]
    with torch.no_grad():
        for x in inputs(in_features):
            out = ours(x)
            assert out.shape == (*x.shape[:-1], out_features)
            assert_close(out, peft_model(x))
            assert not torch.allclose(out, ours.base(x))  # the adapter really contributes
            # the layer is a plain linear layer with weight W'; the bias is added once and not rescaled
            assert_close(out, F.linear(x, ours.adapted_weight(), ours.base.bias))


def test_adapted_weight_rows_have_length_m():
    ours, _, _ = make_pair(9, 6, dtype=torch.float64)
    with torch.no_grad():
        w = ours.adapted_weight()
        m, v = magnitude_and_direction(w)
        assert_close(m, ours.magnitude.abs())
        direction = ours.base.weight + ours.delta_weight()
        unit = direction / torch.linalg.norm(direction, dim=1, keepdim=True)  # (out, in), rows of length one
        assert_close(v * ours.magnitude.sign().unsqueeze(1), unit)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_float32_adapter_like_peft(dtype):
    ours, peft_model, peft_layer = make_pair(16, 8, r=4, dtype=dtype)
    assert ours.lora_A.dtype == ours.magnitude.dtype == torch.float32
    assert peft_layer.lora_magnitude_vector["default"].weight.dtype == torch.float32
    x = torch.randn(2, 3, 16, dtype=dtype)
    with torch.no_grad():
        out = ours(x)
        assert out.dtype == dtype
        assert_close(out, peft_model(x))
        ours.merge()
        assert ours.base.weight.dtype == dtype
        # W' is computed in float32 and rounded to the half weight once, as peft does: bit for bit
        assert torch.equal(ours.base.weight, peft_model.merge_and_unload().proj.weight)


# --------------------------------------------------------------------------------------------------
# Gradients


@layer_cases
def test_gradients_match_peft(in_features, out_features, bias, r, rslora):
    ours, peft_model, peft_layer = make_pair(in_features, out_features, bias=bias, r=r, rslora=rslora)
    for x in inputs(in_features):
        ours.zero_grad(set_to_none=True)
        peft_model.zero_grad(set_to_none=True)
        g = torch.randn(*x.shape[:-1], out_features)  # a random upstream gradient
        x_ours, x_peft = x.clone().requires_grad_(), x.clone().requires_grad_()
        (ours(x_ours) * g).sum().backward()
        (peft_model(x_peft) * g).sum().backward()
        assert_close(ours.lora_A.grad, peft_layer.lora_A["default"].weight.grad)
        assert_close(ours.lora_B.grad, peft_layer.lora_B["default"].weight.grad)
        assert_close(ours.magnitude.grad, peft_layer.lora_magnitude_vector["default"].weight.grad)
        assert_close(x_ours.grad, x_peft.grad)
        for p in [ours.base.weight] + ([ours.base.bias] if bias else []):
            assert not p.requires_grad and p.grad is None


def _weight(ours: DoRALinear, detach_norm: bool) -> torch.Tensor:
    """W' built by hand from the layer's parameters, with or without a gradient through the norm."""
    v = ours.base.weight + ours.scaling * ours.lora_B @ ours.lora_A  # (out, in)
    norm = torch.linalg.norm(v, dim=1, keepdim=True)  # (out, 1)
    return ours.magnitude.unsqueeze(1) * v / (norm.detach() if detach_norm else norm)


@layer_cases
def test_norm_is_a_constant_in_the_backward_pass(in_features, out_features, bias, r, rslora):
    """Closed-form gradients with ||W0 + s B A|| held constant (section 4.3 of the DoRA paper)."""
    ours, _, _ = make_pair(in_features, out_features, bias=bias, r=r, rslora=rslora, dtype=torch.float64)
    x = torch.randn(2, 4, in_features, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 4, out_features, dtype=torch.float64)
    (ours(x) * g).sum().backward()

    with torch.no_grad():
        a, b, m, s = ours.lora_A, ours.lora_B, ours.magnitude, ours.scaling
        v = ours.base.weight + s * b @ a  # (out, in)
        c = torch.linalg.norm(v, dim=1)  # (out,), the constant
        big_g = g.reshape(-1, out_features).T @ x.reshape(-1, in_features)  # dL/dW', (out, in)
        grad_v = (m / c).unsqueeze(1) * big_g  # (out, in)
        assert_close(m.grad, (big_g * v).sum(dim=1) / c)
        assert_close(b.grad, s * grad_v @ a.T)
        assert_close(a.grad, s * b.T @ grad_v)
        assert_close(x.grad, g @ ours.adapted_weight())
    layer_grads = (ours.lora_A.grad.clone(), ours.lora_B.grad.clone(), ours.magnitude.grad.clone())

    # the same through autograd on a hand-built W' with the norm detached, and a different answer without
    grads = {}
    for detach in (True, False):
        ours.zero_grad(set_to_none=True)
        (F.linear(x.detach(), _weight(ours, detach), ours.base.bias) * g).sum().backward()
        grads[detach] = (ours.lora_A.grad.clone(), ours.lora_B.grad.clone(), ours.magnitude.grad.clone())
    assert_close(grads[True], layer_grads)
    assert not torch.allclose(grads[False][0], layer_grads[0])  # the gradient through the norm is really left out
    assert not torch.allclose(grads[False][1], layer_grads[1])
    assert_close(grads[False][2], layer_grads[2])  # m does not enter the norm: its gradient is the same either way


def test_gradient_at_init():
    """At init B = 0: dL/dA = 0, dL/dB != 0 and dL/dm != 0, so B and m move first."""
    layer = DoRALinear(nn.Linear(6, 4), r=2, alpha=4)
    layer(torch.randn(5, 6)).pow(2).sum().backward()
    assert torch.count_nonzero(layer.lora_A.grad) == 0
    assert torch.count_nonzero(layer.lora_B.grad) > 0
    assert torch.count_nonzero(layer.magnitude.grad) > 0


# --------------------------------------------------------------------------------------------------
# Dropout


def test_dropout_matches_peft_in_train_mode_and_is_off_in_eval_mode():
    """peft: the base output sees the clean x, the update W' - W0 sees the dropped x."""
    ours, peft_model, _ = make_pair(16, 8, r=4, dropout=0.5)
    ref, _, _ = make_pair(16, 8, r=4, dropout=0.0)  # same base, same A, B and m, no dropout
    assert isinstance(ours.dropout, nn.Dropout) and ours.dropout.p == 0.5
    x = torch.randn(4, 5, 16)
    ours.train()
    peft_model.train()
    with torch.no_grad():
        update = ours.adapted_weight() - ours.base.weight  # W' - W0, (out, in)
        for seed in range(3):
            torch.manual_seed(seed)
            out = ours(x)
            torch.manual_seed(seed)
            assert_close(out, peft_model(x))  # same mask, same output
            torch.manual_seed(seed)
            dropped = F.dropout(x, 0.5, training=True)
            assert_close(out, ours.base(x) + F.linear(dropped, update))
            assert not torch.allclose(out, F.linear(dropped, ours.adapted_weight(), ours.base.bias))
        assert not torch.allclose(ours(x), ours(x))  # a fresh mask per call
        ours.eval()
        peft_model.eval()
        assert torch.equal(ours(x), ours(x))
        assert_close(ours(x), ref(x))
        assert_close(ours(x), peft_model(x))


def test_no_dropout_module_when_dropout_is_zero():
    assert isinstance(DoRALinear(nn.Linear(4, 4), r=2, alpha=4, dropout=0.0).dropout, nn.Identity)


# --------------------------------------------------------------------------------------------------
# Merge / unmerge


@layer_cases
def test_merge_unmerge(in_features, out_features, bias, r, rslora):
    ours, peft_model, _ = make_pair(in_features, out_features, bias=bias, r=r, rslora=rslora)
    w0 = ours.base.weight.detach().clone()
    b0 = ours.base.bias.detach().clone() if bias else None
    xs = inputs(in_features)
    with torch.no_grad():
        before = [ours(x) for x in xs]
        adapted = ours.adapted_weight()
        norm = ours.weight_norm()

        ours.merge()
        assert ours.merged
        merged_weight = ours.base.weight.detach().clone()
        assert_close(merged_weight, adapted)
        assert_close(torch.linalg.norm(merged_weight, dim=1), ours.magnitude.abs())  # row norms are now |m|
        assert torch.equal(ours.weight_norm(), norm)  # kept for unmerge
        assert torch.equal(ours.adapted_weight(), merged_weight)
        for x, y in zip(xs, before, strict=True):
            assert_close(ours(x), y)
            assert torch.equal(ours(x), ours.base(x))  # merged: the base alone carries W'

        ours.merge()  # idempotent
        assert ours.merged and torch.equal(ours.base.weight, merged_weight)

        peft_linear = peft_model.merge_and_unload().proj
        assert type(peft_linear) is nn.Linear
        assert_close(merged_weight, peft_linear.weight)

        ours.unmerge()
        assert not ours.merged and ours.merged_norm is None
        assert_close(ours.base.weight, w0)
        ours.unmerge()  # idempotent too
        assert not ours.merged
        assert_close(ours.base.weight, w0)
        for x, y in zip(xs, before, strict=True):
            assert_close(ours(x), y)
    if bias:
        assert torch.equal(ours.base.bias, b0)
    assert not ours.base.weight.requires_grad
    assert "merged_norm" not in ours.state_dict()


# --------------------------------------------------------------------------------------------------
# Errors

BAD_RANKS = [0, -1, 1.5, True, "4", None]
BAD_ALPHAS = [0, -1, -0.5, float("nan"), float("inf"), True]
BAD_DROPOUTS = [-0.1, 1.0, 1.5, float("nan"), True]


@pytest.mark.parametrize("r", BAD_RANKS, ids=repr)
def test_bad_rank(r):
    with pytest.raises(ValueError, match=rf"`r`.*{re.escape(repr(r))}"):
        DoRALinear(nn.Linear(4, 4), r=r, alpha=4)


@pytest.mark.parametrize("alpha", BAD_ALPHAS, ids=repr)
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match=rf"`alpha`.*{re.escape(repr(alpha))}"):
        DoRALinear(nn.Linear(4, 4), r=2, alpha=alpha)


@pytest.mark.parametrize("dropout", BAD_DROPOUTS, ids=repr)
def test_bad_dropout(dropout):
    with pytest.raises(ValueError, match=rf"`dropout`.*{re.escape(repr(dropout))}"):
        DoRALinear(nn.Linear(4, 4), r=2, alpha=4, dropout=dropout)


@pytest.mark.parametrize("base", [nn.Conv1d(4, 4, 1), nn.Embedding(10, 4), nn.LayerNorm(4), nn.Bilinear(4, 4, 4)])
def test_base_must_be_linear(base):
    with pytest.raises(TypeError, match=rf"DoRALinear.*{type(base).__name__}"):
        DoRALinear(base, r=2, alpha=4)


# --------------------------------------------------------------------------------------------------
# Parameter counts and doctests


def test_parameter_count_llama_sized():
    """4096 x 4096 at r = 16: 131,072 LoRA parameters plus 4,096 magnitudes, 3.12% more than LoRA."""
    layer = DoRALinear(nn.Linear(4096, 4096, bias=False, device="meta"), r=16, alpha=32)
    lora = layer.lora_A.numel() + layer.lora_B.numel()
    assert lora == lora_parameter_count(4096, 4096, 16) == 131_072
    assert layer.magnitude.numel() == 4_096
    trainable, total = get_nb_trainable_parameters(layer)
    assert trainable == 135_168 and total == 4096 * 4096 + trainable
    assert layer.magnitude.numel() / lora == 0.03125
    assert f"{100 * layer.magnitude.numel() / lora:.2f}%" == "3.12%"


@pytest.mark.parametrize("in_features, out_features", SHAPES)
def test_parameter_count_matches_peft(in_features, out_features):
    ours, peft_model, _ = make_pair(in_features, out_features, r=4)
    trainable = get_nb_trainable_parameters(ours)[0]
    assert trainable == lora_parameter_count(in_features, out_features, 4) + out_features
    assert trainable == peft_model.get_nb_trainable_parameters()[0]


def test_doctests():
    result = doctest.testmod(lorakit.dora, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5
    assert result.failed == 0
