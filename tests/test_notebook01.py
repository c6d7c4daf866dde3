"""Notebook 01's graded tests (visible and hidden) accept the solution and reject the common mistakes:
one Adam moment instead of two, GiB instead of GB, the adapter forgotten or counted at the base's
bytes, savings computed the wrong way round. Runs the test cells directly: no kernel, no model."""

from __future__ import annotations

import pytest
from notebook_tools import graded_cells, reference_refused, run_graded, source_notebook, strip_markers

from lorakit.memory import (
    MODEL_SHAPES,
    RECIPES,
    TARGET_PRESETS,
    TrainingState,
    compare_finetuning,
    finetune_memory,
)

CELLS = graded_cells(source_notebook("01-memory-math"))
SOLUTIONS = ["bytes_per_param", "memory_table", "lora_state_gb", "lora_savings"]


def _state(params, frozen, grads, moments, act):
    return TrainingState(params, frozen, grads, {"exp_avg": moments, "exp_avg_sq": moments, "step": 4 * 272},
                         activations=act)


def _namespace() -> dict:
    # what the notebook defines before the exercises; `measured` mimics section 4's table (SmolLM2, batch 8)
    measured = {
        "full fine-tuning": _state(538_060_032, 0, 538_060_032, 538_060_032, 1_237_000_000),
        "LoRA q,v": _state(1_843_200, 538_060_032, 1_843_200, 1_843_200, 938_000_000),
        "LoRA all-linear": _state(9_768_960, 538_060_032, 9_768_960, 9_768_960, 1_133_000_000),
    }
    return {"RECIPES": RECIPES, "compare_finetuning": compare_finetuning, "MODEL_SHAPES": MODEL_SHAPES,
            "TARGET_PRESETS": TARGET_PRESETS, "finetune_memory": finetune_memory, "TrainingState": TrainingState,
            "measured": measured}


def run_exercise(answer_id: str, answer_source: str, earlier: dict[str, str] | None = None) -> None:
    before = SOLUTIONS[: SOLUTIONS.index(answer_id)]  # earlier exercises, solved as in the solution or as `earlier`
    run_graded(CELLS, answer_id, answer_source, _namespace(), before=before, replaced=earlier)


@pytest.mark.parametrize("answer_id", SOLUTIONS)
def test_solution_passes_visible_and_hidden_tests(answer_id):
    run_exercise(answer_id, strip_markers(CELLS[answer_id].source))


BPP = "def bytes_per_param(weights=2, grads=2, adam_moment=4, master=0):\n"
TABLE = "def memory_table(params_billion):\n"
LORA = "def lora_state_gb(params_billion, adapter_params, base_bytes=2, adapter_bytes=16):\n"
SAV = "def lora_savings(full, lora):\n"

MISTAKES = {
    "bytes_per_param": {
        "one Adam moment": BPP + "    return weights + grads + adam_moment + master\n",
        "master forgotten": BPP + "    return weights + grads + 2 * adam_moment\n",
        "hard-coded 12": BPP + "    return 12\n",
        "fits only the visible tests": BPP + "    return 2 if grads == 0 else 12 + master\n",
    },
    "memory_table": {
        "GiB instead of GB": TABLE + "    n = params_billion * 1e9\n"
        "    return {'full': n * 12 / 2**30, 'full + master': n * 16 / 2**30, 'frozen base': n * 2 / 2**30}\n",
        "hard-coded lesson figures": TABLE + "    return {'full': 840.0, 'full + master': 1120.0, 'frozen base': 140.0}"
        " if params_billion == 70 else {'full': 780.0, 'full + master': 1040.0, 'frozen base': 130.0}\n",
        "frozen base at 12 bytes": TABLE + "    n = params_billion\n"
        "    return {'full': n * 12.0, 'full + master': n * 16.0, 'frozen base': n * 12.0}\n",
        "integer GB": TABLE + "    n = params_billion\n"
        "    return {'full': round(n * 12), 'full + master': round(n * 16), 'frozen base': round(n * 2)}\n",
    },
    "lora_state_gb": {
        "adapter forgotten": LORA + "    return params_billion * base_bytes\n",
        "adapter at the base's bytes": LORA + "    return (params_billion * 1e9 + adapter_params) * base_bytes / 1e9\n",
        "adapter in GB twice": LORA + "    return params_billion * base_bytes + adapter_params * adapter_bytes\n",
    },
    "lora_savings": {
        "ratio instead of saving": SAV + "    return {k: getattr(lora, a) / getattr(full, a) for k, a in"
        " [('parameters', 'parameters'), ('gradients', 'gradients'), ('optimizer', 'optimizer_total'), ('activations',"
        " 'activations'), ('total', 'total')]}\n",
        "the wrong way round": SAV + "    return {k: 1 - getattr(full, a) / getattr(lora, a) for k, a in"
        " [('parameters', 'parameters'), ('gradients', 'gradients'), ('optimizer', 'optimizer_total'),"
        " ('activations', 'activations'), ('total', 'total')]}\n",
        "total without activations": SAV + "    t = lambda s: s.parameters + s.gradients + s.optimizer_total\n"
        "    return {'parameters': 1 - lora.parameters / full.parameters, 'gradients': 1 - lora.gradients /"
        " full.gradients, 'optimizer': 1 - lora.optimizer_total / full.optimizer_total, 'activations':"
        " 1 - lora.activations / full.activations, 'total': 1 - t(lora) / t(full)}\n",
    },
}


