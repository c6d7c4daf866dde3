"""Notebook 02's graded tests (visible and hidden) accept the solution and reject the common mistakes:
the smallest singular values kept instead of the largest, S forgotten, V used where Vh belongs, energy
without squares, off-by-one ranks, a fraction where a percentage is asked. No kernel, no model."""

from __future__ import annotations

import pytest
import torch
from notebook_tools import graded_cells, reference_refused, run_graded, source_notebook, strip_markers

from lorakit.lora import lora_parameter_count
from lorakit.memory import square_projection_table

CELLS = graded_cells(source_notebook("02-low-rank-updates"))
SOLUTIONS = ["truncated_svd", "energy_captured", "effective_rank", "rank_table"]


def _namespace(seed: int) -> dict:
    # what the notebook defines before the exercises: section 2's matrices (same recipe, another seed)
    g = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(256, 4, generator=g) @ torch.randn(4, 256, generator=g)
    noisy = low_rank + 0.5 * torch.randn(256, 256, generator=g)
    return {"torch": torch, "noisy": noisy, "lora_parameter_count": lora_parameter_count,
            "square_projection_table": square_projection_table}


def run_exercise(answer_id: str, answer_source: str, seed: int = 0) -> None:
    run_graded(CELLS, answer_id, answer_source, _namespace(seed))


@pytest.mark.parametrize("answer_id", SOLUTIONS)
def test_solution_passes_visible_and_hidden_tests(answer_id):
    for seed in range(3):
        run_exercise(answer_id, strip_markers(CELLS[answer_id].source), seed)


SVD = "def truncated_svd(M, r):\n    U, S, Vh = torch.linalg.svd(M, full_matrices=False)\n"
EN = "def energy_captured(S, r):\n"
ER = "def effective_rank(S, threshold=0.9):\n"
GOOD_EN = EN + "    e = S.double() ** 2\n    return float(e[:r].sum() / e.sum())\n"
GOOD_ER = ER + "    e = S.double() ** 2\n    c = e.cumsum(0) / e.sum()\n" \
    "    return int((c < threshold - 1e-12).sum()) + 1\n"
TABLE = "def rank_table(d_in, d_out, ranks):\n"

MISTAKES = {
    "truncated_svd": {
        "smallest singular values": SVD + "    return U[:, -r:] @ torch.diag(S[-r:]) @ Vh[-r:]\n",
        "S forgotten": SVD + "    return U[:, :r] @ Vh[:r]\n",
        "V instead of Vh": SVD + "    V = Vh.T\n    return U[:, :r] @ torch.diag(S[:r]) @ V[:r]\n",
        "one term too many": SVD + "    return U[:, :r + 1] @ torch.diag(S[:r + 1]) @ Vh[:r + 1]\n",
        "columns truncated instead": "def truncated_svd(M, r):\n    X = M.clone()\n    X[:, r:] = 0\n    return X\n",
    },
    "energy_captured": {
        "no squares": EN + "    return float(S[:r].sum() / S.sum())\n",
        "tensor instead of float": EN + "    e = S ** 2\n    return e[:r].sum() / e.sum()\n",
        "one value too many": EN + "    e = S.double() ** 2\n    return float(e[:r + 1].sum() / e.sum())\n",
    },
    "effective_rank": {
        "off by one": ER + "    e = S.double() ** 2\n    c = e.cumsum(0) / e.sum()\n"
        "    return int((c < threshold).sum())\n",
        "strict > threshold": ER + "    e = S.double() ** 2\n    c = e.cumsum(0) / e.sum()\n"
        "    return int((c <= threshold).sum()) + 1\n",
        "no squares": ER + "    c = S.cumsum(0) / S.sum()\n    return int((c < threshold - 1e-12).sum()) + 1\n",
    },
    "rank_table": {
        "fraction not percent": TABLE + "    return {r: (r * (d_in + d_out), r * (d_in + d_out) / (d_in * d_out))"
        " for r in ranks}\n",
        "square-only 2rd": TABLE + "    return {r: (2 * r * d_in, 100 * 2 * r * d_in / (d_in * d_out))"
        " for r in ranks}\n",
        "hard-coded lesson table": TABLE + "    return {8: (65536, 0.390625), 16: (131072, 0.78125),"
        " 64: (524288, 3.125)}\n",
    },
}


@pytest.mark.parametrize("answer_id,label", [(a, label) for a, cases in MISTAKES.items() for label in cases])
def test_mistake_fails_the_tests(answer_id, label):
    with pytest.raises(Exception):  # noqa: B017  (an assertion, or the error a wrong answer raises)
        run_exercise(answer_id, MISTAKES[answer_id][label])


ALTERNATIVES = {
    "truncated_svd": {
        "scaled columns": SVD + "    return (U[:, :r] * S[:r]) @ Vh[:r]\n",
        "sum of rank-1 terms": SVD + "    return sum(S[i] * torch.outer(U[:, i], Vh[i]) for i in range(r))\n",
    },
    "energy_captured": {
        "a loop": EN + "    tot = sum(float(s) ** 2 for s in S)\n    return sum(float(s) ** 2 for s in S[:r]) / tot\n",
    },
    "effective_rank": {
        "a loop over exercise 2": GOOD_EN + ER + "    r = 1\n    while energy_captured(S, r) < threshold - 1e-12:\n"
        "        r += 1\n    return r\n",
    },
    "rank_table": {
        "a comprehension": TABLE + "    n = d_in + d_out\n"
        "    return {r: (r * n, 100.0 * r * n / d_in / d_out) for r in ranks}\n",
    },
}


@pytest.mark.parametrize("answer_id,label", [(a, label) for a, cases in ALTERNATIVES.items() for label in cases])
def test_other_correct_answers_pass(answer_id, label):
    for seed in range(3):
        run_exercise(answer_id, ALTERNATIVES[answer_id][label], seed)


# Answers that hand the work to lorakit's own reference: the hidden tests switch it off, so they score nothing.
REFERENCE = {
    "truncated_svd": "from lorakit.lowrank import truncated_svd as _mine\n\ndef truncated_svd(M, r):\n"
    "    return _mine(M, r)\n",
    "energy_captured": "import lorakit.lowrank\n\n" + EN + "    return lorakit.lowrank.energy_captured(S, r)\n",
    "effective_rank": "import lorakit.lowrank\n\n" + ER + "    return lorakit.lowrank.effective_rank(S, threshold)\n",
    "rank_table": TABLE + "    return {r: (lora_parameter_count(d_in, d_out, r),"
    " 100.0 * lora_parameter_count(d_in, d_out, r) / d_in / d_out) for r in ranks}\n",
}


@pytest.mark.parametrize("answer_id", list(REFERENCE))
def test_lorakit_reference_is_not_an_answer(answer_id):
    reference_refused(run_exercise, answer_id, REFERENCE[answer_id], 0)
