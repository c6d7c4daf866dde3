"""NF4 from scratch: the 4-bit NormalFloat code of QLoRA, blockwise absmax scaling, packing, double quantization.

A weight matrix is flattened and cut into blocks of `blocksize` values (64 by default; the last block may
be shorter). Each block is divided by its absolute maximum, so its values land in [-1, 1], and every
value is replaced by the index of the nearest of the 16 values in `NF4_CODE`. Two 4-bit indices share
one byte, the first in the high nibble. Dequantization looks the indices up and multiplies by the
block's absmax again (Dettmers et al., 2023, "QLoRA", section 3).

    >>> import torch
    >>> q = quantize_nf4(torch.tensor([0.6, -1.0, 0.0, 2.0]), blocksize=2)
    >>> q.data, q.absmax                               # codes (13, 0) and (7, 15) -> bytes 0xD0, 0x7F
    (tensor([208, 127], dtype=torch.uint8), tensor([1., 2.]))
    >>> dequantize_nf4(q)                              # 0.6 comes back as the nearest level, 0.5626
    tensor([ 0.5626, -1.0000,  0.0000,  2.0000])

Everything here is written to give the same bytes as bitsandbytes (`bitsandbytes.functional.quantize_4bit`
with `quant_type="nf4"`, its CPU code path), which the tests check: the same float32 table, the same
scaling arithmetic (a multiplication by the reciprocal absmax for full blocks, a division for the ragged
last one), the same tie rule (a value exactly halfway between two codes takes the lower one) and a zero
code (index 7) in the spare low nibble when the number of values is odd.

Double quantization (QLoRA, section 3) stores the float32 absmax constants themselves in 8 bits: their
mean is subtracted, and the centred values are quantized blockwise (blocks of 256) with bitsandbytes'
8-bit "dynamic" code, keeping one float32 scale per 256 constants and the float32 mean. Per parameter,
the constants cost 32/64 = 0.5 bits without it and 8/64 + 32/(64*256) = 0.127 bits with it; the
`NF4Tensor` properties compute both from the tensors actually stored.

The module needs only torch: bitsandbytes is the oracle the tests compare against, never a dependency. On
the CPU, `dequantize_nf4` runs the same arithmetic through a small C kernel when one can be built here
(`lorakit.native`: one pass instead of torch's three, bit for bit the same result); the pure-torch path
below is the reference, and what runs without a C compiler, off the CPU, or with `native=False`.
"""

from __future__ import annotations

import math
import numbers
import statistics
from dataclasses import dataclass
from functools import cache

import torch

from lorakit import native as _native

__all__ = [
    "NF4_CODE",
    "NF4_OFFSET",
    "nf4_code",
    "dynamic_code",
    "NF4Tensor",
    "quantize_nf4",
    "dequantize_nf4",
    "DOUBLE_QUANT_BLOCKSIZE",
]

NF4_OFFSET = 0.9677083
"""The outermost probability bitsandbytes uses instead of 1 (see `nf4_code`): (1 - 1/32 + 1 - 1/30) / 2."""

DOUBLE_QUANT_BLOCKSIZE = 256
"""Block size of the second-level (8-bit) quantization of the absmax constants, as in QLoRA and bitsandbytes."""


def nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 values, derived from quantiles of the standard normal distribution.

    The idea (QLoRA, section 3.1): if weights are normal, a 4-bit code whose 16 levels sit at equally
    spaced *quantiles* of N(0, 1) puts the same share of the weights into each level, which is the best
    a 4-bit code can do for normal data (information-theoretically optimal quantile quantization). The
    paper prints the levels as

        q_i = 1/2 * (Q(i / (2^k + 1)) + Q((i + 1) / (2^k + 1))),     i = 0 .. 2^k - 1,

    with Q the normal quantile function (inverse CDF). Taken literally, the end terms are Q(0) = -inf and
    Q(1) = +inf: the outermost levels would be infinite, and no normalisation to [-1, 1] is possible.
    Normal tails are unbounded, so a quantile code has to be truncated somewhere.

    The code the paper's authors ship (bitsandbytes' `create_normal_map`) truncates at the probability
    `offset` = 0.9677083 instead of 1, and builds the two halves separately so that zero is represented
    exactly (padding and zero weights must stay exactly zero):

    - positive side: 9 equally spaced probabilities from `offset` down to 0.5, the last (0.5, whose
      quantile is 0) dropped: 8 positive levels Q(p);
    - negative side: 8 equally spaced probabilities from `offset` down to 0.5, the last dropped:
      7 levels -Q(p);
    - an exact 0;
    - all 16 divided by the largest, Q(offset) ~= 1.848, so the code spans exactly [-1, 1].

    That is 8 positive, 7 negative and one zero level: the code is asymmetric (`NF4_CODE[0] = -1`,
    `NF4_CODE[15] = 1`, but e.g. the smallest positive level 0.0796 != 0.0911, the smallest negative
    one in absolute value). Where does 0.9677083 come from? Split the probability mass into n equal bins:
    the centre of the last one is at probability 1 - 1/(2n), a finite stand-in for the printed formula's
    infinite end term. For n = 16 that is 1 - 1/32 = 0.96875, for n = 15 it is 1 - 1/30 = 0.96667, and
    0.9677083 is their mean to the 7 digits given: a compromise between the 16 levels of the code and its
    15 non-zero ones. Any offset < 1 makes every level finite; this one is the value bitsandbytes ships.

    Exactness: bitsandbytes' table is float32. It comes out bit for bit the same here only if every step
    is done in the same precision as its construction: the probabilities are spaced in float32 (torch's
    `linspace` default), the quantiles are computed in float64 (scipy there, `statistics.NormalDist` here)
    from those float32 probabilities, rounded to float32, and divided by the maximum in float32. Spacing
    and dividing in float64 instead lands 1.2e-7 (one float32 step) away on some levels.

        >>> c = nf4_code()
        >>> c.dtype, c.numel(), c[0].item(), c[7].item(), c[15].item()
        (torch.float32, 16, -1.0, 0.0, 1.0)
    """
    if isinstance(offset, bool) or not isinstance(offset, numbers.Real) or not 0.5 < offset < 1:
        raise ValueError(f"`offset` should be a probability in (0.5, 1), but the value passed is {offset!r}")
    normal = statistics.NormalDist()  # mean 0, standard deviation 1
    positive_p = torch.linspace(offset, 0.5, 9, dtype=torch.float32)[:-1].tolist()  # float32 spacing, as bnb
    negative_p = torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1].tolist()
    values = [normal.inv_cdf(p) for p in positive_p] + [0.0] + [-normal.inv_cdf(p) for p in negative_p]
    code = torch.tensor(values, dtype=torch.float32).sort().values  # rounded to float32, then sorted
    return code / code.max()  # divided in float32: -1, ..., 0, ..., 1


NF4_CODE: torch.Tensor = nf4_code()
"""The 16 NF4 levels (float32, sorted, NF4_CODE[7] == 0): equal to bitsandbytes' `get_4bit_type("nf4")`."""


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code (Dettmers, 2015; `create_dynamic_map()`), 256 sorted float32.

    Each of 7 decades 10^-6 .. 10^0 holds 2^i evenly spaced positive magnitudes (i = 0 .. 6), the means of
    consecutive points of linspace(0.1, 1, 2^i + 1), and their negatives; plus 0 and 1. Dense near zero,
    it is the code the second level of double quantization uses for the centred absmax values.
    """
    data: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


@dataclass(eq=False)
class NF4Tensor:
    """A tensor stored as packed NF4 codes plus its quantization constants.

    Attributes:
        data: uint8, ceil(numel / 2) bytes; value 2i in the high nibble of byte i, value 2i + 1 in the low.
        absmax: float32, one per block of `blocksize` values (the last block may be shorter), or None when
            the constants are double-quantized.
        blocksize: values per block.
        shape, dtype: of the original tensor; `dequantize_nf4` returns this shape and dtype.
        absmax_code: uint8 indices into `dynamic_code()`, one per block (double quantization only).
        absmax_scale: float32, one per `DOUBLE_QUANT_BLOCKSIZE` absmax values (double quantization only).
        absmax_offset: float32 scalar, the mean subtracted from absmax before quantizing it (idem).
    """

    data: torch.Tensor
    absmax: torch.Tensor | None
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    absmax_code: torch.Tensor | None = None
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.absmax is None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def constants(self) -> list[torch.Tensor]:
        """The stored quantization constants (everything but the packed codes)."""
        if self.double_quant:
            return [self.absmax_code, self.absmax_scale, self.absmax_offset]
        return [self.absmax]

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: packed codes plus constants."""
        return self.data.nbytes + sum(t.nbytes for t in self.constants)

    @property
    def constant_bits_per_param(self) -> float:
        """Bits per parameter spent on the constants: 32/64 = 0.5 plain, about 0.127 with double quantization."""
        return 8 * sum(t.nbytes for t in self.constants) / self.numel

    @property
    def bits_per_param(self) -> float:
        """All stored bits per parameter: 4 for the codes plus `constant_bits_per_param` (4.5, or about 4.127)."""
        return 8 * self.nbytes / self.numel

    def absmax_float(self) -> torch.Tensor:
        """The float32 absmax per block; reconstructed from its 8-bit form when double-quantized."""
        if not self.double_quant:
            return self.absmax
        return _dequantize_absmax(self.absmax_code, self.absmax_scale, self.absmax_offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self, dtype=dtype)

    def to(self, device: torch.device | str) -> NF4Tensor:
        """A copy with every stored tensor on `device`."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return NF4Tensor(
            move(self.data),
            move(self.absmax),
            self.blocksize,
            self.shape,
            self.dtype,
            move(self.absmax_code),
            move(self.absmax_scale),
            move(self.absmax_offset),
        )

    def __repr__(self) -> str:
        kind = "double-quantized constants" if self.double_quant else "float32 absmax"
        return (
            f"NF4Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, {kind}, "
            f"{self.nbytes} bytes, {self.bits_per_param:.3f} bits/param)"
        )


def _check_blocksize(blocksize: object) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral) or blocksize < 2 or blocksize % 2:
        raise ValueError(f"`blocksize` should be a positive even integer, but the value passed is {blocksize!r}")
    return int(blocksize)


def _check_input(w: object) -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"quantize_nf4 expects a torch.Tensor, but got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"quantize_nf4 expects a floating-point tensor, but got dtype {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"quantize_nf4 cannot quantize an empty tensor (shape {tuple(w.shape)})")
    return w


# Nearest-code search without a binary search. torch.bucketize against the 15 midpoints between codes is
# exact but slow (a scalar binary search per value). Instead, a scaled value s in [-1, 1] is mapped to one
# of 512 narrow cells with pure float arithmetic: k = round(s * 128 + 129), obtained by adding 2**23 so
# that the float32 sum's low mantissa bits *are* the integer (s * 128 is exact, and float32 numbers in
# [2**23, 2**24) are spaced exactly 1 apart). Cells are 1/128 wide and the midpoints at least 0.08 apart,
# so a cell holds at most one midpoint: the code index is (midpoints entirely below the cell) +
# (s > the midpoint inside the cell, if any). That is the same count of midpoints < s that
# bucketize returns, so ties (s exactly on a midpoint) go to the lower code, as in bitsandbytes.
_CELLS_PER_UNIT = 128.0
_CELL_BIAS = _CELLS_PER_UNIT + 1.0  # cell 1 starts at s = -1 - 1.5/128: values a little below -1 stay >= 0
_MAGIC = float(2**23)
_CELL_MASK = 511  # 512 cells; NaN input cannot index out of range


@cache
def _nf4_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(midpoint inside each cell or +inf, code index at each cell's start, magic constant, byte -> 2 levels)."""
    code = NF4_CODE.to(device)
    mids = (code[:-1] + code[1:]) / 2  # float32, as bitsandbytes computes them
    k = torch.arange(_CELL_MASK + 1, dtype=torch.float64)
    lo_edge = (k - 0.5 - _CELL_BIAS) / _CELLS_PER_UNIT  # s in [lo_edge, hi_edge] rounds to cell k
    hi_edge = (k + 0.5 - _CELL_BIAS) / _CELLS_PER_UNIT
    m = mids.double().cpu()
    below = (m[None, :] < lo_edge[:, None]).sum(1)
    inside = (m[None, :] >= lo_edge[:, None]) & (m[None, :] <= hi_edge[:, None])
    assert int(inside.sum(1).max()) <= 1, "a cell holds two midpoints"
    cell_mid = torch.where(inside, m[None, :], torch.inf).min(1).values.float()
    # byte -> its two levels (high nibble first), each pair stored as one 8-byte element: a 1-D gather of
    # 8-byte items is much faster than gathering rows of two floats, and viewing the result as float32
    # gives the levels in order.
    byte_pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], 1).contiguous().view(torch.int64)
    return (
        cell_mid.to(device),
        below.to(torch.uint8).to(device),
        torch.tensor(_MAGIC + _CELL_BIAS, dtype=torch.float32, device=device),
        byte_pairs.view(-1),
    )


