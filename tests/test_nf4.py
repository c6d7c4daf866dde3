"""lorakit.nf4 against bitsandbytes (the oracle): the table, the packed bytes, absmax, dequantization,
double quantization and the bits-per-parameter accounting."""

from __future__ import annotations

import copy
import statistics

import bitsandbytes.functional as bnbF
import pytest
import torch

from lorakit import memory
from lorakit.nf4 import (
    NF4_CODE,
    NF4Tensor,
    dequantize_nf4,
    dynamic_code,
    nf4_code,
    quantize_nf4,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(7,), (3, 5, 7), (128, 96), (576, 576), (1536, 576)]  # odd counts, ragged rows, SmolLM2's matrices


def bnb_quantize(w: torch.Tensor, blocksize: int, double_quant: bool = False):
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    return packed.view(-1), state


def bnb_dequantize_flat(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantization of the flattened tensor (on CPUs with AVX-512 its 2-D path is wrong for
    ragged rows, see test_qlora.py::test_bnb_cpu_2d_dequantize_bug_on_avx512_only)."""
    n = state.shape.numel()
    flat_state = copy.copy(state)
    # An even length keeps bitsandbytes on its C kernel (odd lengths go to a torch.compile'd fallback that
    # takes seconds to compile); the spare low nibble is the padding, dropped again.
    flat_state.shape = torch.Size([n + n % 2])
    return bnbF.dequantize_4bit(packed, flat_state).reshape(-1)[:n]  # its 1-D path returns (1, n)


def bnb_absmax(state) -> torch.Tensor:
    """float32 absmax per block from a bitsandbytes QuantState (reconstructed when nested)."""
    if state.nested:
        return bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return state.absmax


def weights(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    torch.manual_seed(seed)
    return (0.02 * torch.randn(shape)).to(dtype)  # the scale of real LLM weights


# --- the table -----------------------------------------------------------------------------------------


def test_nf4_code_equals_bitsandbytes_table():
    table = bnbF.get_4bit_type("nf4", device="cpu")
    assert NF4_CODE.dtype == torch.float32 and NF4_CODE.shape == (16,)
    assert (NF4_CODE - table).abs().max().item() <= 1e-7
    assert torch.equal(NF4_CODE, table)  # in fact bit for bit


def test_nf4_code_is_asymmetric_with_exact_zero():
    assert NF4_CODE[0].item() == -1.0 and NF4_CODE[15].item() == 1.0 and NF4_CODE[7].item() == 0.0
    assert (NF4_CODE[:7] < 0).all() and (NF4_CODE[8:] > 0).all()  # 7 negative, 8 positive levels
    assert torch.all(NF4_CODE[1:] > NF4_CODE[:-1])
    assert NF4_CODE[8].item() != -NF4_CODE[6].item()


def test_float64_derivation_is_one_float32_step_off():
    """The issue's observation: spacing and dividing in float64 does not reproduce the float32 table."""
    normal, offset = statistics.NormalDist(), 0.9677083
    pos = [normal.inv_cdf(offset + (0.5 - offset) * i / 8) for i in range(8)]
    neg = [-normal.inv_cdf(offset + (0.5 - offset) * i / 7) for i in range(7)]
    values = torch.tensor(sorted(pos + [0.0] + neg), dtype=torch.float64)
    as_float64 = (values / values.max()).float()
    gap = (as_float64 - bnbF.get_4bit_type("nf4", device="cpu")).abs().max().item()
    assert 0 < gap <= 2.4e-7


def test_nf4_code_offset_changes_the_table_and_is_validated():
    assert not torch.equal(nf4_code(0.99), NF4_CODE)
    for bad in (0.5, 1.0, 1.2, "0.97", True):
        with pytest.raises(ValueError, match="offset"):
            nf4_code(bad)


def test_dynamic_code_equals_bitsandbytes():
    assert torch.equal(dynamic_code(), bnbF.create_dynamic_map())


# --- quantization against bitsandbytes ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bytes_absmax_and_dequantized_equal_bitsandbytes(shape, blocksize, dtype):
    w = weights(shape, dtype)
    q = quantize_nf4(w, blocksize=blocksize)
    packed, state = bnb_quantize(w, blocksize)
    assert q.data.dtype == torch.uint8 and q.data.shape == ((w.numel() + 1) // 2,)
    assert torch.equal(q.data, packed)
    assert q.absmax.dtype == torch.float32
    assert torch.equal(q.absmax, state.absmax)
    out = dequantize_nf4(q)
    assert out.shape == w.shape and out.dtype == dtype
    assert torch.equal(out.reshape(-1), bnb_dequantize_flat(packed.view(-1, 1), state))


@pytest.mark.parametrize("blocksize", [64, 256])
def test_ties_zero_blocks_and_exact_levels_match_bitsandbytes(blocksize):
    """Values exactly on a midpoint between two levels (ties go to the lower level), exactly on a level,
    at +-absmax, and an all-zero block."""
    mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    block = torch.cat([mids, -mids, NF4_CODE, torch.tensor([1.0, -1.0])])
    block = torch.cat([block, torch.zeros(blocksize - block.numel())])
    w = torch.cat([block, torch.zeros(blocksize), 3 * block[: blocksize // 2 + 1]])  # + a ragged last block
    q = quantize_nf4(w, blocksize=blocksize)
    packed, state = bnb_quantize(w, blocksize)
    assert torch.equal(q.data, packed)
    assert torch.equal(q.absmax, state.absmax)
    codes = torch.stack([q.data >> 4, q.data & 15], 1).view(-1)
    assert torch.equal(codes[:15], torch.arange(15, dtype=torch.uint8))  # midpoint i -> the lower level i
    assert (codes[blocksize : 2 * blocksize] == 7).all()  # a zero block quantizes to the zero level


def test_odd_count_pads_the_last_low_nibble_with_the_zero_code():
    q = quantize_nf4(torch.tensor([1.0, -1.0, 0.5]), blocksize=64)
    assert q.data.tolist() == [0xF0, (12 << 4) | 7]
    assert dequantize_nf4(q).tolist() == pytest.approx([1.0, -1.0, NF4_CODE[12].item()])


def test_quantization_error_is_that_of_the_nearest_level():
    w = weights((64, 64))
    q = quantize_nf4(w)
    scaled = w.reshape(-1, 64) / q.absmax[:, None]
    nearest = (scaled[..., None] - NF4_CODE).abs().min(-1).values
    got = (dequantize_nf4(q).reshape(-1, 64) / q.absmax[:, None] - scaled).abs()
    torch.testing.assert_close(got, nearest, atol=1e-6, rtol=0)


def reference_dequantize(q: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The definition, without tricks: level of each nibble (high first) times its block's absmax, in
    float32, cast once."""
    codes = torch.stack([q.data >> 4, q.data & 15], 1).view(-1)[: q.numel].long()
    scale = q.absmax_float().repeat_interleave(q.blocksize)[: q.numel]
    return (NF4_CODE[codes] * scale).to(dtype).view(q.shape)


CHUNK_CASES = [(shape, chunk) for shape in [(7,), (1,), (3, 5, 7), (160, 61)] for chunk in [1, 96, 4096, None]]
CHUNK_CASES += [((1000003,), 4096), ((2200001,), None)]  # None: the default chunk size, here two chunks


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize(("shape", "chunk_bytes"), CHUNK_CASES, ids=str)
def test_chunked_dequantize_equals_the_definition(shape, chunk_bytes, blocksize, dtype, double_quant, monkeypatch):
    """Bit-exact for every chunk size (smaller than a block, not a multiple of it, the default), ragged
    last blocks, odd counts, every output dtype and double-quantized constants."""
    if chunk_bytes is not None:
        monkeypatch.setattr("lorakit.nf4._DEQUANT_CHUNK_BYTES", chunk_bytes)
    q = quantize_nf4(weights(shape), blocksize=blocksize, double_quant=double_quant)
    out = dequantize_nf4(q, dtype)
    assert out.shape == torch.Size(shape) and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, reference_dequantize(q, dtype))


# --- double quantization --------------------------------------------------------------------------------


@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (1000003,)], ids=str)
def test_double_quant_against_bitsandbytes(shape, blocksize):
    w = weights(shape)
    q = quantize_nf4(w, blocksize=blocksize, double_quant=True)
    packed, state = bnb_quantize(w, blocksize, double_quant=True)
    assert q.double_quant and q.absmax is None
    assert torch.equal(q.data, packed)
    # The stored second-level tensors: the same mean and the same scale per 256 constants...
    assert torch.equal(q.absmax_offset, state.offset)
    assert torch.equal(q.absmax_scale, state.state2.absmax)
    assert q.absmax_code.dtype == torch.uint8 and q.absmax_code.shape == state.absmax.shape
    # ...and the same 8-bit codes except near ties, where bitsandbytes' CPU search picks the farther level.
    same = q.absmax_code == state.absmax
    assert same.float().mean().item() > 0.99
    exact = quantize_nf4(w, blocksize=blocksize).absmax
    ours_err = (q.absmax_float() - exact).abs()
    bnb_err = (bnb_absmax(state) - exact).abs()
    assert torch.equal(q.absmax_float()[same], bnb_absmax(state)[same])
    assert (ours_err <= bnb_err).all()
    assert (~same).any() and ours_err[~same].sum() < bnb_err[~same].sum()  # the codes that differ are nearer
    # The weights: a nearer absmax is not always a smaller weight error, block by block, but overall the
    # error is that of bitsandbytes (to 0.1%) and much nearer to it than to plain 8-bit-free NF4's.
    ours_w = (dequantize_nf4(q).reshape(-1) - w.reshape(-1)).abs().mean().item()
    bnb_w = (bnb_dequantize_flat(packed.view(-1, 1), state) - w.reshape(-1)).abs().mean().item()
    assert ours_w <= bnb_w * 1.001, (ours_w, bnb_w)


def test_double_quant_of_a_single_block():
    """One absmax value: centred it is exactly 0 and must come back as the mean itself."""
    w = torch.tensor([0.5, -2.0, 1.0])
    q = quantize_nf4(w, double_quant=True)
    assert torch.equal(q.absmax_float(), torch.tensor([2.0]))
    torch.testing.assert_close(dequantize_nf4(q), dequantize_nf4(quantize_nf4(w)))


# --- bits per parameter from the stored tensors -----------------------------------------------------------


def test_bits_per_param_from_stored_tensors():
    w = weights((1024, 1024))
    plain, double = quantize_nf4(w), quantize_nf4(w, double_quant=True)
    assert plain.constant_bits_per_param == 0.5  # 32 / 64
    assert round(double.constant_bits_per_param, 3) == 0.127  # 8 / 64 + 32 / (64 * 256) + one float32
    assert plain.bits_per_param == pytest.approx(memory.nf4_bits_per_param(double_quant=False), abs=1e-9)
    assert double.bits_per_param == pytest.approx(memory.nf4_bits_per_param(double_quant=True), abs=1e-4)
    assert plain.nbytes == w.numel() // 2 + 4 * w.numel() // 64
    # bitsandbytes stores tensors of the same sizes
    _, state = bnb_quantize(w, 64, double_quant=True)
    bnb_const = state.absmax.nbytes + state.state2.absmax.nbytes + state.offset.nbytes
    assert double.nbytes - double.data.nbytes == bnb_const


# --- arguments --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blocksize", [0, -64, 1, 63, 64.0, True, "64", None])
def test_bad_blocksize_is_named(blocksize):
    with pytest.raises(ValueError, match=r"blocksize.*" + repr(blocksize).replace(".", r"\.")):
        quantize_nf4(torch.ones(8), blocksize=blocksize)


def test_bad_tensors_are_named():
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.empty(0, 4))
    with pytest.raises(TypeError, match="int64"):
        quantize_nf4(torch.arange(8))
    with pytest.raises(TypeError, match="list"):
        quantize_nf4([1.0, 2.0])
    with pytest.raises(TypeError, match="Tensor"):
        dequantize_nf4(torch.ones(4))


def test_round_trip_keeps_shape_dtype_and_device_moves():
    w = weights((4, 6, 8), torch.bfloat16)
    q = quantize_nf4(w, blocksize=32, double_quant=True)
    assert isinstance(q, NF4Tensor) and q.shape == w.shape and q.dtype == torch.bfloat16
    assert dequantize_nf4(q, torch.float32).dtype == torch.float32
    assert torch.equal(q.to("cpu").dequantize(), dequantize_nf4(q))
    assert "bits/param" in repr(q)


def test_doctests():
    import doctest

    import lorakit.nf4

    result = doctest.testmod(lorakit.nf4)
    assert result.attempted >= 5 and result.failed == 0
