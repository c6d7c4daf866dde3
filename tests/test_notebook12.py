"""Notebook 12's graded tests (visible and hidden) accept the solution and reject the common mistakes of each
diagnostic tool: target coverage that lists adapter internals, the output head or unadapted layers; an alpha that
does not follow the rank (left alone, rounded, rsLoRA ignored, the original edited in place); a merge that returns
the adapter, mutates it, forgets the scaling or the bias; a factor check that misses an initialisation mistake or
swapped shapes; a method detector fooled by an adapter's name or by frozen parameters. Runs the test cells
directly, on small randomly initialised Llama models: no kernel, no SmolLM2."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
from notebook_tools import graded_cells, run_graded, source_notebook, strip_markers
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.lora import LoRALinear, add_lora, merge_lora

NB = source_notebook("12-debugging-lab")
CELLS = graded_cells(NB)
SOLUTIONS = ["uncovered_linear", "rescaled_config", "merge_for_serving", "check_lora_factors", "method_that_trains"]

# the notebook's own tiny_llama helper, taken from its first code cell so the two cannot drift apart
_FIRST = next(c.source for c in NB.cells if c.cell_type == "code")
TINY_LLAMA = _FIRST[_FIRST.index("def tiny_llama"):]


def _namespace() -> dict:
    # what the notebook defines before the exercises: imports, tiny_llama, and (for exercise 5's visible test) the
    # prompt-tuned model whose adapter is called "lora" (a small stand-in for the notebook's SmolLM2 one)
    ns = {"copy": copy, "json": json, "math": math, "torch": torch, "nn": nn, "LoRALinear": LoRALinear,
          "add_lora": add_lora, "merge_lora": merge_lora, "LoraConfig": LoraConfig,
          "PromptTuningConfig": PromptTuningConfig, "PrefixTuningConfig": PrefixTuningConfig,
          "get_peft_model": get_peft_model, "LlamaConfig": LlamaConfig, "LlamaForCausalLM": LlamaForCausalLM}
    exec(TINY_LLAMA, ns)
    ns["reported"] = get_peft_model(ns["tiny_llama"](11), PromptTuningConfig(task_type="CAUSAL_LM",
                                                                            num_virtual_tokens=8), adapter_name="lora")
    torch.manual_seed(0)
    return ns


def run_exercise(answer_id: str, answer_source: str) -> None:
    run_graded(CELLS, answer_id, answer_source, _namespace())


def test_tiny_llama_found():
    assert re.match(r"def tiny_llama\(", TINY_LLAMA)


@pytest.mark.parametrize("answer_id", SOLUTIONS)
def test_solution_passes_visible_and_hidden_tests(answer_id):
    run_exercise(answer_id, strip_markers(CELLS[answer_id].source))


def test_points():
    points = {k: c.metadata["nbgrader"]["points"] for k, c in CELLS.items() if c.metadata["nbgrader"].get("grade")}
    assert points == {"test_" + s: p for s, p in zip(SOLUTIONS, [3, 2, 3, 3, 2], strict=True)}


UL = "def uncovered_linear(model):\n"
PARTS = "    skip = {id(p) for m in model.modules() if hasattr(m, 'lora_A') for p in m.modules() if p is not m}\n"
RC = "def rescaled_config(config, new_r):\n"
CHECK = "    if isinstance(new_r, bool) or not isinstance(new_r, int) or new_r < 1:\n        raise ValueError(new_r)\n"
MF = "def merge_for_serving(layer):\n"
NEW = ("    b = layer.base\n    new = nn.Linear(b.in_features, b.out_features, bias=b.bias is not None,"
       " dtype=b.weight.dtype)\n")
CF = "def check_lora_factors(base, A, B):\n"
SHAPES = ("    r = A.shape[0]\n    if A.dim() != 2 or B.dim() != 2 or tuple(A.shape) != (r, base.in_features)"
          " or tuple(B.shape) != (base.out_features, r):\n        raise ValueError('shapes')\n")
ONE_ZERO = "    if bool(A.any()) == bool(B.any()):\n        raise ValueError('exactly one factor should be zero')\n"
MT = "def method_that_trains(model):\n"
TRAINABLE = ("    t = {n: p for n, p in model.named_parameters() if p.requires_grad}\n"
             "    if not t:\n        raise ValueError('nothing trains')\n")

MISTAKES = {
    "uncovered_linear": {
        "adapter parts listed (base, base_layer, default)": UL + "    ad = {n.rsplit('.', 1)[-1] for n, m in"
        " model.named_modules() if hasattr(m, 'lora_A')}\n    return sorted({n.rsplit('.', 1)[-1] for n, m in"
        " model.named_modules() if isinstance(m, nn.Linear) and '.layers.' in n} - ad)\n",
        "the output head listed": UL + PARTS + "    return sorted({n.rsplit('.', 1)[-1] for n, m in"
        " model.named_modules() if isinstance(m, nn.Linear) and not hasattr(m, 'lora_A') and id(m) not in skip})\n",
        "layers without adapters counted": UL + PARTS + "    return sorted({n.rsplit('.', 1)[-1] for n, m in"
        " model.named_modules() if isinstance(m, nn.Linear) and '.layers.' in n and not hasattr(m, 'lora_A')"
        " and id(m) not in skip})\n",
        "the adapted names instead": UL + "    return sorted({n.rsplit('.', 1)[-1] for n, m in model.named_modules()"
        " if hasattr(m, 'lora_A')})\n",
        "full names": UL + PARTS + "    ad = {n.split('.layers.')[1].split('.')[0] for n, m in model.named_modules()"
        " if hasattr(m, 'lora_A')}\n    return sorted({n for n, m in model.named_modules() if isinstance(m, nn.Linear)"
        " and '.layers.' in n and not hasattr(m, 'lora_A') and id(m) not in skip"
        " and n.split('.layers.')[1].split('.')[0] in ad})\n",
        "a set, not a list": UL + PARTS + "    ad = {n.split('.layers.')[1].split('.')[0] for n, m in"
        " model.named_modules() if hasattr(m, 'lora_A')}\n    return {n.rsplit('.', 1)[-1] for n, m in"
        " model.named_modules() if isinstance(m, nn.Linear) and '.layers.' in n and not hasattr(m, 'lora_A')"
        " and id(m) not in skip and n.split('.layers.')[1].split('.')[0] in ad}\n",
        "hard-coded q,v answer": UL + "    return ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'up_proj']\n",
        "peft only (adapters found by base_layer)": UL + "    skip = {id(p) for m in model.modules() if hasattr(m,"
        " 'base_layer') for p in m.modules() if p is not m}\n    ad = {n.split('.layers.')[1].split('.')[0] for n, m"
        " in model.named_modules() if hasattr(m, 'base_layer')}\n    return sorted({n.rsplit('.', 1)[-1] for n, m in"
        " model.named_modules() if isinstance(m, nn.Linear) and '.layers.' in n and not hasattr(m, 'base_layer')"
        " and id(m) not in skip and n.split('.layers.')[1].split('.')[0] in ad})\n",
    },
    "rescaled_config": {
        "alpha left unchanged": RC + CHECK + "    new = copy.deepcopy(config)\n    new.r = new_r\n    return new\n",
        "original edited in place": RC + CHECK + "    config.lora_alpha = config.lora_alpha * new_r / config.r\n"
        "    config.r = new_r\n    return config\n",
        "alpha = 2r whatever the old ratio": RC + CHECK + "    new = copy.deepcopy(config)\n"
        "    new.r, new.lora_alpha = new_r, 2 * new_r\n    return new\n",
        "rsLoRA ignored": RC + CHECK + "    new = copy.deepcopy(config)\n"
        "    new.r, new.lora_alpha = new_r, config.lora_alpha * new_r / config.r\n    return new\n",
        "alpha rounded": RC + CHECK + "    new = copy.deepcopy(config)\n    f = new_r / config.r\n"
        "    new.r = new_r\n"
        "    new.lora_alpha = round(config.lora_alpha * (math.sqrt(f) if config.use_rslora else f))\n"
        "    return new\n",
        "integer division": RC + CHECK + "    new = copy.deepcopy(config)\n"
        "    new.r, new.lora_alpha = new_r, config.lora_alpha // config.r * new_r\n    return new\n",
        "no validation of new_r": RC + "    new = copy.deepcopy(config)\n    f = new_r / config.r\n"
        "    new.r = new_r\n    new.lora_alpha = config.lora_alpha * (math.sqrt(f) if config.use_rslora else f)\n"
        "    return new\n",
        "a fresh config, other fields lost": RC + CHECK + "    f = new_r / config.r\n"
        "    return LoraConfig(r=new_r, lora_alpha=config.lora_alpha * (math.sqrt(f) if config.use_rslora else f),"
        " use_rslora=config.use_rslora)\n",
        "a dict": RC + CHECK + "    return {'r': new_r, 'lora_alpha': config.lora_alpha * new_r / config.r}\n",
    },
    "merge_for_serving": {
        "the unmerged base": MF + "    return layer.base\n",
        "a copy of the base, no update": MF + "    return copy.deepcopy(layer.base)\n",
        "merged in place": MF + "    layer.merge()\n    return layer.base\n",
        "the adapter itself, merged": MF + "    m = copy.deepcopy(layer)\n    m.merge()\n    return m\n",
        "scaling forgotten": MF + NEW + "    with torch.no_grad():\n        new.weight.copy_(b.weight + layer.lora_B @"
        " layer.lora_A)\n        if b.bias is not None:\n            new.bias.copy_(b.bias)\n    return new\n",
        "alpha / r even with rsLoRA": MF + NEW + "    with torch.no_grad():\n        new.weight.copy_(b.weight +"
        " layer.alpha / layer.r * layer.lora_B @ layer.lora_A)\n        if b.bias is not None:\n"
        "            new.bias.copy_(b.bias)\n    return new\n",
        "bias dropped": MF + "    b = layer.base\n    new = nn.Linear(b.in_features, b.out_features, bias=False,"
        " dtype=b.weight.dtype)\n    with torch.no_grad():\n        new.weight.copy_(b.weight + layer.delta_weight())\n"
        "    return new\n",
        "always float32": MF + "    b = layer.base\n    new = nn.Linear(b.in_features, b.out_features,"
        " bias=b.bias is not None)\n    with torch.no_grad():\n"
        "        new.weight.copy_(b.weight + layer.delta_weight())\n"
        "        if b.bias is not None:\n            new.bias.copy_(b.bias)\n    return new\n",
        "A and B transposed": MF + NEW + "    with torch.no_grad():\n"
        "        new.weight.copy_(b.weight + layer.scaling *"
        " (layer.lora_A.T @ layer.lora_B.T))\n        if b.bias is not None:\n            new.bias.copy_(b.bias)\n"
        "    return new\n",
    },
    "check_lora_factors": {
        "no initialisation check": CF + SHAPES + "    return r\n",
        "B must be zero (rejects A = 0)": CF + SHAPES + "    if B.any():\n        raise ValueError('B')\n"
        "    return r\n",
        "both zero accepted": CF + SHAPES + "    if A.any() and B.any():\n        raise ValueError('random')\n"
        "    return r\n",
        "returns True": CF + SHAPES + ONE_ZERO + "    return True\n",
        "a float rank": CF + SHAPES + ONE_ZERO + "    return float(r)\n",
        "in and out swapped": CF + "    r = A.shape[0]\n    if tuple(A.shape) != (r, base.out_features) or"
        " tuple(B.shape) != (base.in_features, r):\n        raise ValueError('shapes')\n" + ONE_ZERO + "    return r\n",
        "product shape only, RuntimeError escapes": CF + "    if (B @ A).shape != base.weight.shape:\n"
        "        raise ValueError('shape')\n" + ONE_ZERO + "    return A.shape[0]\n",
        "in_features returned": CF + SHAPES + ONE_ZERO + "    return A.shape[1]\n",
    },
    "method_that_trains": {
        "'lora' anywhere in a name": MT + TRAINABLE + "    if any('lora' in n for n in t):\n        return 'LoRA'\n"
        "    if all('prompt_encoder' in n for n in t):\n        return 'prompt tuning' if len(t) == 1 and"
        " next(iter(t.values())).shape[-1] == model.config.hidden_size else 'prefix tuning'\n"
        "    return 'full fine-tuning'\n",
        "requires_grad ignored": MT + "    t = dict(model.named_parameters())\n"
        "    if any('lora_A' in n.split('.') for n in t):\n        return 'LoRA'\n"
        "    if all('prompt_encoder' in n for n in t):\n        return 'prompt tuning'\n"
        "    return 'full fine-tuning'\n",
        "peft's own label": MT + "    cfg = model.peft_config[model.active_adapter]\n    return {'LORA': 'LoRA',"
        " 'PROMPT_TUNING': 'prompt tuning', 'PREFIX_TUNING': 'prefix tuning'}[cfg.peft_type.value]\n",
        "embedding width only (projected prefix missed)": MT + TRAINABLE + "    if all({'lora_A', 'lora_B'} &"
        " set(n.split('.')) for n in t):\n        return 'LoRA'\n    emb = [p for n, p in t.items() if"
        " n.endswith('embedding.weight')]\n    if emb:\n        return 'prompt tuning' if emb[0].shape[-1] =="
        " model.config.hidden_size else 'prefix tuning'\n    return 'full fine-tuning'\n",
        "any LoRA factor is enough": MT + TRAINABLE
        + "    if any({'lora_A', 'lora_B'} & set(n.split('.')) for n in t):\n"
        "        return 'LoRA'\n    if all('prompt_encoder' in n.split('.') for n in t):\n"
        "        (n, p), *rest = t.items()\n"
        "        return 'prompt tuning' if not rest and p.shape[-1] == model.config.hidden_size else 'prefix tuning'\n"
        "    return 'full fine-tuning'\n",
        "frozen model not an error": MT + "    t = {n: p for n, p in model.named_parameters() if p.requires_grad}\n"
        "    if t and all({'lora_A', 'lora_B'} & set(n.split('.')) for n in t):\n        return 'LoRA'\n"
        "    if t and all('prompt_encoder' in n.split('.') for n in t):\n        (n, p), *rest = t.items()\n"
        "        return 'prompt tuning' if not rest and p.shape[-1] == model.config.hidden_size else 'prefix tuning'\n"
        "    return 'full fine-tuning'\n",
        "lower-case names": MT + TRAINABLE + "    if all({'lora_A', 'lora_B'} & set(n.split('.')) for n in t):\n"
        "        return 'lora'\n    if all('prompt_encoder' in n.split('.') for n in t):\n        (n, p), *rest ="
        " t.items()\n        return 'prompt' if not rest and p.shape[-1] == model.config.hidden_size else 'prefix'\n"
        "    return 'full'\n",
    },
}


@pytest.mark.parametrize("answer_id,label", [(a, label) for a, cases in MISTAKES.items() for label in cases])
def test_mistake_fails_the_tests(answer_id, label):
    with pytest.raises(Exception):  # noqa: B017  (an assertion, or the error a wrong shape raises)
        run_exercise(answer_id, MISTAKES[answer_id][label])


ALTERNATIVES = {
    "uncovered_linear": {
        "grouped by layer with a regex": "import re\n" + UL + PARTS + "    by_layer = {}\n"
        "    for n, m in model.named_modules():\n        hit = re.search(r'layers\\.(\\d+)\\.', n)\n"
        "        if hit and id(m) not in skip:\n"
        "            entry = by_layer.setdefault(n[:hit.end()], [set(), set()])\n"
        "            if hasattr(m, 'lora_A'):\n                entry[0].add(n)\n"
        "            elif isinstance(m, nn.Linear):\n                entry[1].add(n.rsplit('.', 1)[-1])\n"
        "    return sorted({s for adapted, plain in by_layer.values() if adapted for s in plain})\n",
        "adapter parts skipped by name": UL + "    adapted = {n.split('.layers.')[1].split('.')[0] for n, m in"
        " model.named_modules() if hasattr(m, 'lora_A')}\n    names = set()\n    for n, m in model.named_modules():\n"
        "        parts = n.split('.')\n        if not isinstance(m, nn.Linear) or hasattr(m, 'lora_A') or '.layers.'"
        " not in n:\n            continue\n        if any(p in ('base', 'base_layer') or p.startswith('lora_') for p in"
        " parts):\n            continue\n        if n.split('.layers.')[1].split('.')[0] in adapted:\n"
        "            names.add(parts[-1])\n    return sorted(names)\n",
    },
    "rescaled_config": {
        "dataclasses.replace": "import dataclasses\n" + RC + CHECK + "    f = (new_r / config.r) ** (0.5 if"
        " config.use_rslora else 1)\n"
        "    return dataclasses.replace(config, r=new_r, lora_alpha=config.lora_alpha * f)\n",
        "through the multiplier": RC + CHECK + "    norm = math.sqrt if config.use_rslora else (lambda v: v)\n"
        "    s = config.lora_alpha / norm(config.r)\n    new = copy.copy(config)\n    new.r = new_r\n"
        "    new.lora_alpha = s * norm(new_r)\n    return new\n",
    },
    "merge_for_serving": {
        "merge a deep copy": MF + "    m = copy.deepcopy(layer)\n    m.merge()\n    return m.base\n",
        "merge_lora on a copy": MF + "    return merge_lora(nn.Sequential(copy.deepcopy(layer)))[0]\n",
        "copy the base, add delta_weight": MF + "    new = copy.deepcopy(layer.base)\n    with torch.no_grad():\n"
        "        new.weight += layer.delta_weight()\n    return new\n",
    },
    "check_lora_factors": {
        "product shape, RuntimeError turned into ValueError": CF + "    if A.dim() != 2 or B.dim() != 2:\n"
        "        raise ValueError('not matrices')\n    try:\n        product = B @ A\n    except RuntimeError as e:\n"
        "        raise ValueError(str(e)) from e\n    if product.shape != base.weight.shape:\n"
        "        raise ValueError('shape')\n    za, zb = bool((A == 0).all()), bool((B == 0).all())\n"
        "    if za == zb:\n        raise ValueError('init')\n    return A.shape[0]\n",
        "shapes from in/out features": CF + "    if A.ndim != 2 or B.ndim != 2:\n        raise ValueError('ndim')\n"
        "    r = int(B.shape[1])\n    if A.shape != (r, base.in_features) or B.shape != (base.out_features, r):\n"
        "        raise ValueError(f'A {tuple(A.shape)}, B {tuple(B.shape)}')\n"
        "    if int(A.count_nonzero() == 0) + int(B.count_nonzero() == 0) != 1:\n        raise ValueError('init')\n"
        "    return r\n",
    },
    "method_that_trains": {
        "dotted-name matching": MT + "    t = [(n, p) for n, p in model.named_parameters() if p.requires_grad]\n"
        "    if not t:\n        raise ValueError('frozen')\n    if all('.lora_A.' in f'.{n}.' or '.lora_B.' in f'.{n}.'"
        " for n, _ in t):\n        return 'LoRA'\n    if all('prompt_encoder.' in n for n, _ in t):\n"
        "        if len(t) == 1 and t[0][1].shape[-1] == model.config.hidden_size:\n"
        "            return 'prompt tuning'\n"
        "        return 'prefix tuning'\n    return 'full fine-tuning'\n",
        "transform checked first": MT + TRAINABLE + "    names = list(t)\n    if all(re.search(r'\\.lora_[AB](\\.|$)',"
        " n) for n in names):\n        return 'LoRA'\n    if all(n.startswith('prompt_encoder.') for n in names):\n"
        "        if any('.transform.' in n for n in names):\n            return 'prefix tuning'\n"
        "        width = t[names[0]].shape[-1]\n        return 'prompt tuning' if width =="
        " model.get_input_embeddings().embedding_dim else 'prefix tuning'\n    return 'full fine-tuning'\n",
    },
}


@pytest.mark.parametrize("answer_id,label", [(a, label) for a, cases in ALTERNATIVES.items() for label in cases])
def test_other_correct_answers_pass(answer_id, label):
    source = ALTERNATIVES[answer_id][label]
    if "re.search" in source and "import re" not in source:
        source = "import re\n" + source
    run_exercise(answer_id, source)
