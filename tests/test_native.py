"""lorakit.native: the NF4 dequantization C kernel equals the pure-torch path bit for bit, in every version
this CPU runs, and lorakit falls back to pure torch, silently and with a reason, when it cannot be built."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

import lorakit.native as native
from lorakit.nf4 import NF4_CODE, NF4Tensor, dequantize_nf4, quantize_nf4

HAVE_CC = native._compiler() is not None
needs_kernel = pytest.mark.skipif(not HAVE_CC, reason="no C compiler on this machine: lorakit runs pure torch")


@pytest.fixture
def fresh_library(monkeypatch):
    """library() rebuilt under this test's environment, and the normal one restored afterwards."""
    native.library.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    native.library.cache_clear()


def bits(t: torch.Tensor) -> torch.Tensor:
    """float32 values as their bit patterns, so that NaN compares equal to the same NaN."""
    return t.float().contiguous().view(torch.int32)


@needs_kernel
def test_the_kernel_builds_here():
    assert native.library() is not None, native.status()
    assert native.status().startswith("C kernel ("), native.status()
    assert native.supported_isas()[0] == "scalar"
    assert native.best_isa() in native.ISAS


# (shape, blocksize): full blocks, a ragged last block, an odd count (one value alone in a high nibble),
# a single value, blocks that end mid-vector for both SIMD versions (34: 17 bytes; 6: scalar only), and
# more than the torch path's 1 MB chunk (its chunked branch).
CASES = [
    ((576, 576), 64),
    ((192, 576), 128),
    ((7, 9), 64),
    ((1,), 64),
    ((3, 5), 2),
    ((101, 33), 34),
    ((13, 17), 6),
    ((1000, 37), 256),
    ((1500, 1500), 64),
    ((4097,), 4096),
]


@needs_kernel
@pytest.mark.parametrize("shape,blocksize", CASES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_every_version_equals_the_torch_path(shape, blocksize, double_quant):
    torch.manual_seed(0)
    q = quantize_nf4(torch.randn(shape) * 0.05, blocksize=blocksize, double_quant=double_quant)
    expected = dequantize_nf4(q, native=False)
    assert expected.shape == torch.Size(shape)
    assert torch.equal(bits(dequantize_nf4(q)), bits(expected))  # the default path, on this CPU the kernel
    absmax = q.absmax_float()
    for isa in native.supported_isas():
        for threads in (1, 2, 3):
            out = torch.full(shape, float("nan"))
            native.dequantize_into(q.data, absmax, NF4_CODE, out, blocksize, isa=isa, threads=threads)
            assert torch.equal(bits(out), bits(expected)), (isa, threads)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_output_dtypes_match(dtype):
    w = torch.randn(64, 96).to(dtype)
    q = quantize_nf4(w)
    got, want = dequantize_nf4(q), dequantize_nf4(q, native=False)
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)
    assert torch.equal(dequantize_nf4(q, torch.float32), dequantize_nf4(q, torch.float32, native=False))


@needs_kernel
def test_infinite_and_nan_constants_give_the_same_bits():
    q = quantize_nf4(torch.randn(4, 64))
    q.absmax[0], q.absmax[1], q.absmax[2] = float("inf"), float("nan"), 0.0
    want = dequantize_nf4(q, native=False)
    for isa in native.supported_isas():
        out = torch.empty(4, 64)
        native.dequantize_into(q.data, q.absmax, NF4_CODE, out, 64, isa=isa)
        assert torch.equal(bits(out), bits(want)), isa


