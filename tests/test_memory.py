"""Tests for lorakit.memory: the lesson's figures (shared/reference/seed-figures.json), and the
prediction of one training step's memory checked byte for byte against what torch really holds
on the real SmolLM2-135M model for full fine-tuning, LoRA on q,v and LoRA on all linear layers.

The lesson prints its figures rounded; each test rounds the same way (noted where it truncates).
"""

from __future__ import annotations

import copy
import doctest
import math

import pytest
import torch
from torch import nn

import lorakit.memory
from lorakit.data import make_tickets
from lorakit.lora import add_lora
from lorakit.memory import (
    GB,
    KB,
    MB,
    MODEL_SHAPES,
    RECIPES,
    Recipe,
    compare_finetuning,
    dora_extra_params,
    finetune_memory,
    lora_budget,
    measure_training_state,
    multi_adapter_storage,
    nf4_bits_per_param,
    predict_training_state,
    qlora_storage,
    rank_budget,
    square_projection_table,
    state_memory,
)
from lorakit.train import collate

# ---------------------------------------------------------------------------------------------------
# The lesson's figures
# ---------------------------------------------------------------------------------------------------


def test_bytes_per_param_recipes():
    assert RECIPES["full fp16 + fp32 Adam"].bytes_per_param == 12
    assert RECIPES["full fp16 + fp32 Adam + fp32 master"].bytes_per_param == 16
    assert RECIPES["frozen fp16 base"].bytes_per_param == 2
    assert dict(RECIPES["full fp16 + fp32 Adam"].components) == {
        "fp16 weights": 2, "fp16 gradients": 2, "fp32 Adam moment m": 4, "fp32 Adam moment v": 4,
    }
    assert "total" in str(RECIPES["frozen fp16 base"])


def test_full_finetune_70b():
    s = state_memory(70)
    assert s.total_gb == 840
    assert s.component_gb == {
        "fp16 weights": 140, "fp16 gradients": 140, "fp32 Adam moment m": 280, "fp32 Adam moment v": 280,
    }
    assert state_memory(70, "full fp16 + fp32 Adam + fp32 master").total_gb == 1120
    assert state_memory(70, "frozen fp16 base").total_gb == 140
    table = str(s)
    assert "840" in table and table.splitlines()[0] == "full fp16 + fp32 Adam, 70B parameters"


def test_full_finetune_65b():
    c = compare_finetuning(65)
    assert c.total_gb("full fp16 + fp32 Adam") == 780
    assert c.total_gb("frozen fp16 base") == 130
    assert "780" in str(c)


def test_qlora_storage_65b():
    s = qlora_storage(65)
    assert s.bf16_gb == 130.0
    assert s.nf4_payload_gb == 32.5
    assert round(s.constant_bits_per_param, 3) == 0.127
    assert round(s.nf4_with_constants_gb, 1) == 33.5  # 65e9 * 4.127 / 8 = 33.53 GB


def test_nf4_bits_per_param_and_double_quant_saving():
    assert nf4_bits_per_param(double_quant=False) == 4.5
    assert round(nf4_bits_per_param(double_quant=True), 3) == 4.127
    assert round(nf4_bits_per_param(False) - nf4_bits_per_param(True), 3) == 0.373
    assert nf4_bits_per_param(True) == 4 + 8 / 64 + 32 / (64 * 256)


def test_target_module_budget_r16():
    qv, all_linear = lora_budget(16, ["q_proj", "v_proj"]), lora_budget(16, "all-linear")
    assert qv.adapter_params == 262_144
    assert all_linear.adapter_params == 1_249_280
    assert round(all_linear.adapter_params / qv.adapter_params, 2) == 4.77
    assert all_linear.per_module["down_proj"] == 16 * (11008 + 4096)
    assert "1,249,280" in str(all_linear)


def test_square_projection_4096():
    table = square_projection_table(4096, (8, 16, 64))
    full = table.reference.full_params
    assert full == 16_777_216
    assert math.floor(table.reference.full_bytes / MB * 10) / 10 == 33.5  # 33.55 MB: the lesson truncates
    got = [(b.r, b.adapter_params, f"{b.percent:.2g}") for b in table.budgets]
    assert got == [(8, 65_536, "0.39"), (16, 131_072, "0.78"), (64, 524_288, "3.1")]
    r8, r16, r64 = table.budgets
    assert (round(r8.adapter_bytes / KB), round(r16.adapter_bytes / KB), round(r64.adapter_bytes / MB)) == (131, 262, 1)
    assert "65,536" in str(table)


def test_rank_budget_relative_to_r16():
    table = rank_budget((4, 8, 16, 64, 256), reference_r=16)
    assert [b.adapter_params for b in table.budgets] == [312_320, 624_640, 1_249_280, 4_997_120, 19_988_480]
    assert [table.relative(b) for b in table.budgets] == [0.25, 0.5, 1.0, 4.0, 16.0]
    assert "19,988,480" in str(table)