@pytest.mark.parametrize("answer_id,label", [(a, label) for a, cases in MISTAKES.items() for label in cases])
def test_mistake_fails_the_tests(answer_id, label):
    with pytest.raises(Exception):  # noqa: B017  (an assertion, or the error a wrong answer raises)
        run_exercise(answer_id, MISTAKES[answer_id][label])


ALTERNATIVES = {
    "bytes_per_param": {"sum of a list": BPP + "    return sum([weights, grads, adam_moment, adam_moment, master])\n"},
    "memory_table": {
        "without exercise 1": TABLE + "    return {'full': 12.0 * params_billion, 'full + master': 16.0 *"
        " params_billion, 'frozen base': 2.0 * params_billion}\n",
    },
    "lora_state_gb": {
        "two terms": LORA + "    return params_billion * base_bytes + adapter_params * adapter_bytes / 1e9\n",
    },
    "lora_savings": {
        "spelled out": SAV + "    return {'parameters': 1 - lora.parameters / full.parameters, 'gradients': 1 -"
        " lora.gradients / full.gradients, 'optimizer': 1 - lora.optimizer_total / full.optimizer_total,"
        " 'activations': 1 - lora.activations / full.activations, 'total': 1 - lora.total / full.total}\n",
        "as saved / full": SAV + "    f = lambda a, b: (a - b) / a\n    return {'parameters': f(full.parameters,"
        " lora.parameters), 'gradients': f(full.gradients, lora.gradients), 'optimizer': f(full.optimizer_total,"
        " lora.optimizer_total), 'activations': f(full.activations, lora.activations), 'total': f(full.total,"
        " lora.total)}\n",
    },
}


@pytest.mark.parametrize("answer_id,label", [(a, label) for a, cases in ALTERNATIVES.items() for label in cases])
def test_other_correct_answers_pass(answer_id, label):
    run_exercise(answer_id, ALTERNATIVES[answer_id][label])


# Answers that hand the work to lorakit's own reference: the hidden tests switch it off, so they score nothing.
REFERENCE = {
    "bytes_per_param": "from lorakit.memory import Recipe\n\n" + BPP
    + "    parts = [weights, grads, adam_moment, adam_moment, master]\n"
    "    return Recipe('mine', tuple(('part', b) for b in parts)).bytes_per_param\n",
    "memory_table": TABLE + "    t = compare_finetuning(params_billion)\n"
    "    return {'full': t.total_gb('full fp16 + fp32 Adam'), 'full + master':"
    " t.total_gb('full fp16 + fp32 Adam + fp32 master'), 'frozen base': t.total_gb('frozen fp16 base')}\n",
}


@pytest.mark.parametrize("answer_id", list(REFERENCE))
def test_lorakit_reference_is_not_an_answer(answer_id):
    reference_refused(run_exercise, answer_id, REFERENCE[answer_id])
