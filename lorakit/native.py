"""A small C kernel for NF4 dequantization on the CPU, built on first use with the system's C compiler.

`lorakit.nf4.dequantize_nf4` is taught and tested as pure torch: a 256-entry table lookup, then one
multiplication per block. Torch runs that as three separate passes over memory (index conversion, lookup,
multiply), which on the small matrices of a 135M model costs 3-5x what bitsandbytes' single C call does.
`nf4_kernel.c` (next to this file) does the same arithmetic in one pass, so its output is bit for bit the
torch path's; tests/test_native.py checks that for every instruction set this CPU runs.

The kernel is plain C (no torch headers, no Python API), compiled once per machine with `$CC` (else `cc`,
`gcc` or `clang`), with OpenMP when the compiler has it, into `lorakit.models.cache_dir()/native/`, and
called through ctypes. Where no compiler works, or with `LORAKIT_NATIVE=0`, `dequantize_nf4` stays on the
pure-torch path and `status()` says why. Nothing is printed either way.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("nf4_kernel.c")
ISAS = ("scalar", "avx2", "avx512")  # the kernel's instruction-set versions, by its numbering
# Tried in order: with OpenMP (threads), then without (one thread) for compilers that lack it.
FLAG_SETS = (["-O3", "-fPIC", "-shared", "-fopenmp"], ["-O3", "-fPIC", "-shared"])
BUILD_TIMEOUT_S = 120

_why_not = ""


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _private_temp_dir() -> Path:
    """A folder in the temporary directory that only this user can write, so nobody else can plant a library there."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    folder = Path(tempfile.gettempdir()) / f"lorakit-native-{uid}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.lstat()
        if folder.is_dir() and not folder.is_symlink() and info.st_uid == uid and not info.st_mode & 0o022:
            return folder
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="lorakit-native-"))  # someone else's folder: a fresh one, built anew


def _build_dir() -> Path:
    from lorakit.models import cache_dir

    folder = cache_dir() / "native"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, delete=True)
        probe.close()
        return folder
    except OSError:  # a read-only checkout or cache: build where only this user can write
        return _private_temp_dir()


def _build(cc: str, flags: list[str], rebuild: bool = False) -> Path:
    """The compiled library for these flags, built now unless an identical build is cached (or `rebuild`)."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(flags).encode(), platform.machine().encode()]))
    target = _build_dir() / f"nf4_kernel-{key.hexdigest()[:16]}.so"
    if target.is_file() and not rebuild:
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:  # build beside the target, then rename: processes building at once never see half a file
        subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], check=True, capture_output=True, timeout=BUILD_TIMEOUT_S)
        os.chmod(tmp, 0o755)  # readable by others sharing a LORAKIT_CACHE (mkstemp makes it private)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load(cc: str, flags: list[str]) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(str(_build(cc, flags)))
    except OSError:  # a cached file that does not load (truncated, or from another machine): build it again
        return ctypes.CDLL(str(_build(cc, flags, rebuild=True)))


@cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (see `status()`); built on the first call in a process, then cached."""
    global _why_not
    if os.environ.get("LORAKIT_NATIVE", "1") == "0":
        _why_not = "disabled by LORAKIT_NATIVE=0"
        return None
    cc = _compiler()
    if cc is None:
        _why_not = "no C compiler found ($CC, cc, gcc or clang)"
        return None
    errors = []
    for flags in FLAG_SETS:
        try:
            lib = _load(cc, flags)
        except subprocess.CalledProcessError as e:
            errors.append(f"`{cc} {' '.join(flags)}` failed: {e.stderr.decode(errors='replace').strip()[:300]}")
            continue
        except (OSError, subprocess.TimeoutExpired) as e:
            errors.append(f"`{cc} {' '.join(flags)}`: {e}")
            continue
        lib.lorakit_nf4_dequantize.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_int] * 2
        lib.lorakit_nf4_dequantize.restype = ctypes.c_int
        lib.lorakit_nf4_best_isa.restype = ctypes.c_int
        lib.lorakit_nf4_openmp.restype = ctypes.c_int
        return lib
    _why_not = "; ".join(errors)
    return None