def _nearest_nf4(scaled: torch.Tensor) -> torch.Tensor:
    """uint8 index of the nearest NF4 level for float32 values in [-1, 1] (ties to the lower level)."""
    cell_mid, below, magic, _ = _nf4_tables(scaled.device)
    cell = torch.add(magic, scaled, alpha=_CELLS_PER_UNIT)  # float32 2**23 + round(s * 128 + 129)
    cell = cell.view(torch.int32).bitwise_and_(_CELL_MASK)  # the integer sits in the low mantissa bits
    idx = below.index_select(0, cell)
    idx += scaled > cell_mid.index_select(0, cell)
    return idx


def _blockwise_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat / its block absmax, absmax): full blocks multiply by the reciprocal, the ragged one divides."""
    n = flat.numel()
    full = n - n % blocksize
    scaled = torch.empty_like(flat)
    parts = []
    if full:
        blocks = flat[:full].view(-1, blocksize)
        absmax = torch.maximum(blocks.amax(1), blocks.amin(1).neg_())  # = abs().amax(1), one pass fewer
        recip = torch.reciprocal(absmax.clamp(min=1e-38)).unsqueeze(1)
        torch.mul(blocks, recip, out=scaled[:full].view(-1, blocksize))
        parts.append(absmax)
    if full < n:
        tail = flat[full:]
        am = tail.abs().amax().clamp(min=1e-38)
        torch.div(tail, am, out=scaled[full:])
        parts.append(am.reshape(1))
    absmax = parts[0] if len(parts) == 1 else torch.cat(parts)
    return scaled, absmax


def _quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: (uint8 codes, float32 scale per 256, float32 mean), as bitsandbytes'
    `quantize_blockwise(absmax - absmax.mean(), blocksize=256)` (its CPU kernel divides by the block's
    absmax and takes the nearest dynamic-code value, the lower one on a tie)."""
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.numel()
    nblocks = -(-n // DOUBLE_QUANT_BLOCKSIZE)
    padded = torch.zeros(nblocks * DOUBLE_QUANT_BLOCKSIZE, dtype=torch.float32, device=absmax.device)
    padded[:n] = centred
    blocks = padded.view(nblocks, DOUBLE_QUANT_BLOCKSIZE)
    scale = blocks.abs().amax(1)  # zero padding never raises an absmax
    normed = (blocks / scale.clamp(min=1e-38).unsqueeze(1)).reshape(-1)[:n]
    code = _dynamic_code(absmax.device)
    left = (torch.searchsorted(code, normed, right=True) - 1).clamp_(0, code.numel() - 2)  # code[left] <= x
    go_right = (normed - code[left + 1]).abs() < (normed - code[left]).abs()
    return (left + go_right).to(torch.uint8), scale, offset


@cache
def _dynamic_code(device: torch.device) -> torch.Tensor:
    return dynamic_code().to(device)


def _dequantize_absmax(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    values = _dynamic_code(codes.device)[codes.long()]
    per_block = scale.repeat_interleave(DOUBLE_QUANT_BLOCKSIZE)[: values.numel()]
    return values * per_block + offset


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Tensor:
    """Quantize `w` (any shape; float32, bfloat16 or float16) to NF4 in blocks of `blocksize` values.

    The packed bytes and the absmax equal bitsandbytes' `quantize_4bit(w, blocksize=blocksize,
    quant_type="nf4")`; with `double_quant`, the constants are stored as bitsandbytes'
    `compress_statistics=True` stores them.
    """
    blocksize = _check_blocksize(blocksize)
    w = _check_input(w)
    flat = w.detach().reshape(-1).to(torch.float32)  # bitsandbytes quantizes half inputs from float32 too
    scaled, absmax = _blockwise_scaled(flat, blocksize)
    codes = _nearest_nf4(scaled)
    if codes.numel() % 2:  # an odd count: the spare low nibble holds the code of 0.0, as in bitsandbytes
        codes = torch.cat([codes, codes.new_full((1,), 7)])
    pairs = codes.view(-1, 2)
    data = pairs[:, 0] * 16 + pairs[:, 1]  # high nibble first (uint8 arithmetic, no overflow: max 15*16+15)
    shape = torch.Size(w.shape)
    if not double_quant:
        return NF4Tensor(data, absmax, blocksize, shape, w.dtype)
    absmax_code, absmax_scale, absmax_offset = _quantize_absmax(absmax)
    return NF4Tensor(data, None, blocksize, shape, w.dtype, absmax_code, absmax_scale, absmax_offset)


# Dequantization is a table lookup: each packed byte indexes a 256-entry table of its two levels (high
# nibble first), stored as one int64 so that a 1-D index_select moves both at once; the levels are then
# multiplied by their block's absmax. Done on a big tensor all at once, this needs a full-size temporary
# (int32 indices, 4 bytes per packed byte: 32 MB for a 4096 x 4096 matrix) and streams the whole output
# through memory twice (lookup, then multiplication). Instead the bytes are processed in chunks of whole
# blocks: a chunk's indices are a small temporary, the lookup writes the levels straight into the output
# (viewed as int64), and the multiplication scales them in place right after, while they are still in
# cache. Up to `_DEQUANT_CHUNK_BYTES` packed bytes (2M values, every matrix of a small model) are a single
# chunk: the plain whole-tensor computation.
_DEQUANT_CHUNK_BYTES = 1024 * 1024


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None, native: bool | None = None) -> torch.Tensor:
    """The tensor `q` stands for: each code's level times its block's absmax, in `q.shape`.

    Computed in float32 and cast once to `dtype` (default: the dtype that was quantized), as bitsandbytes does.
    On the CPU this runs `lorakit.native`'s C kernel when it is available (`native=None`, the default): the
    same products in one pass, bit for bit the pure-torch result. `native=False` takes the pure-torch path
    below; `native=True` requires the kernel (RuntimeError without it).
    """
    if not isinstance(q, NF4Tensor):
        raise TypeError(f"dequantize_nf4 expects an NF4Tensor, but got {type(q).__name__}")
    dtype = q.dtype if dtype is None else dtype
    n, bs, data = q.numel, q.blocksize, q.data
    if data.numel() != -(-n // 2):
        raise ValueError(f"an NF4Tensor of {n} values should hold {-(-n // 2)} packed bytes, not {data.numel()}")
    absmax = q.absmax_float()
    if native is None:  # the kernel takes exactly what quantize_nf4 stores: uint8 codes, float32 absmax
        native = data.is_cpu and data.dtype == torch.uint8 and absmax.dtype == torch.float32
        native = native and bs % 2 == 0 and bs <= _native.MAX_BLOCKSIZE
        native = native and _native.library() is not None
    if not native:
        return _dequantize_torch(q, absmax).view(q.shape).to(dtype)
    out = torch.empty(q.shape, dtype=torch.float32)
    _native.dequantize_into(data.contiguous(), absmax.contiguous(), NF4_CODE, out, bs)
    return out.to(dtype)


def _dequantize_torch(q: NF4Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """`dequantize_nf4` in pure torch (`absmax` = `q.absmax_float()`): flat float32 values, on `q`'s device."""
    n, bs, data = q.numel, q.blocksize, q.data
    nbytes = data.numel()
    _, _, _, byte_pairs = _nf4_tables(data.device)
    nblocks = absmax.numel()
    # Room for whole blocks, so that one broadcast multiplication scales every block, the ragged last one
    # too: its positions past the last byte's two levels are left unset (scaled for nothing, never returned).
    values = torch.empty(nblocks * bs, dtype=torch.float32, device=data.device)
    pairs = values.view(torch.int64)[:nbytes]  # pairs[i]: the two levels of byte i
    blocks, scale = values.view(nblocks, bs), absmax.unsqueeze(1)
    step = max(1, _DEQUANT_CHUNK_BYTES // (bs // 2))  # blocks per chunk; off the CPU, no cache to fit in
    if nblocks <= step or not data.is_cpu:
        chunks = [(data, pairs, blocks, scale)]
    else:  # as many pieces of each: every piece of `data` is whole blocks, but the last may end mid-block
        chunk = step * bs // 2
        chunks = zip(data.split(chunk), pairs.split(chunk), blocks.split(step), scale.split(step), strict=True)
    for chunk_bytes, chunk_pairs, chunk_blocks, chunk_scale in chunks:
        torch.index_select(byte_pairs, 0, chunk_bytes.to(torch.int32), out=chunk_pairs)
        chunk_blocks.mul_(chunk_scale)
    return values[:n] if values.numel() > n else values
