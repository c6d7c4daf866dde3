"""Notebook 07's graded tests (visible and hidden) accept the solution and reject the common mistakes: prompt and
prefix tuning told apart by name alone (they share it), by the wrong dimension, or without the projected prefix's
MLP; prefix counts without the key-and-value factor, without layers, or with the hidden size where grouped-query
attention makes keys and values narrower; answers hard-coded to the visible tests. No kernel, no model."""

from __future__ import annotations

import pytest
from notebook_tools import graded_cells, run_graded, source_notebook, strip_markers

CELLS = graded_cells(source_notebook("07-peft-family"))
SOLUTIONS = ["name_method", "prompt_learning_params"]


def run_exercise(answer_id: str, answer_source: str) -> None:
    run_graded(CELLS, answer_id, answer_source, {})


@pytest.mark.parametrize("answer_id", SOLUTIONS)
def test_solution_passes_visible_and_hidden_tests(answer_id):
    run_exercise(answer_id, strip_markers(CELLS[answer_id].source))


NAME = "def name_method(trainable, hidden_size):\n"
COUNT = "def prompt_learning_params(num_virtual_tokens, hidden_size, num_layers, kv_width):\n"

MISTAKES = {
    "name_method": {
        "name only": NAME + "    return 'lora' if any('lora' in n for n in trainable) else 'prompt'\n",
        "first dimension": NAME + "    if any('lora_A' in n for n in trainable):\n        return 'lora'\n"
        "    if any('transform' in n for n in trainable):\n        return 'prefix'\n"
        "    return 'prompt' if next(iter(trainable.values()))[0] == hidden_size else 'prefix'\n",
        "projection missed": NAME + "    if any('lora_A' in n for n in trainable):\n        return 'lora'\n"
        "    w = trainable[[n for n in trainable if n.endswith('embedding.weight')][0]][-1]\n"
        "    return 'prompt' if w == hidden_size else 'prefix'\n",
        "hard-coded SmolLM2 widths": NAME + "    if any('lora' in n for n in trainable):\n        return 'lora'\n"
        "    return 'prefix' if 11520 in next(iter(trainable.values())) else 'prompt'\n",
        "parameter count threshold": NAME + "    if any('lora' in n for n in trainable):\n        return 'lora'\n"
        "    total = 1\n    for d in next(iter(trainable.values())):\n        total *= d\n"
        "    return 'prompt' if total < 10_000 else 'prefix'\n",
    },
    "prompt_learning_params": {
        "values forgotten (no x2)": COUNT + "    return {'prompt': num_virtual_tokens * hidden_size,"
        " 'prefix': num_virtual_tokens * num_layers * kv_width}\n",
        "hidden instead of kv_width": COUNT + "    return {'prompt': num_virtual_tokens * hidden_size,"
        " 'prefix': num_virtual_tokens * num_layers * 2 * hidden_size}\n",
        "layers forgotten": COUNT + "    return {'prompt': num_virtual_tokens * hidden_size,"
        " 'prefix': num_virtual_tokens * 2 * kv_width}\n",
        "prompt per layer": COUNT + "    return {'prompt': num_virtual_tokens * hidden_size * num_layers,"
        " 'prefix': num_virtual_tokens * num_layers * 2 * kv_width}\n",
        "hard-coded": COUNT + "    return {'prompt': 4608, 'prefix': 92160}\n",
    },
}


@pytest.mark.parametrize("answer_id,label", [(a, label) for a, cases in MISTAKES.items() for label in cases])
def test_mistake_fails_the_tests(answer_id, label):
    with pytest.raises(Exception):  # noqa: B017  (an assertion, or the error a wrong answer raises)
        run_exercise(answer_id, MISTAKES[answer_id][label])


ALTERNATIVES = {
    "name_method": {
        "shape scan": NAME + "    if any(('.lora_A.' in n) or ('.lora_B.' in n) for n in trainable):\n"
        "        return 'lora'\n"
        "    if any('.transform.' in n for n in trainable):\n        return 'prefix'\n"
        "    widths = {s[-1] for n, s in trainable.items() if 'embedding' in n}\n"
        "    return 'prompt' if widths == {hidden_size} else 'prefix'\n",
    },
    "prompt_learning_params": {
        "named steps": COUNT + "    per_token_prefix = num_layers * 2 * kv_width\n"
        "    return dict(prompt=hidden_size * num_virtual_tokens, prefix=per_token_prefix * num_virtual_tokens)\n",
    },
}


@pytest.mark.parametrize("answer_id,label", [(a, label) for a, cases in ALTERNATIVES.items() for label in cases])
def test_other_correct_answers_pass(answer_id, label):
    run_exercise(answer_id, ALTERNATIVES[answer_id][label])
