"""Notebook 06's graded tests (visible and hidden) accept the solution and reject the common mistakes: A and B
swapped or the scale forgotten in the merge, W0 changed in place, every adapter applied to every row (or one adapter
to all rows) in a mixed batch, "__base__" rows given an adapter, the base forgotten or the wrong unit in the
storage plan, and answers hard-coded to the lesson's figures. Runs the test cells directly: no kernel, no model."""

from __future__ import annotations

import pytest
import torch
from notebook_tools import graded_cells, reference_refused, run_graded, source_notebook, strip_markers

from lorakit.lora import LoRALinear
from lorakit.memory import multi_adapter_storage

CELLS = graded_cells(source_notebook("06-merge-and-serve"))
SOLUTIONS = ["merge_weight", "mixed_lora_forward", "storage_plan"]


def _namespace(seed: int) -> dict:
    torch.manual_seed(seed)
    return {"torch": torch, "LoRALinear": LoRALinear, "multi_adapter_storage": multi_adapter_storage}


def run_exercise(answer_id: str, answer_source: str, seed: int = 0) -> None:
    run_graded(CELLS, answer_id, answer_source, _namespace(seed))


@pytest.mark.parametrize("answer_id", SOLUTIONS)
def test_solution_passes_visible_and_hidden_tests(answer_id):
    for seed in range(3):
        run_exercise(answer_id, strip_markers(CELLS[answer_id].source), seed)


MERGE = "def merge_weight(W0, A, B, alpha, r):\n"
MIXED = "def mixed_lora_forward(x, W0, adapters, names):\n"
STORE = "def storage_plan(base_gb, adapter_mb, tenants, mb_per_gb=1024):\n"

MISTAKES = {
    "merge_weight": {
        "scale forgotten": MERGE + "    return W0 + B @ A\n",
        "r / alpha": MERGE + "    return W0 + (r / alpha) * (B @ A)\n",
        "A @ B (transposed)": MERGE + "    return W0 + (alpha / r) * (A.T @ B.T)\n",
        "in place": MERGE + "    W0 += (alpha / r) * (B @ A)\n    return W0\n",
        "hard-coded lesson": MERGE + "    return torch.tensor([[2.0, 1.0], [5.0, 2.0]])\n",
    },
    "mixed_lora_forward": {
        "every adapter on every row": MIXED + "    out = x @ W0.T\n    for A, B, s in adapters.values():\n"
        "        out = out + s * (x @ A.T) @ B.T\n    return out\n",
        "first row's adapter for all": MIXED + "    A, B, s = adapters[names[0]]\n"
        "    return x @ W0.T + s * (x @ A.T) @ B.T\n",
        "base rows get an adapter": MIXED + "    out = x @ W0.T\n    first = next(iter(adapters.values()))\n"
        "    for i, n in enumerate(names):\n        A, B, s = adapters.get(n, first)\n"
        "        out[i] = out[i] + s * B @ (A @ x[i])\n    return out\n",
        "scaling forgotten": MIXED + "    out = x @ W0.T\n    for i, n in enumerate(names):\n"
        "        if n != '__base__':\n            A, B, s = adapters[n]\n            out[i] = out[i] + B @ (A @ x[i])\n"
        "    return out\n",
        "base path forgotten": MIXED + "    out = torch.zeros(x.shape[0], W0.shape[0])\n"
        "    for i, n in enumerate(names):\n"
        "        if n != '__base__':\n            A, B, s = adapters[n]\n            out[i] = s * B @ (A @ x[i])\n"
        "    return out\n",
    },
    "storage_plan": {
        "base forgotten": STORE + "    m = tenants * base_gb\n    s = tenants * adapter_mb / mb_per_gb\n"
        "    return m, s, m / s\n",
        "MB as GB": STORE + "    m = tenants * base_gb\n    s = base_gb + tenants * adapter_mb\n"
        "    return m, s, m / s\n",
        "unit ignored (1000)": STORE + "    m = tenants * base_gb\n    s = base_gb + tenants * adapter_mb / 1000\n"
        "    return m, s, m / s\n",
        "ratio inverted": STORE + "    m = tenants * base_gb\n    s = base_gb + tenants * adapter_mb / mb_per_gb\n"
        "    return m, s, s / m\n",
        "hard-coded lesson": STORE + "    return 700.0, 20.25, 700 / 20.25\n",
    },
}


@pytest.mark.parametrize("answer_id,label", [(a, label) for a, cases in MISTAKES.items() for label in cases])
def test_mistake_fails_the_tests(answer_id, label):
    with pytest.raises(Exception):  # noqa: B017  (an assertion, or the error a wrong answer raises)
        run_exercise(answer_id, MISTAKES[answer_id][label])


ALTERNATIVES = {
    "merge_weight": {
        "einsum": MERGE + "    return W0 + alpha / r * torch.einsum('or,ri->oi', B, A)\n",
        "clone then add_": MERGE + "    W = W0.clone()\n    W.add_(B @ A, alpha=alpha / r)\n    return W\n",
    },
    "mixed_lora_forward": {
        "row by row": MIXED + "    rows = []\n    for i, n in enumerate(names):\n        y = W0 @ x[i]\n"
        "        if n != '__base__':\n            A, B, s = adapters[n]\n            y = y + s * (B @ (A @ x[i]))\n"
        "        rows.append(y)\n    return torch.stack(rows)\n",
        "masks": MIXED + "    out = x @ W0.T\n    for n, (A, B, s) in adapters.items():\n"
        "        mask = torch.tensor([m == n for m in names], dtype=x.dtype)[:, None]\n"
        "        out = out + mask * (s * (x @ A.T) @ B.T)\n    return out\n",
    },
    "storage_plan": {
        "ratio first": STORE + "    merged, shared = tenants * base_gb, base_gb + tenants * adapter_mb / mb_per_gb\n"
        "    return (merged, shared, merged / shared)\n",
    },
}


@pytest.mark.parametrize("answer_id,label", [(a, label) for a, cases in ALTERNATIVES.items() for label in cases])
def test_other_correct_answers_pass(answer_id, label):
    for seed in range(3):
        run_exercise(answer_id, ALTERNATIVES[answer_id][label], seed)


# Answers that hand the work to lorakit's own reference: the hidden tests switch it off, so they score nothing.
REFERENCE = {
    "merge_weight": MERGE + "    d_out, d_in = W0.shape\n"
    "    layer = LoRALinear(torch.nn.Linear(d_in, d_out, bias=False, dtype=W0.dtype), r=r, alpha=alpha)\n"
    "    with torch.no_grad():\n        layer.base.weight.copy_(W0)\n        layer.lora_A.copy_(A)\n"
    "        layer.lora_B.copy_(B)\n        return W0 + layer.delta_weight()\n",
    "storage_plan": STORE + "    s = multi_adapter_storage(base_gb, adapter_mb, tenants, mb_per_gb)\n"
    "    return s.merged_gb, s.shared_gb, s.reduction\n",
}


@pytest.mark.parametrize("answer_id", list(REFERENCE))
def test_lorakit_reference_is_not_an_answer(answer_id):
    reference_refused(run_exercise, answer_id, REFERENCE[answer_id])