def best_isa() -> str | None:
    """The fastest version of the kernel this CPU runs ('avx512', 'avx2' or 'scalar'), or None without one."""
    lib = library()
    return None if lib is None else ISAS[lib.lorakit_nf4_best_isa()]


def supported_isas() -> list[str]:
    """Every version of the kernel this CPU runs, slowest first (empty without a kernel)."""
    best = best_isa()
    return [] if best is None else list(ISAS[: ISAS.index(best) + 1])


def status() -> str:
    """One line: which dequantization path `lorakit.nf4` takes on the CPU here, and why."""
    lib = library()
    if lib is None:
        return f"pure torch ({_why_not})"
    threads = "OpenMP threads" if lib.lorakit_nf4_openmp() else "one thread (built without OpenMP)"
    return f"C kernel ({best_isa()}, {threads})"


# Below this many values a second thread costs more than it saves (one 2-core Xeon, blocksize 64:
# 32,768 values took 5.6 us on one thread and 6.2 us on two; 65,536: 9.5 and 8.3 us; 131,072: 16.2 and 12.8 us).
PARALLEL_MIN_VALUES = 65536
MAX_BLOCKSIZE = 2**62


def dequantize_into(
    data: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    out: torch.Tensor,
    blocksize: int,
    isa: str | None = None,
    threads: int | None = None,
) -> None:
    """Fill `out` (float32, contiguous, CPU) with the dequantized values of `data` (uint8 codes, two per
    byte, high nibble first) in blocks of `blocksize`, each block's levels `code` times its `absmax`.

    `isa` picks a version of the kernel (default: the best this CPU runs); `threads` defaults to torch's
    thread count for tensors of at least `PARALLEL_MIN_VALUES` values, else 1. Raises RuntimeError without
    a kernel (check `library()` first) and ValueError when the tensors do not fit together; the C code
    trusts the sizes it is given, so every check happens here.
    """
    lib = library()
    if lib is None:
        raise RuntimeError(f"the NF4 C kernel is not available: {_why_not}")
    n = out.numel()
    if not 2 <= blocksize <= MAX_BLOCKSIZE or blocksize % 2:  # the C code takes it as a 64-bit integer
        raise ValueError(f"`blocksize` should be a positive even integer up to 2**62, got {blocksize}")
    for name, t, dtype, need in (
        ("data", data, torch.uint8, -(-n // 2)),
        ("absmax", absmax, torch.float32, -(-n // blocksize)),
        ("code", code, torch.float32, 16),
        ("out", out, torch.float32, n),
    ):
        if t.dtype != dtype or not t.is_contiguous() or not t.is_cpu:
            raise ValueError(f"`{name}` should be a contiguous {dtype} CPU tensor, got {t.dtype} on {t.device}")
        if t.numel() < need:
            raise ValueError(f"`{name}` holds {t.numel()} values; {n} outputs need {need}")
    if isa is None:
        index = lib.lorakit_nf4_best_isa()
    elif isa in ISAS:
        index = ISAS.index(isa)
    else:
        raise ValueError(f"`isa` should be one of {ISAS}, got {isa!r}")
    if threads is None:
        threads = torch.get_num_threads() if n >= PARALLEL_MIN_VALUES else 1
    rc = lib.lorakit_nf4_dequantize(
        data.data_ptr(), absmax.data_ptr(), code.data_ptr(), out.data_ptr(), n, blocksize, index, threads
    )
    if rc == -1:
        raise ValueError(f"this CPU does not run the {isa!r} kernel (it runs {supported_isas()})")
    if rc != 0:
        raise ValueError(f"the NF4 C kernel refused n={n}, blocksize={blocksize} (code {rc})")


if __name__ == "__main__":  # `python -m lorakit.native`: build the kernel now and say which path runs
    print(status())