@needs_kernel
def test_bad_arguments_raise_before_the_kernel_runs():
    q = quantize_nf4(torch.randn(8, 64))
    out = torch.empty(8, 64)
    with pytest.raises(ValueError, match="`data` holds 100 values; 512 outputs need 256"):
        native.dequantize_into(q.data[:100], q.absmax, NF4_CODE, out, 64)
    with pytest.raises(ValueError, match="`absmax` holds 7 values"):
        native.dequantize_into(q.data, q.absmax[:7], NF4_CODE, out, 64)
    with pytest.raises(ValueError, match="`out` should be a contiguous torch.float32"):
        native.dequantize_into(q.data, q.absmax, NF4_CODE, out.t(), 64)
    with pytest.raises(ValueError, match="`absmax` should be a contiguous torch.float32"):
        native.dequantize_into(q.data, q.absmax.double(), NF4_CODE, out, 64)
    with pytest.raises(ValueError, match="positive even integer"):
        native.dequantize_into(q.data, q.absmax, NF4_CODE, out, 63)
    with pytest.raises(ValueError, match="`isa` should be one of .* got 'no-such-isa'"):
        native.dequantize_into(q.data, q.absmax, NF4_CODE, out, 64, isa="no-such-isa")
    short = NF4Tensor(q.data[:-1], q.absmax, 64, q.shape, q.dtype)
    for path in (None, False):
        with pytest.raises(ValueError, match="should hold 256 packed bytes, not 255"):
            dequantize_nf4(short, native=path)


@needs_kernel
def test_an_isa_this_cpu_lacks_is_refused(monkeypatch):
    lib = native.library()
    if native.best_isa() == "avx512":
        pytest.skip("this CPU runs every version")
    q = quantize_nf4(torch.randn(64))
    with pytest.raises(ValueError, match="does not run the 'avx512' kernel"):
        native.dequantize_into(q.data, q.absmax, NF4_CODE, torch.empty(64), 64, isa="avx512")
    assert lib is native.library()


def test_disabled_by_environment_falls_back_silently(fresh_library, capfd):
    fresh_library.setenv("LORAKIT_NATIVE", "0")
    assert native.library() is None
    assert native.status() == "pure torch (disabled by LORAKIT_NATIVE=0)"
    assert native.supported_isas() == [] and native.best_isa() is None
    q = quantize_nf4(torch.randn(3, 64))
    assert torch.equal(dequantize_nf4(q), dequantize_nf4(q, native=False))
    with pytest.raises(RuntimeError, match="not available: disabled by LORAKIT_NATIVE=0"):
        dequantize_nf4(q, native=True)
    assert capfd.readouterr() == ("", "")


def test_no_compiler_falls_back_with_the_reason(fresh_library, capfd):
    fresh_library.setattr(native, "_compiler", lambda: None)
    assert native.library() is None
    assert native.status() == "pure torch (no C compiler found ($CC, cc, gcc or clang))"
    q = quantize_nf4(torch.randn(5, 7))
    assert torch.equal(dequantize_nf4(q), dequantize_nf4(q, native=False))
    assert capfd.readouterr() == ("", "")


def test_a_failing_compiler_is_reported_not_raised(fresh_library, tmp_path, capfd):
    fresh_library.setenv("LORAKIT_CACHE", str(tmp_path))
    fresh_library.setenv("CC", shutil.which("false") or "false")
    if native._compiler() != shutil.which("false"):
        pytest.skip("no `false` program to stand in for a broken compiler")
    assert native.library() is None
    assert native.status().count("failed") == len(native.FLAG_SETS), native.status()
    assert not list((tmp_path / "native").glob("*"))  # no half-built file left behind
    assert capfd.readouterr() == ("", "")


@needs_kernel
def test_the_build_is_cached_per_source_and_flags(fresh_library, tmp_path):
    fresh_library.setenv("LORAKIT_CACHE", str(tmp_path))
    cc = native._compiler()
    first = native._build(cc, native.FLAG_SETS[-1])
    stamp = first.stat().st_mtime_ns
    assert native._build(cc, native.FLAG_SETS[-1]) == first and first.stat().st_mtime_ns == stamp
    assert native._build(cc, native.FLAG_SETS[-1] + ["-g"]) != first
    assert sorted(p.suffix for p in (tmp_path / "native").iterdir()) == [".so", ".so"]
    assert native.library() is not None and native.status().startswith("C kernel (")


