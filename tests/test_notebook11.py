"""Notebook 11's graded tests (visible and hidden) accept the solution and reject the common mistakes: exact match
that forgives case or punctuation or finds the action inside a sentence, a sum instead of a mean, KL in the wrong
direction or over all entries, a gradient cut by .detach(), training state that forgets the step counter or counts
frozen parameters, MFU without the token count or with a percent. Runs the test cells directly: no kernel; a tiny
model stands in for SmolLM2."""

from __future__ import annotations

import math

import pytest
import torch
from notebook_tools import graded_cells, reference_refused, run_graded, source_notebook, strip_markers
from torch import nn
from torch.nn import functional as F

from lorakit import finetune
from lorakit.memory import measure_training_state, predict_training_state

CELLS = graded_cells(source_notebook("11-real-finetune"))
SOLUTIONS = ["exact_match_accuracy", "kl_from_logprobs", "adapter_state_bytes", "mfu"]


class _Tiny(nn.Module):
    """A frozen 'base' with a small trainable adapter, for the training-state exercise."""

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(12, 8).requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(2, 12) * 0.1)
        self.lora_B = nn.Parameter(torch.zeros(8, 2))

    def forward(self, x):
        return self.base(x) + x @ self.lora_A.T @ self.lora_B.T


def _namespace(seed: int) -> dict:
    # what the notebook defines before the exercises, at a small size: replies of a base model that never emits
    # an action, the tickets, the measured training state of an adapted model, and a finished run
    g = torch.Generator().manual_seed(seed)
    actions = ["ESCALATE", "REPLACE", "REFUND", "DENY"]
    tickets = [{"answer": actions[i % 4]} for i in range(20)]
    replies = [actions[int(torch.randint(0, 4, (1,), generator=g))] if i % 3 else "The damage to" for i in range(20)]
    acc = sum(r == t["answer"] for r, t in zip(replies, tickets, strict=True)) / len(tickets)
    torch.manual_seed(seed)
    model = _Tiny()
    measured = measure_training_state(model, {"x": torch.randn(3, 12)}, loss_fn=lambda m, b: m(b["x"]).square().sum())
    return {"math": math, "torch": torch, "F": F, "finetune": finetune, "replies_before": replies,
            "test_tickets": tickets, "task_acc_before": acc, "peft_model": model, "measured": measured,
            "predict_training_state": predict_training_state, "flops": {"flops": 3.0e8},
            "guarded_run": {"tokens": 12_000, "seconds": 30.0},
            "settings": finetune.Settings(device="cpu", dtype=torch.float32)}


def run_exercise(answer_id: str, answer_source: str, seed: int = 0) -> None:
    run_graded(CELLS, answer_id, answer_source, _namespace(seed))


@pytest.mark.parametrize("answer_id", SOLUTIONS)
def test_solution_passes_visible_and_hidden_tests(answer_id):
    for seed in range(3):
        run_exercise(answer_id, strip_markers(CELLS[answer_id].source), seed)


