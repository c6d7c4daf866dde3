"""Notebook 09's graded tests (visible and hidden) accept the solution and reject the common mistakes: 0.127
typed in, the 4 bits of the code forgotten, the second-level scales left out, the mean not added back, the scales
tiled instead of repeated, GiB instead of GB, 4.5 bits where double quantization gives 4.127, the adapter's scaling
forgotten, A and B swapped. Runs the test cells directly: no kernel, no model."""

from __future__ import annotations

import math

import pytest
import torch
from notebook_tools import graded_cells, reference_refused, run_graded, source_notebook, strip_markers
from torch import nn
from torch.nn import functional as F

from lorakit.memory import nf4_bits_per_param, qlora_storage
from lorakit.nf4 import DOUBLE_QUANT_BLOCKSIZE, NF4Tensor, dequantize_nf4, dynamic_code, quantize_nf4
from lorakit.qlora import QLoRALinear

CELLS = graded_cells(source_notebook("09-double-quant-and-qlora"))
SOLUTIONS = ["bits_per_param", "decode_absmax", "storage_table", "qlora_forward"]


def _namespace() -> dict:
    # what the notebook defines before the exercises; `plain` and `double` quantize a random stand-in for
    # SmolLM2's layer 0 gate_proj (1536 x 576) that section 1 reads from the checkpoint
    W = 0.05 * torch.randn(1536, 576, generator=torch.Generator().manual_seed(0))
    return {"math": math, "torch": torch, "nn": nn, "F": F, "NF4Tensor": NF4Tensor,
            "quantize_nf4": quantize_nf4, "dequantize_nf4": dequantize_nf4, "dynamic_code": dynamic_code,
            "DOUBLE_QUANT_BLOCKSIZE": DOUBLE_QUANT_BLOCKSIZE, "nf4_bits_per_param": nf4_bits_per_param,
            "qlora_storage": qlora_storage, "QLoRALinear": QLoRALinear, "W": W,
            "plain": quantize_nf4(W, blocksize=64), "double": quantize_nf4(W, blocksize=64, double_quant=True)}


def run_exercise(answer_id: str, answer_source: str, earlier: dict[str, str] | None = None) -> None:
    before = SOLUTIONS[: SOLUTIONS.index(answer_id)]  # earlier exercises, solved as in the solution or as `earlier`
    run_graded(CELLS, answer_id, answer_source, _namespace(), before=before, replaced=earlier)


@pytest.mark.parametrize("answer_id", SOLUTIONS)
def test_solution_passes_visible_and_hidden_tests(answer_id):
    run_exercise(answer_id, strip_markers(CELLS[answer_id].source))


BITS = "def bits_per_param(blocksize=64, double_quant=True, second_blocksize=256):\n"
DECODE = "def decode_absmax(q):\n    levels = dynamic_code()[q.absmax_code.long()]\n"
TABLE = "def storage_table(params_billion, double_quant=True, blocksize=64):\n    n = params_billion * 1e9\n"
FWD = "def qlora_forward(x, weight, A, B, scaling):\n    W0 = dequantize_nf4(weight, x.dtype)\n"

MISTAKES = {
    "bits_per_param": {
        "0.127 typed in": BITS + "    return 4.127 if double_quant else 4.5\n",
        "the 4 bits of code forgotten": BITS
        + "    return 8 / blocksize + 32 / (blocksize * second_blocksize) if double_quant else 32 / blocksize\n",
        "second-level scales left out": BITS + "    return 4 + 8 / blocksize if double_quant else 4 + 32 / blocksize\n",
        "fp16 absmax": BITS
        + "    if double_quant:\n        return 4 + 8 / blocksize + 16 / (blocksize * second_blocksize)\n"
        "    return 4 + 16 / blocksize\n",
        "second blocksize ignored": BITS
        + "    return 4 + 8 / blocksize + 32 / (blocksize * 256) if double_quant else 4 + 32 / blocksize\n",
    },
    "decode_absmax": {
        "mean not added back": DECODE
        + "    return levels * q.absmax_scale.repeat_interleave(DOUBLE_QUANT_BLOCKSIZE)[: levels.numel()]\n",
        "scales tiled instead of repeated": DECODE
        + "    return levels * q.absmax_scale.repeat(DOUBLE_QUANT_BLOCKSIZE)[: levels.numel()] + q.absmax_offset\n",
        "codes read as numbers": "def decode_absmax(q):\n"
        "    scale = q.absmax_scale.repeat_interleave(DOUBLE_QUANT_BLOCKSIZE)[: q.absmax_code.numel()]\n"
        "    return (q.absmax_code.float() / 127.5 - 1) * scale + q.absmax_offset\n",
        "first scale for every block": DECODE + "    return levels * q.absmax_scale[0] + q.absmax_offset\n",
    },
    "storage_table": {
        "GiB instead of GB": TABLE
        + "    return {'bf16': n * 2 / 2**30, 'nf4 codes': n / 2 / 2**30,"
        " 'nf4 + constants': n * bits_per_param(blocksize, double_quant) / 8 / 2**30}\n",
        "4.5 bits whatever the setting": TABLE
        + "    return {'bf16': n * 2 / 1e9, 'nf4 codes': n / 2 / 1e9, 'nf4 + constants': n * 4.5 / 8 / 1e9}\n",
        "typed-in lesson figures": TABLE
        + "    return {'bf16': 130.0, 'nf4 codes': 32.5, 'nf4 + constants': 33.5}\n",
        "constants only, codes forgotten": TABLE
        + "    return {'bf16': n * 2 / 1e9, 'nf4 codes': n / 2 / 1e9,"
        " 'nf4 + constants': n * (bits_per_param(blocksize, double_quant) - 4) / 8 / 1e9}\n",
        "bits as bytes": TABLE
        + "    return {'bf16': n * 16 / 1e9, 'nf4 codes': n * 4 / 1e9,"
        " 'nf4 + constants': n * bits_per_param(blocksize, double_quant) / 1e9}\n",
    },
    "qlora_forward": {
        "scaling forgotten": FWD + "    return x @ W0.T + (x @ A.T) @ B.T\n",
        "A and B swapped": FWD + "    return x @ W0.T + scaling * ((x @ B) @ A)\n",
        "adapter path dropped": FWD + "    return x @ W0.T\n",
        "base not transposed": FWD + "    return (x @ W0.reshape(x.shape[-1], -1)) + scaling * ((x @ A.T) @ B.T)\n",
        "scaling applied to the base": FWD + "    return scaling * (x @ W0.T) + (x @ A.T) @ B.T\n",
    },
}


