"""Notebook 03's graded tests (visible and hidden) accept the solution and reject the common mistakes
the lesson names (A and B transposed, both factors random, alpha / r forgotten) and answers that are
hard-coded or only get the shapes right. Runs the test cells directly: no kernel, no model."""

from __future__ import annotations

import math

import pytest
import torch
from notebook_tools import graded_cells, run_graded, source_notebook, strip_markers
from torch import nn

from lorakit.lora import LoRALinear

CELLS = graded_cells(source_notebook("03-lora-from-scratch"))


def _namespace(seed: int) -> dict:
    torch.manual_seed(seed)
    # what the notebook defines before the exercises: imports, and section 5's real layer and input
    # (a random stand-in of the same shapes here)
    return {"math": math, "torch": torch, "nn": nn, "LoRALinear": LoRALinear,
            "fresh": LoRALinear(nn.Linear(576, 576, bias=False), r=8, alpha=16), "h": torch.randn(1, 43, 576)}


def run_exercise(answer_id: str, answer_source: str, seed: int = 0) -> None:
    run_graded(CELLS, answer_id, answer_source, _namespace(seed))


SOLUTIONS = ["lora_param_count", "init_lora_factors", "lora_forward", "lora_scaling", "max_noop_gap"]


@pytest.mark.parametrize("answer_id", SOLUTIONS)
def test_solution_passes_visible_and_hidden_tests(answer_id):
    for seed in range(5):
        run_exercise(answer_id, strip_markers(CELLS[answer_id].source), seed=seed)


MISTAKES = {
    "lora_param_count": {
        "square-only formula 2*r*d": "def lora_param_count(d_in, d_out, r):\n    return 2 * r * d_in\n",
        "hard-coded lesson figure": "def lora_param_count(d_in, d_out, r):\n    return 131072\n",
        "full matrix instead of adapter": "def lora_param_count(d_in, d_out, r):\n    return d_in * d_out\n",
    },
    "init_lora_factors": {
        "both factors random": (
            "def init_lora_factors(d_in, d_out, r):\n"
            "    A = torch.empty(r, d_in); nn.init.kaiming_uniform_(A, a=math.sqrt(5))\n"
            "    return A, torch.randn(d_out, r) * 0.01\n"
        ),
        "A and B transposed": (
            "def init_lora_factors(d_in, d_out, r):\n"
            "    A = torch.empty(d_in, r); nn.init.kaiming_uniform_(A, a=math.sqrt(5))\n"
            "    return A, torch.zeros(r, d_out)\n"
        ),
        "both zero": "def init_lora_factors(d_in, d_out, r):\n    return torch.zeros(r, d_in), torch.zeros(d_out, r)\n",
        "right shapes, wrong spread": (
            "def init_lora_factors(d_in, d_out, r):\n    return torch.randn(r, d_in), torch.zeros(d_out, r)\n"
        ),
        "constant A": (
            "def init_lora_factors(d_in, d_out, r):\n    return torch.full((r, d_in), 0.01), torch.zeros(d_out, r)\n"
        ),
    },
    "lora_forward": {
        "alpha / r forgotten": "def lora_forward(x, W0, A, B, alpha, r):\n    return x @ W0.T + (x @ A.T) @ B.T\n",
        "r / alpha instead of alpha / r": (
            "def lora_forward(x, W0, A, B, alpha, r):\n    return x @ W0.T + (r / alpha) * ((x @ A.T) @ B.T)\n"
        ),
        "A and B transposed": (
            "def lora_forward(x, W0, A, B, alpha, r):\n    return x @ W0.T + (alpha / r) * ((x @ B) @ A)\n"
        ),
        "adapter path dropped": "def lora_forward(x, W0, A, B, alpha, r):\n    return x @ W0.T\n",
        "shape only": "def lora_forward(x, W0, A, B, alpha, r):\n    return torch.zeros(*x.shape[:-1], W0.shape[0])\n",
    },
    "lora_scaling": {
        "rslora ignored": "def lora_scaling(r, alpha, rslora=False):\n    return alpha / r\n",
        "inverted": "def lora_scaling(r, alpha, rslora=False):\n    return r / alpha\n",
        "always 2.0": "def lora_scaling(r, alpha, rslora=False):\n    return 2.0\n",
    },
    "max_noop_gap": {
        "hard-coded zero": "def max_noop_gap(layer, x):\n    return 0.0\n",
        "returns a tensor": (
            "def max_noop_gap(layer, x):\n    with torch.no_grad():\n"
            "        return (layer(x) - layer.base(x)).abs().max()\n"
        ),
        "autograd left on": "def max_noop_gap(layer, x):\n    return (layer(x) - layer.base(x)).abs().max().item()\n",
        "mean instead of max": (
            "def max_noop_gap(layer, x):\n    with torch.no_grad():\n"
            "        return (layer(x) - layer.base(x)).abs().mean().item()\n"
        ),
    },
}


@pytest.mark.parametrize(
    "answer_id,label", [(a, label) for a, cases in MISTAKES.items() for label in cases]
)
def test_mistake_fails_the_tests(answer_id, label):
    with pytest.raises(Exception):  # noqa: B017  (an assertion or the error a wrong shape raises)
        run_exercise(answer_id, MISTAKES[answer_id][label])


ALTERNATIVES = {
    "lora_forward": {
        "merged weight": "def lora_forward(x, W0, A, B, alpha, r):\n    return x @ (W0 + (alpha / r) * B @ A).T\n",
        "F.linear": (
            "def lora_forward(x, W0, A, B, alpha, r):\n    F = torch.nn.functional\n"
            "    return F.linear(x, W0) + F.linear(F.linear(x, A), B) * alpha / r\n"
        ),
    },
    "init_lora_factors": {
        "uniform by hand": (
            "def init_lora_factors(d_in, d_out, r):\n    b = 1 / math.sqrt(d_in)\n"
            "    return torch.rand(r, d_in) * 2 * b - b, torch.zeros(d_out, r)\n"
        ),
    },
    "lora_param_count": {"r times the sum": "def lora_param_count(d_in, d_out, r):\n    return r * (d_in + d_out)\n"},
    "max_noop_gap": {
        "torch.max of the difference": (
            "def max_noop_gap(layer, x):\n    with torch.no_grad():\n"
            "        return float(torch.max(torch.abs(layer(x) - layer.base(x))))\n"
        ),
    },
}


@pytest.mark.parametrize(
    "answer_id,label", [(a, label) for a, cases in ALTERNATIVES.items() for label in cases]
)
def test_other_correct_answers_pass(answer_id, label):
    for seed in range(5):  # randomised checks must not fail a correct answer by chance
        run_exercise(answer_id, ALTERNATIVES[answer_id][label], seed=seed)
