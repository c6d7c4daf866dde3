"""lorakit.export against peft: the files peft's own save_pretrained writes for the same targets, and a lorakit
adapter loaded with PeftModel.from_pretrained giving the lorakit model's outputs (a tiny Llama from a config,
and SmolLM2 itself)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.dora import DoRALinear
from lorakit.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, peft_adapter_config, save_peft_adapter
from lorakit.lora import LoRALinear, add_lora


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def randomize_b(model: nn.Module, seed: int = 1) -> None:
    """B = 0 at init makes every adapter a no-op; give B values so a wrong export would show."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_B.copy_(0.1 * torch.randn(m.lora_B.shape, generator=g))


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "targets,kwargs",
    [(["q_proj", "v_proj"], {}), ("all-linear", {"rslora": True}), (["o_proj", "down_proj"], {"dropout": 0.1})],
)
def test_peft_loads_the_same_outputs(tmp_path, targets, kwargs):
    base = tiny_llama()
    ours = add_lora(copy.deepcopy(base), targets, r=4, alpha=8, **kwargs)
    randomize_b(ours)
    ours.eval()
    folder = save_peft_adapter(ours, tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    assert type(loaded).__name__ == "PeftModelForCausalLM"
    with torch.no_grad():
        expected = ours(ids()).logits
        torch.testing.assert_close(loaded(ids()).logits, expected, rtol=0, atol=1e-5)
        assert (base(ids()).logits - expected).abs().max() > 1e-3, "the adapters are not a no-op here"


def test_same_files_as_peft_save_pretrained(tmp_path):
    """Same keys, shapes and config fields as peft writes for the same targets and weights."""
    base = tiny_llama()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "peft")
    ours = add_lora(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, alpha=8)
    save_peft_adapter(ours, tmp_path / "ours")
    theirs, mine = load_file(tmp_path / "peft" / ADAPTER_WEIGHTS), load_file(tmp_path / "ours" / ADAPTER_WEIGHTS)
    assert sorted(theirs) == sorted(mine)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in mine
    assert all(theirs[k].shape == mine[k].shape and theirs[k].dtype == mine[k].dtype for k in mine)
    config_theirs = json.loads((tmp_path / "peft" / ADAPTER_CONFIG).read_text())
    config_mine = json.loads((tmp_path / "ours" / ADAPTER_CONFIG).read_text())
    for key, value in config_mine.items():
        if key != "base_model_name_or_path":
            theirs_value = config_theirs[key]
            if key == "target_modules":  # peft keeps a set: its order varies from run to run
                theirs_value, value = sorted(theirs_value), sorted(value)
            assert theirs_value == value, key


def test_partial_targets_and_mixed_ranks(tmp_path):
    """Adapters on some layers only, with different ranks and alphas: full names and rank/alpha patterns."""
    base = tiny_llama()
    ours = copy.deepcopy(base)
    add_lora(ours, ["model.layers.1.self_attn.q_proj", "model.layers.0.mlp.up_proj"], r=4, alpha=8)
    add_lora(ours, ["model.layers.1.mlp.down_proj"], r=2, alpha=3)
    randomize_b(ours, seed=2)
    config = peft_adapter_config(ours)
    assert config["r"] == 4 and config["rank_pattern"] and config["alpha_pattern"]
    assert len(config["target_modules"]) == 3
    save_peft_adapter(ours, tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    lora_a = {n: p.shape for n, p in loaded.named_parameters() if "lora_A" in n}
    assert len(lora_a) == 3 and lora_a["base_model.model.model.layers.1.mlp.down_proj.lora_A.default.weight"][0] == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids(1)).logits, ours(ids(1)).logits, rtol=0, atol=1e-5)


def test_smollm2_round_trip(tmp_path):
    from lorakit.fast import top_layer_targets
    from lorakit.models import load_smollm2

    base, tokenizer = load_smollm2()
    ours = add_lora(copy.deepcopy(base), top_layer_targets(base, 2, "all-linear"), r=8, alpha=16)
    randomize_b(ours)
    save_peft_adapter(ours, tmp_path)
    keys = load_file(tmp_path / ADAPTER_WEIGHTS)
    assert "base_model.model.model.layers.29.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 2 * 2 * 7
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    batch = tokenizer(["Kestrel order, 120 USD, delivered 3 days ago, arrived damaged."], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, ours(**batch).logits, rtol=0, atol=1e-4)


def test_bad_inputs():
    base = tiny_llama()
    with pytest.raises(ValueError, match="no lorakit LoRA adapter"):
        peft_adapter_config(base)
    with pytest.raises(TypeError, match="nn.Module"):
        peft_adapter_config("model")
    merged = add_lora(copy.deepcopy(base), ["q_proj"], r=2, alpha=4)
    merged.model.layers[0].self_attn.q_proj.merge()
    with pytest.raises(ValueError, match="merged"):
        peft_adapter_config(merged)
    dora = copy.deepcopy(base)
    dora.model.layers[0].self_attn.q_proj = DoRALinear(dora.model.layers[0].self_attn.q_proj, r=2, alpha=4)
    with pytest.raises(TypeError, match="DoRALinear"):
        peft_adapter_config(dora)
    mixed = add_lora(copy.deepcopy(base), ["model.layers.0.self_attn.q_proj"], r=2, alpha=4)
    add_lora(mixed, ["model.layers.1.self_attn.q_proj"], r=2, alpha=4, rslora=True)
    with pytest.raises(ValueError, match="use_rslora"):
        peft_adapter_config(mixed)