@pytest.mark.parametrize("answer_id,label", [(a, label) for a, cases in MISTAKES.items() for label in cases])
def test_mistake_fails_the_tests(answer_id, label):
    with pytest.raises(Exception):  # noqa: B017  (an assertion, or the error a wrong answer raises)
        run_exercise(answer_id, MISTAKES[answer_id][label])


ALTERNATIVES = {
    "bits_per_param": {
        "bits counted per block": BITS
        + "    per_block = 4 * blocksize + (8 + 32 / second_blocksize if double_quant else 32)\n"
        "    return per_block / blocksize\n",
    },
    "decode_absmax": {
        "block index per constant": DECODE
        + "    group = torch.arange(levels.numel()) // DOUBLE_QUANT_BLOCKSIZE\n"
        "    return levels * q.absmax_scale[group] + q.absmax_offset\n",
        "pad to whole groups": DECODE
        + "    n = levels.numel(); groups = q.absmax_scale.numel()\n"
        "    padded = torch.zeros(groups * DOUBLE_QUANT_BLOCKSIZE); padded[:n] = levels\n"
        "    return (padded.view(groups, -1) * q.absmax_scale[:, None]).reshape(-1)[:n] + q.absmax_offset\n",
    },
    "storage_table": {
        "bytes per weight": TABLE
        + "    return {'bf16': 2 * params_billion, 'nf4 codes': 0.5 * params_billion,"
        " 'nf4 + constants': bits_per_param(blocksize, double_quant) / 8 * params_billion}\n",
    },
    "qlora_forward": {
        "F.linear": "def qlora_forward(x, weight, A, B, scaling):\n"
        "    return F.linear(x, weight.dequantize(x.dtype)) + scaling * F.linear(F.linear(x, A), B)\n",
        "merged weight": FWD + "    return x @ (W0 + scaling * B @ A).T\n",
    },
}


@pytest.mark.parametrize("answer_id,label", [(a, label) for a, cases in ALTERNATIVES.items() for label in cases])
def test_other_correct_answers_pass(answer_id, label):
    run_exercise(answer_id, ALTERNATIVES[answer_id][label])


def test_storage_table_builds_on_exercise_1():
    # exercise 3 uses the student's bits_per_param, as its text says: a wrong exercise 1 shows up there too
    wrong_bits = BITS + "    return 4.5\n"
    with pytest.raises(AssertionError):
        run_exercise("storage_table", strip_markers(CELLS["storage_table"].source), {"bits_per_param": wrong_bits})


# Answers that hand the work to lorakit's own reference: the hidden tests switch it off, so they score nothing.
REFERENCE = {
    "bits_per_param": BITS + "    return nf4_bits_per_param(double_quant, blocksize, second_blocksize)\n",
    "decode_absmax": "def decode_absmax(q):\n    return q.absmax_float()\n",
    "storage_table": TABLE + "    s = qlora_storage(params_billion, double_quant=double_quant, blocksize=blocksize)\n"
    "    return {'bf16': s.bf16_gb, 'nf4 codes': s.nf4_payload_gb, 'nf4 + constants': s.nf4_with_constants_gb}\n",
    "qlora_forward": "def qlora_forward(x, weight, A, B, scaling):\n"
    "    layer = QLoRALinear(weight, None, r=A.shape[0], alpha=scaling * A.shape[0])\n    with torch.no_grad():\n"
    "        layer.lora_A.copy_(A)\n        layer.lora_B.copy_(B)\n    return layer(x)\n",
}


@pytest.mark.parametrize("answer_id", list(REFERENCE))
def test_lorakit_reference_is_not_an_answer(answer_id):
    reference_refused(run_exercise, answer_id, REFERENCE[answer_id])