def test_multi_adapter_storage():
    s = multi_adapter_storage(base_gb=14, adapter_mb=128, tenants=50)
    assert s.merged_gb == 700.0
    assert s.shared_gb == 20.25
    assert round(s.reduction, 1) == 34.6
    assert "20.25" in str(s)


def test_dora_extra_params():
    o = dora_extra_params(4096, 4096, 16)
    assert (o.lora_params, o.magnitude_params) == (131_072, 4096)
    assert f"{o.percent:.2f}" == "3.12"


def test_model_shapes_count_the_real_parameters(smollm2):
    base, _ = smollm2
    assert MODEL_SHAPES["SmolLM2-135M"].params == sum(p.numel() for p in base.parameters())
    assert MODEL_SHAPES["LLaMA-7B"].params == 6_738_415_616  # the published LLaMA-7B count
    assert MODEL_SHAPES["Llama-2-70B"].params == 68_976_648_192
    shapes = MODEL_SHAPES["SmolLM2-135M"].linear_shapes
    layer = base.model.layers[0]
    for name, (d_in, d_out) in shapes.items():
        module = getattr(layer.self_attn, name, None) or getattr(layer.mlp, name)
        assert (module.in_features, module.out_features) == (d_in, d_out), name


def test_finetune_memory_matches_the_recipes_and_counts_adapters(smollm2):
    base, _ = smollm2
    full = finetune_memory("LLaMA-65B", "full")
    assert math.isclose(full.total_gb, 12 * full.params / GB)
    assert math.isclose(finetune_memory("LLaMA-65B", "full", master_weights=True).total_gb, 16 * full.params / GB)
    lora = finetune_memory("LLaMA-65B", "LoRA", r=16, targets="q,v")
    assert lora.trainable == 80 * 262_144 * 2  # the lesson's 262,144 per 4096-wide block, doubled at 8192
    assert math.isclose(lora.total_gb, (2 * lora.params + 12 * lora.trainable) / GB)
    qlora = finetune_memory("LLaMA-65B", "QLoRA", r=16, targets="q,v")
    shape = MODEL_SHAPES["LLaMA-65B"]
    sixteen_bit = shape.params - shape.linear_params  # embeddings, head, norms: bitsandbytes leaves them in 16 bits
    assert sixteen_bit == 2 * 32000 * 8192 + (2 * 80 + 1) * 8192
    assert math.isclose(qlora.total_gb - 16 * qlora.trainable / GB - 2 * sixteen_bit / GB,
                        shape.linear_params * 4.127 / 8 / GB, rel_tol=1e-3)
    # SmolLM2 under QLoRA: about 111 MB of frozen base (the tied embedding in 16 bits), not the 69 MB of all in NF4
    smol = finetune_memory("SmolLM2-135M", "QLoRA", r=8, targets="all-linear")
    base_mb = sum(gb for name, gb in smol.components if "adapter" not in name and "gradients" not in name
                  and "Adam" not in name) * 1000
    assert 110 < base_mb < 112, base_mb
    assert "trainable" in str(lora) and "total" in str(lora)
    # the adapter count on SmolLM2's real shapes equals lorakit.lora's count on the real model
    model = copy.deepcopy(base)
    add_lora(model, "all-linear", r=8, alpha=16)
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert finetune_memory("SmolLM2-135M", "LoRA", r=8, targets="all-linear").trainable == real
    assert finetune_memory("SmolLM2-135M", "LoRA", r=8, targets=["k_proj"]).trainable == 30 * 8 * (576 + 192)