EM = "def exact_match_accuracy(replies, answers):\n"
KL = "def kl_from_logprobs(base_logp, tuned_logp):\n"
STATE = "def adapter_state_bytes(model):\n"
MFU = "def mfu(flops_per_token, tokens, seconds, peak_flops):\n"
MISTAKES = {
    "exact_match_accuracy": {
        "case-insensitive": EM
        + "    n = len(replies)\n    if n == 0: raise ValueError\n"
        "    p = sum(r.strip().upper() == a for r, a in zip(replies, answers)) / n\n"
        "    return float(p), float(math.sqrt(p * (1 - p) / n))\n",
        "action inside the reply": EM
        + "    n = len(replies)\n    if n == 0: raise ValueError\n"
        "    p = sum(a in r for r, a in zip(replies, answers)) / n\n"
        "    return float(p), float(math.sqrt(p * (1 - p) / n))\n",
        "no strip": EM
        + "    n = len(replies)\n    if n == 0: raise ValueError\n"
        "    p = sum(r == a for r, a in zip(replies, answers)) / n\n"
        "    return float(p), float(math.sqrt(p * (1 - p) / n))\n",
        "variance instead of standard error": EM
        + "    n = len(replies)\n    if n == 0: raise ValueError\n"
        "    p = sum(r.strip() == a for r, a in zip(replies, answers)) / n\n"
        "    return float(p), float(p * (1 - p) / n)\n",
        "empty list divides by zero": EM + "    n = len(replies)\n"
        "    p = sum(r.strip() == a for r, a in zip(replies, answers)) / n\n"
        "    return float(p), float(math.sqrt(p * (1 - p) / n))\n",
        "a tensor instead of floats": EM + "    n = len(replies)\n    if n == 0: raise ValueError\n"
        "    p = torch.tensor(sum(r.strip() == a for r, a in zip(replies, answers)) / n)\n"
        "    return p, (p * (1 - p) / n).sqrt()\n",
    },
    "kl_from_logprobs": {
        "reversed direction": KL + "    return (tuned_logp.exp() * (tuned_logp - base_logp)).sum(-1).mean()\n",
        "mean over all entries": KL + "    return (base_logp.exp() * (base_logp - tuned_logp)).mean()\n",
        "sum over rows": KL + "    return (base_logp.exp() * (base_logp - tuned_logp)).sum()\n",
        "gradient cut": KL + "    return (base_logp.exp() * (base_logp - tuned_logp)).sum(-1).mean().detach()\n",
        "kl_div with arguments swapped": KL + "    return F.kl_div(base_logp, tuned_logp, log_target=True, "
        "reduction='batchmean')\n",
        "a Python float": KL + "    return (base_logp.exp() * (base_logp - tuned_logp)).sum(-1).mean().item()\n",
    },
    "adapter_state_bytes": {
        "no step counter": STATE + "    return sum(3 * p.numel() * p.element_size() for p in model.parameters()"
        " if p.requires_grad)\n",
        "frozen parameters counted": STATE + "    return sum(3 * p.numel() * p.element_size() + 4 for p in "
        "model.parameters())\n",
        "moments only": STATE + "    return sum(2 * p.numel() * p.element_size() + 4 for p in model.parameters()"
        " if p.requires_grad)\n",
        "float32 assumed": STATE
        + "    return sum(3 * p.numel() * 4 + 4 for p in model.parameters() if p.requires_grad)\n",
        "a tensor": STATE + "    return torch.tensor(sum(3 * p.numel() * p.element_size() + 4 for p in "
        "model.parameters() if p.requires_grad))\n",
    },
    "mfu": {
        "a percent": MFU + "    if peak_flops is None: return None\n"
        "    if seconds <= 0 or peak_flops <= 0: raise ValueError\n"
        "    return 100 * flops_per_token * tokens / seconds / peak_flops\n",
        "tokens forgotten": MFU + "    if peak_flops is None: return None\n"
        "    if seconds <= 0 or peak_flops <= 0: raise ValueError\n    return flops_per_token / seconds / peak_flops\n",
        "zero when unknown": MFU + "    if peak_flops is None: return 0.0\n"
        "    if seconds <= 0 or peak_flops <= 0: raise ValueError\n"
        "    return flops_per_token * tokens / seconds / peak_flops\n",
        "no checks": MFU + "    if peak_flops is None: return None\n"
        "    return flops_per_token * tokens / max(seconds, 1e-9) / max(peak_flops, 1e-9)\n",
    },
}


@pytest.mark.parametrize(("answer_id", "mistake"), [(a, m) for a, ms in MISTAKES.items() for m in ms])
def test_common_mistakes_fail(answer_id, mistake):
    with pytest.raises((AssertionError, TypeError, ValueError, ZeroDivisionError, RuntimeError, AttributeError)):
        for seed in range(3):
            run_exercise(answer_id, MISTAKES[answer_id][mistake], seed)


ALTERNATIVES = {
    "exact_match_accuracy": EM + "    if not replies: raise ValueError('empty')\n"
    "    hits = [1.0 if r.strip() == a else 0.0 for r, a in zip(replies, answers)]\n"
    "    p = sum(hits) / len(hits)\n    return p, (p * (1 - p) / len(hits)) ** 0.5\n",
    "kl_from_logprobs": KL + "    return F.kl_div(tuned_logp, base_logp, log_target=True, reduction='batchmean')\n",
    "adapter_state_bytes": STATE
    + "    return sum(3 * p.nbytes + 4 for p in model.parameters() if p.requires_grad)\n",
    "mfu": MFU + "    if peak_flops is None:\n        return None\n    if not (seconds > 0 and peak_flops > 0):\n"
    "        raise ValueError('positive')\n    achieved = flops_per_token * tokens / seconds\n"
    "    return achieved / peak_flops\n",
}


@pytest.mark.parametrize("answer_id", list(ALTERNATIVES))
def test_valid_alternatives_pass(answer_id):
    for seed in range(3):
        run_exercise(answer_id, ALTERNATIVES[answer_id], seed)


# Answers that hand the work to lorakit's own reference: the hidden tests switch it off, so they score nothing.
REFERENCE = {
    "exact_match_accuracy": EM + "    if not replies: raise ValueError('empty')\n"
    "    hits = finetune.exact_match([r.strip() for r in replies], [{'answer': a} for a in answers])\n"
    "    p = sum(hits) / len(hits)\n    return p, (p * (1 - p) / len(hits)) ** 0.5\n",
    "adapter_state_bytes": STATE
    + "    s = predict_training_state(model)\n    return s.gradients + s.optimizer_total\n",
    "mfu": MFU + "    if peak_flops is not None and (seconds <= 0 or peak_flops <= 0):\n"
    "        raise ValueError('positive')\n"
    "    return finetune.estimate_mfu(flops_per_token, tokens / seconds, peak_flops)\n",
}


@pytest.mark.parametrize("answer_id", list(REFERENCE))
def test_lorakit_reference_is_not_an_answer(answer_id):
    reference_refused(run_exercise, answer_id, REFERENCE[answer_id])
