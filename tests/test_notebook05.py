"""Notebook 05's graded tests (visible and hidden) accept the solution and reject the common mistakes:
square k/v projections assumed under grouped-query attention, the layer count forgotten, "all-linear" not
handled, unknown module names skipped silently, the output head included, short names instead of full ones.
Runs the test cells directly on a tiny Llama (no kernel, no SmolLM2)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from notebook_tools import graded_cells, reference_refused, run_graded, source_notebook, strip_markers
from torch import nn

from lorakit.memory import LLAMA_BLOCK_4096, MODEL_SHAPES, finetune_memory, lora_budget  # lorakit before peft

from peft import LoraConfig, get_peft_model  # isort: skip
from transformers import LlamaConfig, LlamaForCausalLM  # isort: skip

CELLS = graded_cells(source_notebook("05-where-to-inject"))
SOLUTIONS = ["adapter_params", "predict_all_linear"]


def _namespace() -> dict:
    # what the notebook defines before the exercises; a tiny Llama stands in for SmolLM2, and `matched`
    # holds the names peft's "all-linear" wrapped on it, as section 3 does on SmolLM2
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    peft_model = get_peft_model(copy.deepcopy(tiny), LoraConfig(r=2, target_modules="all-linear"))
    matched = {"all-linear": sorted(peft_model.base_model.targeted_module_names)}
    return {"math": math, "torch": torch, "nn": nn, "LLAMA_BLOCK_4096": LLAMA_BLOCK_4096, "MODEL_SHAPES": MODEL_SHAPES,
            "finetune_memory": finetune_memory, "lora_budget": lora_budget, "smol": MODEL_SHAPES["SmolLM2-135M"],
            "LoraConfig": LoraConfig, "get_peft_model": get_peft_model, "model": tiny, "matched": matched}


def run_exercise(answer_id: str, answer_source: str) -> None:
    run_graded(CELLS, answer_id, answer_source, _namespace())


@pytest.mark.parametrize("answer_id", SOLUTIONS)
def test_solution_passes_visible_and_hidden_tests(answer_id):
    run_exercise(answer_id, strip_markers(CELLS[answer_id].source))


AP = "def adapter_params(shapes, targets, r, n_layers=1):\n"
NAMES = "    names = list(shapes) if targets == 'all-linear' else list(targets)\n"
PAL = "def predict_all_linear(model):\n    head = model.get_output_embeddings()\n"

MISTAKES = {
    "adapter_params": {
        "square matrices assumed (2 r d_in)": AP + NAMES
        + "    return n_layers * sum(2 * r * shapes[n][0] for n in names)\n",
        "n_layers ignored": AP + NAMES + "    return sum(r * sum(shapes[n]) for n in names)\n",
        "'all-linear' not handled": AP + "    return n_layers * sum(r * sum(shapes[n]) for n in targets)\n",
        "unknown names skipped": AP + NAMES
        + "    return n_layers * sum(r * sum(shapes[n]) for n in names if n in shapes)\n",
        "unknown names count zero": AP + NAMES
        + "    return n_layers * sum(r * sum(shapes.get(n, (0, 0))) for n in names)\n",
        "KeyError instead of ValueError": AP + NAMES
        + "    return n_layers * sum(r * sum(shapes[n]) for n in names)\n",
        "full matrices": AP + NAMES
        + "    return n_layers * sum(shapes[n][0] * shapes[n][1] for n in names)\n",
    },
    "predict_all_linear": {
        "output head included": "def predict_all_linear(model):\n"
        "    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}\n",
        "short names": PAL + "    return {n.rsplit('.', 1)[-1] for n, m in model.named_modules()"
        " if isinstance(m, nn.Linear) and m is not head}\n",
        "attention only": PAL + "    return {n for n, m in model.named_modules()"
        " if isinstance(m, nn.Linear) and m is not head and 'self_attn' in n}\n",
        "a list": PAL
        + "    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]\n",
        "every module but the head": PAL + "    return {n for n, m in model.named_modules() if n and m is not head}\n",
    },
}


@pytest.mark.parametrize("answer_id,label", [(a, label) for a, cases in MISTAKES.items() for label in cases])
def test_mistake_fails_the_tests(answer_id, label):
    with pytest.raises(Exception):  # noqa: B017  (an assertion, or the error a wrong answer raises)
        run_exercise(answer_id, MISTAKES[answer_id][label])


ALTERNATIVES = {
    "adapter_params": {
        "a loop": AP + "    if isinstance(targets, str):\n        targets = shapes.keys()\n    total = 0\n"
        "    for t in targets:\n        if t not in shapes:\n            raise ValueError(t)\n"
        "        d_in, d_out = shapes[t]\n        total += r * d_in + d_out * r\n    return total * n_layers\n",
    },
    "predict_all_linear": {
        "by id": "def predict_all_linear(model):\n    head = id(model.get_output_embeddings())\n    out = set()\n"
        "    for name, module in model.named_modules():\n"
        "        if isinstance(module, nn.Linear) and id(module) != head:\n            out.add(name)\n    return out\n",
        "exact type": PAL
        + "    return {n for n, m in model.named_modules() if type(m) is nn.Linear and m is not head}\n",
    },
}


@pytest.mark.parametrize("answer_id,label", [(a, label) for a, cases in ALTERNATIVES.items() for label in cases])
def test_other_correct_answers_pass(answer_id, label):
    run_exercise(answer_id, ALTERNATIVES[answer_id][label])


# Answers that hand the work to lorakit's own reference: the hidden tests switch it off, so they score nothing.
REFERENCE = {
    "adapter_params": AP + "    return n_layers * lora_budget(r, targets, shapes).adapter_params\n",
    "predict_all_linear": "import copy\n\nfrom lorakit.lora import add_lora\n\ndef predict_all_linear(model):\n"
    "    wrapped = add_lora(copy.deepcopy(model), 'all-linear', r=1, alpha=1)\n"
    "    return {n[: -len('.base')] for n, m in wrapped.named_modules() if n.endswith('.base')}\n",
}


@pytest.mark.parametrize("answer_id", list(REFERENCE))
def test_lorakit_reference_is_not_an_answer(answer_id):
    reference_refused(run_exercise, answer_id, REFERENCE[answer_id])
