"""Notebook 10's graded tests (visible and hidden) accept the solution and reject the common mistakes:
the norm over the wrong dimension (dim=0 on PyTorch's (out, in) weight), a squared or Frobenius norm, a
forgotten magnitude or alpha / r, the norm of W0 instead of V, a norm that is not detached, and extra
parameters counted per input feature or as a fraction. Runs the test cells directly: no kernel, no model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from notebook_tools import graded_cells, reference_refused, run_graded, source_notebook, strip_markers
from torch import nn
from torch.nn import functional as F

from lorakit.dora import DoRALinear, magnitude_and_direction
from lorakit.lora import lora_parameter_count
from lorakit.memory import dora_extra_params

CELLS = graded_cells(source_notebook("10-dora"))
SOLUTIONS = ["weight_magnitude", "weight_direction", "dora_forward", "dora_extra_count"]


def _namespace(seed: int) -> dict:
    # what the notebook defines before the exercises: imports, the last layer and its v_proj weight (a random
    # stand-in of the same shape here, with rows of different lengths as in the real model)
    g = torch.Generator().manual_seed(seed)
    v_proj = nn.Linear(576, 192, bias=False)
    with torch.no_grad():
        v_proj.weight.copy_(torch.randn(192, 576, generator=g) * (0.1 + 0.3 * torch.rand(192, 1, generator=g)))
    top = SimpleNamespace(self_attn=SimpleNamespace(v_proj=v_proj))
    torch.manual_seed(seed)
    return {"math": math, "torch": torch, "nn": nn, "F": F, "DoRALinear": DoRALinear,
            "magnitude_and_direction": magnitude_and_direction, "lora_parameter_count": lora_parameter_count,
            "dora_extra_params": dora_extra_params, "top": top, "W_v": v_proj.weight.detach()}


def run_exercise(answer_id: str, answer_source: str, seed: int = 0) -> None:
    run_graded(CELLS, answer_id, answer_source, _namespace(seed))


@pytest.mark.parametrize("answer_id", SOLUTIONS)
def test_solution_passes_visible_and_hidden_tests(answer_id):
    for seed in range(3):
        run_exercise(answer_id, strip_markers(CELLS[answer_id].source), seed)


MAG = "def weight_magnitude(W):\n"
DIR = "def weight_direction(W):\n"
FWD = "def dora_forward(x, W0, A, B, m, alpha, r):\n"
V = "    V = W0 + (alpha / r) * (B @ A)\n"
EXTRA = "def dora_extra_count(d_in, d_out, r):\n"

MISTAKES = {
    "weight_magnitude": {
        "norm over dim=0 (per input feature)": MAG + "    return torch.linalg.norm(W, dim=0)\n",
        "keepdim: shape (out, 1)": MAG + "    return torch.linalg.norm(W, dim=1, keepdim=True)\n",
        "squared norm": MAG + "    return (W ** 2).sum(dim=1)\n",
        "Frobenius norm of the whole matrix": MAG + "    return torch.linalg.norm(W)\n",
        "L1 norm": MAG + "    return W.abs().sum(dim=1)\n",
        "always float32": MAG + "    return torch.linalg.norm(W.float(), dim=1)\n",
    },
    "weight_direction": {
        "columns normalised (dim=0)": DIR + "    return W / torch.linalg.norm(W, dim=0, keepdim=True)\n",
        "Frobenius norm": DIR + "    return W / torch.linalg.norm(W)\n",
        "norms broadcast along the wrong axis": DIR + "    return W / torch.linalg.norm(W, dim=1)\n",
        "squared norm": DIR + "    return W / (W ** 2).sum(dim=1, keepdim=True)\n",
        "magnitude returned instead": DIR + "    return torch.linalg.norm(W, dim=1, keepdim=True).expand_as(W)\n",
    },
    "dora_forward": {
        "norm over dim=0": FWD + V + "    norm = torch.linalg.norm(V.detach(), dim=0)\n"
        "    return x @ (m[:, None] * V / norm).T\n",
        "norm not detached": FWD + V + "    norm = torch.linalg.norm(V, dim=1)\n"
        "    return x @ ((m / norm)[:, None] * V).T\n",
        "magnitude forgotten": FWD + V + "    norm = torch.linalg.norm(V.detach(), dim=1)\n"
        "    return x @ (V / norm[:, None]).T\n",
        "alpha / r forgotten": FWD + "    V = W0 + B @ A\n    norm = torch.linalg.norm(V.detach(), dim=1)\n"
        "    return x @ ((m / norm)[:, None] * V).T\n",
        "norm of W0 instead of V": FWD + V + "    norm = torch.linalg.norm(W0, dim=1)\n"
        "    return x @ ((m / norm)[:, None] * V).T\n",
        "plain LoRA, no decomposition": FWD + V + "    return x @ V.T\n",
        "A and B transposed": FWD + "    V = W0 + (alpha / r) * (A.T @ B.T)\n"
        "    norm = torch.linalg.norm(V.detach(), dim=1)\n    return x @ ((m / norm)[:, None] * V).T\n",
        "magnitude of W0 used, m ignored": FWD + V + "    norm = torch.linalg.norm(V.detach(), dim=1)\n"
        "    m0 = torch.linalg.norm(W0, dim=1)\n    return x @ ((m0 / norm)[:, None] * V).T\n",
    },
    "dora_extra_count": {
        "per input feature": EXTRA + "    return d_in, 100 * d_in / (r * (d_in + d_out))\n",
        "fraction not percent": EXTRA + "    return d_out, d_out / (r * (d_in + d_out))\n",
        "percent of the full matrix": EXTRA + "    return d_out, 100 * d_out / (d_in * d_out)\n",
        "hard-coded lesson figure": EXTRA + "    return 4096, 3.125\n",
        "square-only 2 r d": EXTRA + "    return d_out, 100 * d_out / (2 * r * d_in)\n",
        "float count": EXTRA + "    return float(d_out), 100 * d_out / (r * (d_in + d_out))\n",
    },
}


@pytest.mark.parametrize("answer_id,label", [(a, label) for a, cases in MISTAKES.items() for label in cases])
def test_mistake_fails_the_tests(answer_id, label):
    with pytest.raises(Exception):  # noqa: B017  (an assertion, or the error a wrong shape raises)
        run_exercise(answer_id, MISTAKES[answer_id][label])


ALTERNATIVES = {
    "weight_magnitude": {
        "sqrt of squares": MAG + "    return (W * W).sum(dim=1).sqrt()\n",
        "Tensor.norm": MAG + "    return W.norm(p=2, dim=-1)\n",
    },
    "weight_direction": {
        "F.normalize": DIR + "    return F.normalize(W, dim=1)\n",
        "unsqueeze": DIR + "    return W / torch.linalg.norm(W, dim=1).unsqueeze(1)\n",
    },
    "dora_forward": {
        "norm under no_grad": FWD + V + "    with torch.no_grad():\n        norm = torch.linalg.norm(V, dim=1)\n"
        "    return x @ (m[:, None] * V / norm[:, None]).T\n",
        "base output plus correction, as peft": FWD + "    s = alpha / r\n"
        "    norm = torch.linalg.norm((W0 + s * B @ A).detach(), dim=1)\n    base = F.linear(x, W0)\n"
        "    lora = F.linear(F.linear(x, A), B)\n    return (m / norm) * (base + s * lora)\n",
        "F.linear on the adapted weight": FWD + V + "    n = V.detach().pow(2).sum(1, keepdim=True).sqrt()\n"
        "    return F.linear(x, m.unsqueeze(1) * V / n)\n",
    },
    "dora_extra_count": {
        "with lorakit": EXTRA + "    return d_out, 100.0 * d_out / lora_parameter_count(d_in, d_out, r)\n",
        "int() of a product": EXTRA + "    n = int(d_out)\n    return n, n / (r * d_in + r * d_out) * 100\n",
    },
}


@pytest.mark.parametrize("answer_id,label", [(a, label) for a, cases in ALTERNATIVES.items() for label in cases])
def test_other_correct_answers_pass(answer_id, label):
    for seed in range(3):
        run_exercise(answer_id, ALTERNATIVES[answer_id][label], seed)


# Answers that hand the work to lorakit's own reference: the hidden tests switch it off, so they score nothing.
REFERENCE = {
    "weight_magnitude": MAG + "    return magnitude_and_direction(W)[0]\n",
    "weight_direction": DIR + "    return magnitude_and_direction(W)[1]\n",
    "dora_forward": FWD + "    layer = DoRALinear(nn.Linear(W0.shape[1], W0.shape[0], bias=False, dtype=W0.dtype), r=r,"
    " alpha=alpha)\n"
    "    tensors = {'base.weight': W0, 'lora_A': A, 'lora_B': B, 'magnitude': m}\n"
    "    return torch.func.functional_call(layer, tensors, (x,))\n",
}


@pytest.mark.parametrize("answer_id", list(REFERENCE))
def test_lorakit_reference_is_not_an_answer(answer_id):
    reference_refused(run_exercise, answer_id, REFERENCE[answer_id])