def test_the_source_ships_in_the_wheel(tmp_path):
    root = native.SOURCE.parents[1]
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, tmp_path / name)
    shutil.copytree(root / "lorakit", tmp_path / "lorakit", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", ".", "-w", "dist"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("lorakit-*.whl")
    assert "lorakit/nf4_kernel.c" in zipfile.ZipFile(wheel).namelist()


def test_constants_the_kernel_does_not_take_stay_on_the_torch_path():
    q = quantize_nf4(torch.randn(6, 64))
    wide = NF4Tensor(q.data, q.absmax.double(), 64, q.shape, q.dtype)  # float64 absmax, as a user might build
    assert torch.equal(dequantize_nf4(wide), dequantize_nf4(wide, native=False))
    if HAVE_CC:
        with pytest.raises(ValueError, match="`absmax` should be a contiguous torch.float32"):
            dequantize_nf4(wide, native=True)


@needs_kernel
def test_the_default_path_runs_the_kernel(monkeypatch):
    calls = []
    real = native.dequantize_into
    monkeypatch.setattr(native, "dequantize_into", lambda *a, **k: calls.append(1) or real(*a, **k))
    q = quantize_nf4(torch.randn(8, 64))
    dequantize_nf4(q)
    assert calls == [1]
    dequantize_nf4(q, native=False)
    assert calls == [1]


@needs_kernel
def test_a_blocksize_past_64_bits_never_reaches_the_kernel():
    # 2**64 + 2 would arrive in C as 2 (ctypes keeps it mod 2**64) and read 32 absmax values from a tensor of one
    q = quantize_nf4(torch.randn(64))
    wrapped = NF4Tensor(q.data, q.absmax[:1], 2**64 + 2, q.shape, q.dtype)
    with pytest.raises(ValueError, match="positive even integer up to 2\\*\\*62"):
        native.dequantize_into(wrapped.data, wrapped.absmax, NF4_CODE, torch.empty(64), 2**64 + 2)
    with pytest.raises(TypeError, match="Overflow"):  # the default path leaves it to torch, which refuses it
        dequantize_nf4(wrapped)


@needs_kernel
def test_the_c_function_refuses_an_isa_beyond_the_cpu_and_bad_sizes():
    f = native.library().lorakit_nf4_dequantize
    q = quantize_nf4(torch.randn(64))
    out = torch.zeros(64)
    ptrs = (q.data.data_ptr(), q.absmax.data_ptr(), NF4_CODE.data_ptr(), out.data_ptr())
    best = native.ISAS.index(native.best_isa())
    assert f(*ptrs, 64, 64, best + 1, 1) == -1
    assert f(*ptrs, 64, 63, best, 1) == -2 and f(*ptrs, 0, 64, best, 1) == -2
    assert not out.any()  # nothing written on a refusal
    assert f(*ptrs, 64, 64, best, 1) == 0 and torch.equal(out, dequantize_nf4(q, native=False))


@needs_kernel
def test_a_changed_source_is_a_new_build_and_a_broken_file_is_rebuilt(fresh_library, tmp_path):
    fresh_library.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    cc, flags = native._compiler(), native.FLAG_SETS[-1]
    first = native._build(cc, flags)
    changed = tmp_path / "nf4_kernel.c"
    changed.write_text(native.SOURCE.read_text() + "\n/* changed */\n")
    fresh_library.setattr(native, "SOURCE", changed)
    assert native._build(cc, flags) != first
    fresh_library.undo()
    fresh_library.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    first.write_bytes(b"")  # a cached file that does not load
    lib = native._load(cc, flags)
    assert lib.lorakit_nf4_best_isa() in range(len(native.ISAS)) and first.stat().st_size > 0


def test_an_unwritable_cache_builds_in_a_private_folder(fresh_library, tmp_path):
    fresh_library.setenv("LORAKIT_CACHE", str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("not a folder")
    fresh_library.setenv("TMPDIR", str(tmp_path))
    fresh_library.setattr(native.tempfile, "tempdir", None)  # re-read TMPDIR
    uid = os.getuid()
    mine = native._build_dir()
    assert mine == tmp_path / f"lorakit-native-{uid}" and mine.stat().st_mode & 0o777 == 0o700
    mine.chmod(0o777)  # a folder others can write (or that someone else made first) is not used
    other = native._build_dir()
    assert other != mine and other.parent == tmp_path and other.stat().st_mode & 0o777 == 0o700
