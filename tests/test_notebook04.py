"""Notebook 04's graded tests (visible and hidden) accept the solution and reject the common mistakes:
rsLoRA ignored, alpha / r inverted, the square-only 2 r d budget, a forgotten rank, a rank rounded up
instead of down, answers hard-coded to the lesson's figures. No kernel, no model."""

from __future__ import annotations

import math

import pytest
import torch
from notebook_tools import graded_cells, reference_refused, run_graded, source_notebook, strip_markers
from torch import nn

from lorakit.lora import LoRALinear
from lorakit.memory import LLAMA_BLOCK_4096, MODEL_SHAPES, rank_budget

CELLS = graded_cells(source_notebook("04-rank-and-alpha"))
SOLUTIONS = ["scaling_factors", "rank_budget", "largest_rank"]


def _namespace() -> dict:
    # what the notebook imports before the exercises
    return {"math": math, "torch": torch, "nn": nn, "LoRALinear": LoRALinear, "LLAMA_BLOCK_4096": LLAMA_BLOCK_4096,
            "MODEL_SHAPES": MODEL_SHAPES, "rank_budget": rank_budget}


def run_exercise(answer_id: str, answer_source: str) -> None:
    run_graded(CELLS, answer_id, answer_source, _namespace())


@pytest.mark.parametrize("answer_id", SOLUTIONS)
def test_solution_passes_visible_and_hidden_tests(answer_id):
    run_exercise(answer_id, strip_markers(CELLS[answer_id].source))


GOOD_SCALE = "def lora_scaling(r, alpha, rslora=False):\n    return alpha / math.sqrt(r) if rslora else alpha / r\n"
GOOD_ALPHA = "def alpha_for_scaling(r, scaling, rslora=False):\n" \
    "    return scaling * math.sqrt(r) if rslora else scaling * r\n"
BLOCK = "def block_lora_params(r, shapes):\n"
LARGEST = "def largest_rank(max_params, shapes):\n    per = sum(i + o for i, o in shapes.values())\n"

MISTAKES = {
    "scaling_factors": {
        "rsLoRA ignored": "def lora_scaling(r, alpha, rslora=False):\n    return alpha / r\n" + GOOD_ALPHA,
        "r / alpha": "def lora_scaling(r, alpha, rslora=False):\n    return r / alpha\n" + GOOD_ALPHA,
        "alpha divided instead of multiplied": GOOD_SCALE
        + "def alpha_for_scaling(r, scaling, rslora=False):\n    return scaling / r\n",
        "alpha ignores rsLoRA": GOOD_SCALE
        + "def alpha_for_scaling(r, scaling, rslora=False):\n    return scaling * r\n",
        "alpha = 2r always": GOOD_SCALE + "def alpha_for_scaling(r, scaling, rslora=False):\n    return 2 * r\n",
    },
    "rank_budget": {
        "square-only 2 r d": BLOCK + "    return sum(2 * r * i for i, o in shapes.values())\n",
        "rank forgotten": BLOCK + "    return sum(i + o for i, o in shapes.values())\n",
        "full matrices": BLOCK + "    return sum(i * o for i, o in shapes.values())\n",
        "only q and v": BLOCK + "    return sum(r * (shapes[n][0] + shapes[n][1]) for n in ('q_proj', 'v_proj'))\n",
        "hard-coded lesson figure": BLOCK + "    return 1_249_280 * r // 16\n",
    },
    "largest_rank": {
        "rounded": LARGEST + "    return round(max_params / per)\n",
        "rounded up": LARGEST + "    return math.ceil(max_params / per)\n",
        "at least 1": LARGEST + "    return max(1, max_params // per)\n",
        "one too few": LARGEST + "    return max(0, max_params // per - 1)\n",
        "square-only cost": "def largest_rank(max_params, shapes):\n"
        "    return max_params // sum(2 * i for i, o in shapes.values())\n",
    },
}


@pytest.mark.parametrize("answer_id,label", [(a, label) for a, cases in MISTAKES.items() for label in cases])
def test_mistake_fails_the_tests(answer_id, label):
    with pytest.raises(Exception):  # noqa: B017  (an assertion, or the error a wrong answer raises)
        run_exercise(answer_id, MISTAKES[answer_id][label])


ALTERNATIVES = {
    "scaling_factors": {
        "powers": "def lora_scaling(r, alpha, rslora=False):\n    return float(alpha) * r ** (-0.5 if rslora else -1)\n"
        "def alpha_for_scaling(r, scaling, rslora=False):\n    return float(scaling) * r ** (0.5 if rslora else 1)\n",
        "inverse of the other": GOOD_SCALE + "def alpha_for_scaling(r, scaling, rslora=False):\n"
        "    return scaling / lora_scaling(r, 1.0, rslora)\n",
    },
    "rank_budget": {
        "a loop": BLOCK + "    total = 0\n    for d_in, d_out in shapes.values():\n"
        "        total += r * d_in + d_out * r\n    return total\n",
        "factored": BLOCK + "    return r * sum(sum(s) for s in shapes.values())\n",
    },
    "largest_rank": {
        "counting up": "def largest_rank(max_params, shapes):\n    r = 0\n"
        "    while (r + 1) * sum(i + o for i, o in shapes.values()) <= max_params:\n        r += 1\n    return r\n",
        "int of a float": LARGEST + "    return int(max_params / per)\n",
    },
}


@pytest.mark.parametrize("answer_id,label", [(a, label) for a, cases in ALTERNATIVES.items() for label in cases])
def test_other_correct_answers_pass(answer_id, label):
    run_exercise(answer_id, ALTERNATIVES[answer_id][label])


# Answers that hand the work to lorakit's own reference: the hidden tests switch it off, so they score nothing.
REFERENCE = {
    "scaling_factors": "def lora_scaling(r, alpha, rslora=False):\n"
    "    return LoRALinear(nn.Linear(2, 2), r=r, alpha=alpha, rslora=rslora).scaling\n" + GOOD_ALPHA,
    "rank_budget": "from lorakit.memory import lora_budget\n\n" + BLOCK
    + "    return lora_budget(r, list(shapes), shapes).adapter_params\n",
    "largest_rank": LARGEST.split("\n")[0] + "\n    r = 0\n"
    "    while rank_budget(ranks=(r + 1,), shapes=shapes).budgets[0].adapter_params <= max_params:\n"
    "        r += 1\n    return r\n",
}


@pytest.mark.parametrize("answer_id", list(REFERENCE))
def test_lorakit_reference_is_not_an_answer(answer_id):
    reference_refused(run_exercise, answer_id, REFERENCE[answer_id])