def test_doctests():
    result = doctest.testmod(lorakit.memory)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "shown"),
    [
        (lambda: state_memory(-70), "-70"),
        (lambda: state_memory(float("nan")), "nan"),
        (lambda: state_memory(True), "True"),
        (lambda: state_memory(70, "fp8 everything"), "'fp8 everything'"),
        (lambda: compare_finetuning(0), "0"),
        (lambda: qlora_storage("65"), "'65'"),
        (lambda: nf4_bits_per_param(blocksize=0), "0"),
        (lambda: nf4_bits_per_param(second_blocksize=2.5), "2.5"),
        (lambda: lora_budget(0), "0"),
        (lambda: lora_budget(16, "q_proj"), "'q_proj'"),
        (lambda: lora_budget(16, ["qkv"]), "'qkv'"),
        (lambda: lora_budget(16, []), "[]"),
        (lambda: lora_budget(16, ["x"], {"x": (0, 8)}), "0"),
        (lambda: square_projection_table(-1), "-1"),
        (lambda: square_projection_table(4096, ()), "()"),
        (lambda: rank_budget((4, -8)), "-8"),
        (lambda: multi_adapter_storage(tenants=0), "0"),
        (lambda: multi_adapter_storage(adapter_mb=-128), "-128"),
        (lambda: dora_extra_params(4096, 4096, 1.5), "1.5"),
        (lambda: finetune_memory("GPT-5"), "'GPT-5'"),
        (lambda: finetune_memory(method="IA3"), "'IA3'"),
        (lambda: finetune_memory(targets="mlp"), "'mlp'"),
        (lambda: finetune_memory(targets=["qkv"]), "'qkv'"),
        (lambda: finetune_memory(r=0), "0"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(call, shown):
    with pytest.raises(ValueError) as info:
        call()
    assert shown in str(info.value)


def test_custom_recipe_and_frozen_model_errors():
    half = Recipe("int8 weights", (("int8 weights", 1),))
    assert state_memory(7, half).total_gb == 7
    frozen = nn.Linear(4, 4).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter requires grad"):
        measure_training_state(frozen, {}, loss_fn=lambda m, b: m(torch.ones(1, 4)).sum())


# ---------------------------------------------------------------------------------------------------
# Prediction == measurement on a toy model, then on the real SmolLM2
# ---------------------------------------------------------------------------------------------------


def _assert_prediction_matches(predicted, measured):
    assert predicted.trainable_parameters == measured.trainable_parameters
    assert predicted.frozen_parameters == measured.frozen_parameters
    assert predicted.gradients == measured.gradients
    assert predicted.optimizer == measured.optimizer


def test_prediction_matches_measurement_on_a_tied_toy_model():
    torch.manual_seed(0)
    emb = nn.Embedding(11, 6)
    head = nn.Linear(6, 11, bias=False)
    head.weight = emb.weight  # tied, as SmolLM2's lm_head and embed_tokens
    model = nn.Sequential(emb, nn.Linear(6, 6), nn.Tanh(), head)
    batch = {"ids": torch.tensor([[1, 2, 3]])}

    def loss_fn(m, b):
        return m(b["ids"]).logsumexp(-1).mean()

    predicted = predict_training_state(model)
    measured = measure_training_state(model, batch, loss_fn=loss_fn)
    _assert_prediction_matches(predicted, measured)
    assert measured.trainable_parameters == 4 * (11 * 6 + 6 * 6 + 6)  # the tied matrix once
    assert measured.optimizer["step"] == 4 * 3  # one float32 scalar per parameter tensor
    assert measured.activations > 0 and measured.saved_parameter_bytes > 0
    assert all(p.grad is None for p in model.parameters())
    assert "activations" in str(measured) and "n/a" in str(predicted)


@pytest.fixture(scope="module")
def smollm2():
    from lorakit.models import load_smollm2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine, 2 threads ran 10x slower than 1
    model, tokenizer = load_smollm2()
    batch = collate(tokenizer, make_tickets(2, seed=0))
    yield model, batch
    torch.set_num_threads(threads)


RECIPES_ON_SMOLLM2 = {
    "full": None,
    "lora_qv": ["q_proj", "v_proj"],
    "lora_all_linear": "all-linear",
}


@pytest.mark.parametrize("recipe", list(RECIPES_ON_SMOLLM2))
def test_prediction_equals_measurement_on_smollm2(smollm2, recipe):
    base, batch = smollm2
    model = copy.deepcopy(base)
    targets = RECIPES_ON_SMOLLM2[recipe]
    if targets is None:
        model.requires_grad_(True)
    else:
        add_lora(model, targets, r=8, alpha=16)
    predicted = predict_training_state(model)
    measured = measure_training_state(model, batch, optimizer_factory=torch.optim.AdamW)
    print(f"\n{recipe}\n{measured}")
    _assert_prediction_matches(predicted, measured)

    unique = {id(p): p for p in model.parameters()}.values()
    n_trainable = sum(1 for p in unique if p.requires_grad)
    assert set(measured.optimizer) == {"exp_avg", "exp_avg_sq", "step"}
    assert measured.optimizer["step"] == 4 * n_trainable
    assert measured.parameters == 4 * sum(p.numel() for p in unique)  # fp32, tied lm_head counted once
    # LoRA does not remove activations: the frozen base still saves its inputs for the backward.
    assert measured.activations > 1 * MB
    if targets is None:
        assert measured.parameters == 538_060_032 and measured.frozen_parameters == 0
        assert measured.gradients == measured.parameters
    else:
        assert 0 < measured.trainable_parameters < 0.02 * measured.parameters
        assert measured.saved_parameter_bytes > 0  # frozen weights are saved, and are not activations
    del model
    assert measured.total < 3 * GB
