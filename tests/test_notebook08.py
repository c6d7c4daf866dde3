"""Notebook 08's graded tests (visible and hidden) accept the solution and reject the common mistakes: a
symmetric code, the paper's formula with its end terms clipped, a table typed in, rounding without the absmax
scaling, scaling by the maximum instead of the absolute maximum, a uniform grid, the low nibble first, the block
scales tiled instead of repeated, the padding nibble kept. Runs the test cells directly: no kernel, no model."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from notebook_tools import graded_cells, reference_refused, run_graded, source_notebook, strip_markers

from lorakit.nf4 import NF4_CODE, NF4_OFFSET, NF4Tensor, dequantize_nf4, nf4_code, quantize_nf4

CELLS = graded_cells(source_notebook("08-nf4-from-scratch"))
SOLUTIONS = ["nf4_table", "quantize_block", "pack_codes", "dequantize"]


def _namespace() -> dict:
    # what the notebook imports before the exercises
    return {"math": math, "statistics": statistics, "torch": torch, "NF4_CODE": NF4_CODE, "NF4_OFFSET": NF4_OFFSET,
            "NF4Tensor": NF4Tensor, "dequantize_nf4": dequantize_nf4, "nf4_code": nf4_code,
            "quantize_nf4": quantize_nf4}


def run_exercise(answer_id: str, answer_source: str) -> None:
    run_graded(CELLS, answer_id, answer_source, _namespace())


@pytest.mark.parametrize("answer_id", SOLUTIONS)
def test_solution_passes_visible_and_hidden_tests(answer_id):
    run_exercise(answer_id, strip_markers(CELLS[answer_id].source))


TABLE = "def nf4_table(offset=NF4_OFFSET):\n    q = statistics.NormalDist().inv_cdf\n"
BLOCK = "def quantize_block(block, code=NF4_CODE):\n"
PACK = "def pack_codes(codes):\n"
DEQ = "def dequantize(q):\n    n = math.prod(q.shape)\n"
UNPACK = "    codes = torch.stack([q.data >> 4, q.data & 15], dim=1).reshape(-1)[:n]\n"

MISTAKES = {
    "nf4_table": {
        "symmetric code (8 levels each side, no zero)": TABLE
        + "    pos = [q(p) for p in torch.linspace(offset, 0.5, 9).tolist()[:-1]]\n"
        "    t = torch.tensor(sorted([-v for v in pos] + pos), dtype=torch.float32)\n    return t / t.max()\n",
        "symmetric with a zero (17 values)": TABLE
        + "    pos = [q(p) for p in torch.linspace(offset, 0.5, 9).tolist()[:-1]]\n"
        "    t = torch.tensor(sorted([-v for v in pos] + [0.0] + pos), dtype=torch.float32)\n    return t / t.max()\n",
        "paper's formula, end terms clipped": TABLE
        + "    p = [min(max(i / 17, 1e-4), 1 - 1e-4) for i in range(18)]\n"
        "    t = torch.tensor([(q(p[i]) + q(p[i + 1])) / 2 for i in range(16)], dtype=torch.float32)\n"
        "    return t / t.abs().max()\n",
        "not normalised": TABLE
        + "    pos = [q(p) for p in torch.linspace(offset, 0.5, 9).tolist()[:-1]]\n"
        "    neg = [-q(p) for p in torch.linspace(offset, 0.5, 8).tolist()[:-1]]\n"
        "    return torch.tensor(sorted(neg + [0.0] + pos), dtype=torch.float32)\n",
        "typed-in table": TABLE + "    return NF4_CODE.clone()\n",
        "offset ignored": TABLE
        + "    pos = [q(p) for p in torch.linspace(NF4_OFFSET, 0.5, 9).tolist()[:-1]]\n"
        "    neg = [-q(p) for p in torch.linspace(NF4_OFFSET, 0.5, 8).tolist()[:-1]]\n"
        "    t = torch.tensor(sorted(neg + [0.0] + pos), dtype=torch.float32)\n    return t / t.max()\n",
        "float64 result": TABLE
        + "    pos = [q(p) for p in torch.linspace(offset, 0.5, 9).tolist()[:-1]]\n"
        "    neg = [-q(p) for p in torch.linspace(offset, 0.5, 8).tolist()[:-1]]\n"
        "    t = torch.tensor(sorted(neg + [0.0] + pos), dtype=torch.float64)\n    return t / t.max()\n",
    },
    "quantize_block": {
        "no absmax scaling": BLOCK
        + "    am = block.abs().max().item()\n"
        "    return am, (block[:, None] - code[None, :]).abs().argmin(1)\n",
        "max instead of absmax": BLOCK
        + "    am = block.max().item()\n"
        "    if am == 0:\n        return 0.0, torch.full(block.shape, 7)\n"
        "    return am, (block[:, None] / am - code[None, :]).abs().argmin(1)\n",
        "uniform grid instead of the code": BLOCK
        + "    am = block.abs().max().item()\n"
        "    if am == 0:\n        return 0.0, torch.full(block.shape, 7)\n"
        "    return am, ((block / am + 1) * 7.5).round().long().clamp(0, 15)\n",
        "zero block not handled": BLOCK
        + "    am = block.abs().max().item()\n"
        "    return am, (block[:, None] / am - code[None, :]).abs().argmin(1)\n",
        "NF4 hard-coded, code argument ignored": BLOCK
        + "    am = block.abs().max().item()\n"
        "    if am == 0:\n        return 0.0, torch.full(block.shape, 7)\n"
        "    return am, (block[:, None] / am - NF4_CODE[None, :]).abs().argmin(1)\n",
        "returns the levels, not their indices": BLOCK
        + "    am = block.abs().max().item()\n"
        "    if am == 0:\n        return 0.0, torch.zeros(block.shape)\n"
        "    return am, code[(block[:, None] / am - code[None, :]).abs().argmin(1)]\n",
    },
    "pack_codes": {
        "low nibble first": PACK + "    return (codes[1::2] << 4) | codes[0::2]\n",
        "no shift": PACK + "    return codes[0::2] + codes[1::2]\n",
        "int64 result": PACK + "    return codes[0::2].long() * 16 + codes[1::2].long()\n",
        "one code per byte": PACK + "    return codes.clone()\n",
    },
    "dequantize": {
        "low nibble first": DEQ
        + "    codes = torch.stack([q.data & 15, q.data >> 4], dim=1).reshape(-1)[:n]\n"
        "    return (NF4_CODE[codes.long()] * q.absmax.repeat_interleave(q.blocksize)[:n]).reshape(q.shape)\n",
        "absmax tiled instead of repeated": DEQ + UNPACK
        + "    return (NF4_CODE[codes.long()] * q.absmax.repeat(q.blocksize)[:n]).reshape(q.shape)\n",
        "absmax forgotten": DEQ + UNPACK + "    return NF4_CODE[codes.long()].reshape(q.shape)\n",
        "ragged block assumed away": DEQ + UNPACK
        + "    return (NF4_CODE[codes.long()].view(-1, q.blocksize) * q.absmax[:, None]).reshape(q.shape)\n",
        "padding nibble kept": DEQ
        + "    codes = torch.stack([q.data >> 4, q.data & 15], dim=1).reshape(-1)\n"
        "    scale = q.absmax.repeat_interleave(q.blocksize)[: codes.numel()]\n"
        "    return (NF4_CODE[codes.long()][: scale.numel()] * scale).reshape(q.shape)\n",
    },
}


@pytest.mark.parametrize("answer_id,label", [(a, label) for a, cases in MISTAKES.items() for label in cases])
def test_mistake_fails_the_tests(answer_id, label):
    with pytest.raises(Exception):  # noqa: B017  (an assertion, or the error a wrong answer raises)
        run_exercise(answer_id, MISTAKES[answer_id][label])


ALTERNATIVES = {
    "nf4_table": {
        "float64 throughout, cast at the end": TABLE
        + "    pos = [q(p) for p in torch.linspace(offset, 0.5, 9, dtype=torch.float64).tolist()[:-1]]\n"
        "    neg = [-q(p) for p in torch.linspace(offset, 0.5, 8, dtype=torch.float64).tolist()[:-1]]\n"
        "    t = torch.tensor(sorted(neg + [0.0] + pos), dtype=torch.float64)\n    return (t / t.max()).float()\n",
        "plain Python spacing and a loop": (
            "def nf4_table(offset=NF4_OFFSET):\n    Q = statistics.NormalDist().inv_cdf\n    vals = [0.0]\n"
            "    for i in range(8):\n        vals.append(Q(offset - i * (offset - 0.5) / 8))\n"
            "    for i in range(7):\n        vals.append(-Q(offset - i * (offset - 0.5) / 7))\n"
            "    vals.sort()\n    top = max(vals)\n"
            "    return torch.tensor([v / top for v in vals], dtype=torch.float32)\n"
        ),
        "scipy's norm.ppf": (
            "def nf4_table(offset=NF4_OFFSET):\n    from scipy.stats import norm\n"
            "    pos = norm.ppf(torch.linspace(offset, 0.5, 9)[:-1].numpy()).tolist()\n"
            "    neg = (-norm.ppf(torch.linspace(offset, 0.5, 8)[:-1].numpy())).tolist()\n"
            "    t = torch.tensor(sorted(neg + [0.0] + pos)).float()\n    return t / t.max()\n"
        ),
    },
    "quantize_block": {
        "bucketize against the midpoints": BLOCK
        + "    am = float(block.abs().max())\n"
        "    if am == 0:\n        return 0.0, torch.full_like(block, 7, dtype=torch.long)\n"
        "    mids = (code[1:] + code[:-1]) / 2\n    return am, torch.bucketize(block / am, mids)\n",
        "a 0-d tensor absmax and uint8 indices": BLOCK
        + "    am = block.abs().amax()\n"
        "    if am == 0:\n        return am, torch.full(block.shape, 7, dtype=torch.uint8)\n"
        "    return am, torch.argmin(torch.abs((block / am).unsqueeze(-1) - code), dim=-1).to(torch.uint8)\n",
    },
    "pack_codes": {
        "multiply and add": PACK + "    return codes[0::2] * 16 + codes[1::2]\n",
        "view as pairs": PACK + "    pairs = codes.view(-1, 2).long()\n"
        "    return (pairs[:, 0] * 16 + pairs[:, 1]).to(torch.uint8)\n",
    },
    "dequantize": {
        "divide and modulo, pad the absmax": DEQ
        + "    hi, lo = q.data // 16, q.data % 16\n"
        "    codes = torch.empty(2 * q.data.numel(), dtype=torch.long)\n"
        "    codes[0::2], codes[1::2] = hi.long(), lo.long()\n"
        "    nb = q.absmax.numel()\n    padded = torch.zeros(nb * q.blocksize)\n"
        "    padded[:n] = NF4_CODE[codes[:n]]\n"
        "    return (padded.view(nb, q.blocksize) * q.absmax[:, None]).reshape(-1)[:n].reshape(q.shape)\n",
        "block index per value": DEQ + UNPACK
        + "    block = torch.arange(n) // q.blocksize\n"
        "    return (NF4_CODE[codes.long()] * q.absmax[block]).view(q.shape)\n",
    },
}


@pytest.mark.parametrize("answer_id,label", [(a, label) for a, cases in ALTERNATIVES.items() for label in cases])
def test_other_correct_answers_pass(answer_id, label):
    run_exercise(answer_id, ALTERNATIVES[answer_id][label])


# Answers that hand the work to lorakit's own reference: the hidden tests switch it off, so they score nothing.
REFERENCE = {
    "nf4_table": "def nf4_table(offset=NF4_OFFSET):\n    return nf4_code(offset)\n",
    "quantize_block": BLOCK + "    q = quantize_nf4(block, blocksize=block.numel() + block.numel() % 2)\n"
    "    codes = torch.stack([q.data >> 4, q.data & 15], dim=1).reshape(-1)[: block.numel()]\n"
    "    if code is not NF4_CODE:\n"
    "        scaled = block / block.abs().max()\n"
    "        codes = (scaled[:, None] - code[None, :]).abs().argmin(dim=1)\n"
    "    return q.absmax[0].item(), codes.long()\n",
    "dequantize": "def dequantize(q):\n    return dequantize_nf4(q)\n",
}
# The pure-torch path behind dequantize_nf4, and lorakit.native's C kernel, are switched off too.
REFERENCE_PARTS = {
    "torch path": "def dequantize(q):\n    from lorakit.nf4 import _dequantize_torch\n"
    "    return _dequantize_torch(q, q.absmax_float()).view(q.shape)\n",
    "C kernel": "def dequantize(q):\n    import lorakit.native\n    out = torch.empty(q.shape)\n"
    "    lorakit.native.dequantize_into(q.data, q.absmax_float(), NF4_CODE, out, q.blocksize)\n    return out\n",
    "the kernel's C function": "def dequantize(q):\n    import lorakit.native\n    out = torch.empty(q.shape)\n"
    "    lorakit.native.library().lorakit_nf4_dequantize(q.data.data_ptr(), q.absmax_float().data_ptr(),\n"
    "        NF4_CODE.data_ptr(), out.data_ptr(), out.numel(), q.blocksize, 0, 1)\n    return out\n",
}
# Not closed: a library handle kept from before the hidden tests, or ctypes.CDLL on the built file (as open as
# calling bitsandbytes' own dequantize_4bit, which the notebook uses as the oracle).


@pytest.mark.parametrize("answer_id", list(REFERENCE))
def test_lorakit_reference_is_not_an_answer(answer_id):
    reference_refused(run_exercise, answer_id, REFERENCE[answer_id])


@pytest.mark.parametrize("label", list(REFERENCE_PARTS))
def test_the_references_parts_are_not_an_answer(label):
    reference_refused(run_exercise, "dequantize", REFERENCE_PARTS[label])
