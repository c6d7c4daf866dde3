"""The course's fine-tune on a CUDA GPU, measured in one command: speed, FLOPs and memory, each against its prediction.

What it measures (default mode, random weights)
    1. bitsandbytes: does it import, does its CUDA library load, are its NF4 bytes lorakit's, does its paged AdamW
       step (`lorakit.finetune.optimizer_factory` falls back to torch's AdamW, saying so, where it does not).
    2. The GPU's bf16 matrix-product rate, measured (8192^3, CUDA events), beside its data-sheet peak.
    3. Notebook 11's guarded step (top 10 layers from cached hidden states, KL guard on replay text, the tickets'
       shared prefix once a batch) for LoRA in bf16 at batch 16, 64 and 256, and QLoRA and DoRA at batch 16, on
       SmolLM2-135M's architecture built from its config with random weights: the model's weights are too large to
       carry to a machine with no network, and speed, FLOPs and memory depend on shapes alone (accuracy would need
       the real weights: see `--gguf`). For each: the median milliseconds of a step after untimed warm-up steps (CUDA
       events), tokens per second, the FLOPs of every matrix product of the timed steps (`finetune.step_flops`),
       checked against torch's FLOP counter on one step, the achieved TFLOP/s and MFU against the data-sheet peak
       and against the measured matrix-product rate; and memory three ways, each against its prediction: static
       (weights, quantization constants and caches, before training), one step's peak over what was allocated at
       its start (the activations kept for backward and the gradients), and the whole run's peak; plus the kept
       activations counted from the tensors themselves.
    4. The RESULT line of the LoRA batch-16 run.
    Results go to `--out` as gpu.json and gpu.md, rewritten after every part, so that a run cut short keeps what it
    measured.

With real weights (`--gguf PART1 PART2`)
    The SmolLM2 GGUF file, split in two halves (each small enough to carry in one call), joined and checked against
    the checksum in the bundle, converted once, then notebook 11's fine-tune (benchmarks/bench_finetune.py) for LoRA,
    QLoRA and DoRA: task accuracy and regression perplexity before and after, tokens/s, MFU, memory, RESULT lines.

How to run
    make gpu-bundle                              # here: writes gpu-bundle/ and the weights' halves
    python3 gpu-bundle/bench_gpu.py              # on the GPU machine: installs the bundle's wheels, then measures
    python3 gpu-bundle/bench_gpu.py --gguf part1 part2   # on the GPU machine: the fine-tune with real weights
    .venv/bin/python benchmarks/bench_gpu.py --tiny      # here, on the CPU: the whole path on a tiny model (tested)
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
DEFAULT_CONFIGS = "lora:16,lora:64,lora:256,qlora:16,dora:16"  # add one again to see how steady it is


def use_bundle() -> str:
    """Where lorakit comes from. In a bundle (a `wheels/` folder beside this script) the wheels are installed once,
    without network or dependencies, into `site/` beside them (or a temporary folder when that is read-only) and put
    first on sys.path, ahead of the machine's own packages; in the repository, its checkout."""
    wheels = sorted((HERE / "wheels").glob("*.whl"))
    if not wheels:
        sys.path.insert(0, str(HERE.parent))
        return f"repository checkout {HERE.parent}"
    site = HERE / "site"
    if not os.access(HERE, os.W_OK):
        site = Path(tempfile.gettempdir()) / "lorakit-gpu-bundle-site"
    stamp, names = site / ".installed", "\n".join(w.name for w in wheels)
    if not stamp.is_file() or stamp.read_text() != names:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index",
                        "--no-deps", "--no-compile", "--upgrade", "--target", str(site), *map(str, wheels)],
                       check=True)
        stamp.write_text(names)
    sys.path.insert(0, str(site))
    return f"bundle wheels in {site}: " + ", ".join(w.name for w in wheels)


SOURCE = use_bundle()

import torch  # noqa: E402

from lorakit import finetune  # noqa: E402
from lorakit.data import regression_texts, task_splits  # noqa: E402
from lorakit.fast import cache_hidden_states, cached_loss  # noqa: E402
from lorakit.memory import MB, measure_training_state, nf4_bits_per_param, predict_training_state  # noqa: E402
from lorakit.train import StepTimer  # noqa: E402


class Report:
    """The JSON and Markdown results, rewritten after every part."""

    def __init__(self, out: Path):
        self.out = out
        self.data: dict = {"parts": {}}
        out.mkdir(parents=True, exist_ok=True)

    def part(self, name: str, value) -> None:
        self.data["parts"][name] = value
        (self.out / "gpu.json").write_text(json.dumps(self.data, indent=1, default=str))
        (self.out / "gpu.md").write_text(markdown(self.data))


def run_part(report: Report, name: str, fn, *args):
    """Run one part; a failure is written down with its traceback and the next part runs."""
    t0 = time.perf_counter()
    print(f"\n== {name}", flush=True)
    try:
        value = fn(*args)
    except Exception as error:  # noqa: BLE001 - one broken part must not lose the others
        traceback.print_exc()
        value = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
    if isinstance(value, dict):
        value.setdefault("seconds", round(time.perf_counter() - t0, 1))
    report.part(name, value)
    print(json.dumps({k: v for k, v in value.items() if k != "traceback"} if isinstance(value, dict) else value,
                     default=str)[:2000], flush=True)
    return value


# --- 1. the machine and bitsandbytes ---------------------------------------------------------------------------


def environment(device: str) -> dict:
    import peft
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "peft": peft.__version__, "lorakit": SOURCE,
            "device": device, "platform": platform.platform()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, datasheet_bf16_tflops=_tflops(finetune.peak_flops()))
    return info


def _tflops(x):
    return None if x is None else round(x / 1e12, 1)


def bitsandbytes_check(device: str) -> dict:
    from lorakit.nf4 import dequantize_nf4, quantize_nf4

    result: dict = {}
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbF
    except Exception as error:  # noqa: BLE001
        return {"import": f"failed: {type(error).__name__}: {error}"}
    result["version"] = bnb.__version__
    torch.manual_seed(0)
    w = (0.02 * torch.randn(1024, 576)).to(device)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    q = quantize_nf4(w, blocksize=64)
    result["nf4_bytes_equal_lorakit"] = bool(torch.equal(packed.view(-1), q.data.view(-1)))
    result["nf4_absmax_equal_lorakit"] = bool(torch.equal(state.absmax, q.absmax))
    theirs = bnbF.dequantize_4bit(packed, state).reshape(w.shape)
    result["nf4_dequantize_max_difference"] = float((theirs - dequantize_nf4(q)).abs().max())
    problem = finetune._bitsandbytes_cuda_problem() if device == "cuda" else "not a CUDA device"
    result["paged_adamw_steps"] = problem is None
    result["optimizer_used"] = finetune.optimizer_name(device)
    return result


def matmul_rate(device: str) -> dict:
    """The measured dense matrix-product rate: bf16 8192^3 on a GPU (3 untimed, then 10 timed, CUDA events)."""
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    timer = StepTimer(device, warmup=3)
    for _ in range(13):
        timer.start()
        a @ b
        timer.stop()
    ms = statistics.median(timer.milliseconds())
    return {"shape": f"{n}x{n}x{n}", "dtype": str(dtype).replace("torch.", ""), "median_ms": round(ms, 3),
            "tflops": round(2 * n**3 / ms / 1e9, 1)}


# --- 2. one configuration ----------------------------------------------------------------------------------------


def static_prediction(peft_model, caches) -> int:
    """Weights (4-bit ones as their packed bytes plus NF4 constants at double quantization's 4.127 bits), buffers and
    the caches' tensors: what should be allocated before the first step."""
    total = 0
    constants = nf4_bits_per_param(True) - 4  # bits per parameter beside the 4-bit code
    for p in peft_model.parameters():
        total += p.numel() * p.element_size()
        if getattr(p, "quant_state", None) is not None:
            total += round(2 * p.numel() * constants / 8)  # 2 values a byte
    total += sum(b.numel() * b.element_size() for b in peft_model.buffers())
    for cache in caches:
        total += sum(t.numel() * t.element_size() for t in vars(cache).values() if isinstance(t, torch.Tensor))
    return total


def one_configuration(method: str, batch: int, args, device: str, dtype, matmul_tflops: float | None) -> dict:
    cuda = device == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
    base = torch.cuda.memory_allocated() if cuda else 0
    settings = finetune.Settings(model=str(args.model), method=method, batch_size=batch, top_k=args.top_k,
                                 steps=args.warmup + args.steps, n_train=max(args.n_train, batch), n_test=1,
                                 device=device, dtype=dtype)
    model, tokenizer = finetune.random_base(settings)
    tickets = task_splits(n_train=settings.n_train, n_val=0, n_test=1, seed=0)["train"]
    replay_texts = regression_texts(n=None, seed=0)[64:][: args.n_replay]
    train_cache = cache_hidden_states(model, tokenizer, tickets, top_k=settings.top_k, share_prefix=True,
                                      progress=False)
    replay = finetune.cache_texts(model, tokenizer, replay_texts, top_k=settings.top_k,
                                  max_length=settings.max_length, progress=False)
    peft_model = finetune.add_adapter(model, settings)
    factory = finetune.optimizer_factory(device)
    row: dict = {"method": method, "batch": batch, "dtype": str(dtype).replace("torch.", ""),
                 "optimizer": finetune.optimizer_name(device), "top_k": settings.top_k,
                 "trainable": sum(p.numel() for p in peft_model.parameters() if p.requires_grad)}

    # memory 1: static, before any step
    if cuda:
        torch.cuda.synchronize()
    row["static_measured_mb"] = (torch.cuda.memory_allocated() - base) / MB if cuda else None
    row["static_predicted_mb"] = static_prediction(peft_model, [train_cache, replay]) / MB

    idx, ridx = list(range(batch)), list(range(settings.replay_batch))

    def loss_fn(m, _batch=None):
        return (cached_loss(m, train_cache, idx, share_prefix=True)
                + settings.kl_weight * finetune.kl_to_base(m, replay, ridx))

    # FLOPs of one step: the formula against torch's counter
    peft_model.train()
    counted = finetune.count_flops(lambda: loss_fn(peft_model).backward())
    for p in peft_model.parameters():
        p.grad = None
    formula = finetune.step_flops(peft_model, train_cache, idx, replay, ridx)
    row.update(step_flops_formula=formula["total"], step_flops_torch_counter=counted,
               flops_formula_over_counter=formula["total"] / counted if counted else None)

    # memory 2: the kept activations and the step's state, predicted and counted from the tensors
    width, pre = train_cache.width(idx), train_cache.prefix_len
    acts = finetune.predict_activation_bytes(
        peft_model, settings.top_k, ticket_tokens=pre + batch * (width - pre), prefix_kv_tokens=batch * pre,
        answer_tokens=int((train_cache.labels[idx, 1:width] != -100).sum()),
        replay_tokens=len(ridx) * replay.width(ridx), replay_positions=replay.tokens(ridx) - len(ridx))
    state = predict_training_state(peft_model, optimizer=factory)
    weights = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    measured = measure_training_state(peft_model, {}, optimizer_factory=factory, loss_fn=loss_fn)
    row.update(activations_predicted_mb=acts["total"] / MB, activations_measured_mb=measured.activations / MB,
               optimizer_predicted=state.optimizer, optimizer_measured=measured.optimizer,
               gradients_predicted_equal_measured=state.gradients == measured.gradients,
               paged_optimizer_bytes=measured.paged_optimizer)
    if "DoRA weight temporaries (transient)" in acts:
        row["dora_weight_temporaries_mb"] = acts["DoRA weight temporaries (transient)"] / MB

    # memory 3: one step's peak over its start (optimizer state already allocated by a first step)
    if cuda:
        optimizer = factory([p for p in peft_model.parameters() if p.requires_grad], lr=settings.lr)
        for _ in range(2):
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            loss_fn(peft_model).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        row["step_peak_over_start_measured_mb"] = (torch.cuda.max_memory_allocated() - start) / MB

        def step():
            loss_fn(peft_model).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        try:  # where the time of a step goes
            row.update(gpu_busy(step))
        except Exception as error:  # noqa: BLE001 - the profiler is a diagnostic, not the measurement
            row["gpu_busy_error"] = f"{type(error).__name__}: {error}"
        del optimizer
    row["step_peak_over_start_predicted_mb"] = (acts["total"] + state.gradients) / MB
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if n in weights:
                p.copy_(weights[n])

    # speed: warm-up steps untimed, then CUDA events per step
    with finetune.cuda_peak_memory() as peak:
        run = finetune.train_guarded(peft_model, train_cache, settings.steps, replay=replay,
                                     kl_weight=settings.kl_weight, replay_batch=settings.replay_batch,
                                     batch_size=batch, lr=settings.lr, seed=0, progress=False,
                                     optimizer_factory=factory, warmup=args.warmup)
    flops = sum(finetune.step_flops(peft_model, train_cache, i, replay, r)["total"] for i, r in run["batches"])
    achieved = flops / run["seconds"]
    datasheet = finetune.peak_flops() if cuda else None
    row.update(step_ms_median=statistics.median(run["step_ms"]), step_ms_min=min(run["step_ms"]),
               step_ms_max=max(run["step_ms"]), timed_steps=len(run["step_ms"]), warmup_steps=args.warmup,
               tokens_per_s=run["tokens"] / run["seconds"],
               positions_per_s=run["computed_tokens"] / run["seconds"], flops_per_step=flops / len(run["batches"]),
               achieved_tflops=achieved / 1e12,
               mfu_datasheet=None if datasheet is None else achieved / datasheet,
               mfu_measured_matmul=None if not matmul_tflops else achieved / (matmul_tflops * 1e12),
               final_loss=run["loss"][-1])
    if cuda:
        row["whole_run_peak_mb"] = (peak["peak_bytes"] - base) / MB
    return row


def gpu_busy(step, steps: int = 3) -> dict:
    """How much of a step the GPU spends computing: torch's profiler over `steps` steps, the kernels' own time
    against the wall-clock time (the rest is the host: Python, peft's and transformers' module calls, kernel
    launches), and the kernels launched a step."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps * 1e3
    kernel_us = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages())
    launched = sum(1 for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA"))
    return {"profiled_step_ms": wall, "kernel_ms_per_step": kernel_us / 1e3 / steps,
            "kernels_per_step": launched / steps, "gpu_busy": kernel_us / 1e3 / steps / wall}


# --- 3. real weights ----------------------------------------------------------------------------------------------


def join_gguf(parts: list[Path], expected: str, workdir: Path) -> Path:
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing GGUF part(s) {missing}: carry both halves, the first in one call and the "
                                "second in the next, while the machine is still warm")
    target = workdir / "SmolLM2-135M-Instruct.Q4_1.gguf"
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for part in parts:
            data = part.read_bytes()
            digest.update(data)
            out.write(data)
    if digest.hexdigest() != expected:
        raise ValueError(f"the joined GGUF's sha256 is {digest.hexdigest()}, not {expected}: a part is wrong or "
                         "out of order")
    return target


def real_weights(args, report: Report) -> None:
    expected = (args.sha256 or (HERE / "weights.sha256").read_text().split()[0]).strip()
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    gguf = run_part(report, "join the GGUF halves", lambda: {"path": str(join_gguf(args.gguf, expected, workdir)),
                                                             "sha256": expected})
    if "error" in gguf:
        return
    os.environ["LORAKIT_GGUF"] = gguf["path"]
    os.environ["LORAKIT_CACHE"] = str(workdir / "cache")
    sys.path.insert(0, str(HERE))
    import bench_finetune

    for method in args.methods.split(","):
        out = args.out / f"finetune_{method}.json"

        def fine_tune(method=method, out=out) -> dict:
            bench_finetune.main(["--method", method, "--out", str(out), "--warmup", str(args.warmup),
                                 *shlex.split(args.finetune_args)])
            return json.loads(out.read_text())

        run_part(report, f"fine-tune with real weights: {method}", fine_tune)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --- the report ----------------------------------------------------------------------------------------------------


def _f(x, digits=1, unit=""):
    return "—" if x is None else f"{x:,.{digits}f}{unit}"


def _pct(x):
    return None if x is None else 100 * x


def markdown(data: dict) -> str:
    parts = data["parts"]
    lines = ["# The course's fine-tune on a GPU", "",
             "Written by `benchmarks/bench_gpu.py`. Random weights (SmolLM2-135M's architecture from its config) "
             "unless a section says real weights: speed, FLOPs and memory depend on the shapes alone.", ""]
    for name in ("environment", "bitsandbytes", "matrix-product rate"):
        if name in parts:
            lines += [f"## {name}", "", "```", json.dumps(parts[name], indent=1, default=str)[:3000], "```", ""]
    rows = [(k, v) for k, v in parts.items() if k.startswith("step: ") and isinstance(v, dict)]
    if rows:
        lines += ["## The guarded step", "",
                  "| method | batch | ms/step (median) | tokens/s | TFLOP/s | MFU (data sheet) | MFU (measured matmul) "
                  "| FLOPs formula / torch counter | static MB pred / meas | step peak over start MB pred / meas "
                  "| kept activations MB pred / meas | whole-run peak MB | GPU busy (kernels / wall, ms) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in rows:
            if "error" in r:
                lines.append(f"| {name[6:]} | error: {r['error'][:120]} |" + " |" * 11)
                continue
            lines.append(
                f"| {r['method']} | {r['batch']} | {_f(r['step_ms_median'], 2)} | {_f(r['tokens_per_s'], 0)} | "
                f"{_f(r['achieved_tflops'], 2)} | {_f(_pct(r['mfu_datasheet']), 2, '%')} | "
                f"{_f(_pct(r['mfu_measured_matmul']), 2, '%')} | "
                f"{_f(r['flops_formula_over_counter'], 3)} | "
                f"{_f(r['static_predicted_mb'])} / {_f(r['static_measured_mb'])} | "
                f"{_f(r['step_peak_over_start_predicted_mb'])} / {_f(r.get('step_peak_over_start_measured_mb'))} | "
                f"{_f(r['activations_predicted_mb'])} / {_f(r['activations_measured_mb'])} | "
                f"{_f(r.get('whole_run_peak_mb'))} | {_f(_pct(r.get('gpu_busy')), 0, '%')} "
                f"({_f(r.get('kernel_ms_per_step'))} / {_f(r.get('profiled_step_ms'))}) |")
        lines.append("")
    for name, value in parts.items():
        if name.startswith("fine-tune with real weights") and isinstance(value, dict):
            lines += [f"## {name}", "", "```", value.get("result_line", value.get("error", "")), "```", ""]
    if "RESULT" in parts:
        lines += ["## RESULT", "", "```", str(parts["RESULT"]), "```", ""]
    return "\n".join(lines)


def tiny_model_folder(folder: Path) -> Path:
    """A 4-layer Llama config with SmolLM2's tokenizer: the whole path in seconds on a CPU (`--tiny`)."""
    from transformers import AutoTokenizer, LlamaConfig

    from lorakit.models import checkpoint_dir

    source = HERE / "smollm2" if (HERE / "smollm2" / "tokenizer.json").is_file() else checkpoint_dir()
    tokenizer = AutoTokenizer.from_pretrained(source)
    LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--model", type=Path, default=None, help="config and tokenizer (default: the bundle's smollm2/)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="method:batch, comma-separated")
    p.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--n-train", type=int, default=480)
    p.add_argument("--n-replay", type=int, default=400)
    p.add_argument("--tiny", action="store_true", help="a 4-layer model, few steps: the whole path on a CPU")
    p.add_argument("--gguf", type=Path, nargs="+", default=None, help="real weights: the GGUF's halves, in order")
    p.add_argument("--sha256", default=None, help="the joined GGUF's checksum (default: the bundle's weights.sha256)")
    p.add_argument("--methods", default="lora,qlora,dora", help="with --gguf: the fine-tunes to run")
    p.add_argument("--finetune-args", default="", help="with --gguf: more options for bench_finetune.py")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lorakit-gpu",
                   help="with --gguf: where the joined file and the converted checkpoint go (not --out)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    report = Report(args.out)
    t0 = time.perf_counter()
    run_part(report, "environment", environment, device)
    if args.gguf:
        real_weights(args, report)
        print(f"\nreal-weights run: {time.perf_counter() - t0:.0f} s; results in {args.out}")
        return 0
    if args.tiny:
        args.model = tiny_model_folder(Path(tempfile.mkdtemp(prefix="lorakit-tiny-")))
        args.top_k, args.steps, args.warmup, args.n_train, args.n_replay = 2, 3, 1, 32, 16
        args.configs = "lora:4,qlora:4,dora:4"
    if args.model is None:
        from lorakit.models import checkpoint_dir

        args.model = HERE / "smollm2" if (HERE / "smollm2" / "config.json").is_file() else checkpoint_dir()
    run_part(report, "bitsandbytes", bitsandbytes_check, device)
    rate = run_part(report, "matrix-product rate", matmul_rate, device)
    first, seen = None, set()
    for config in args.configs.split(","):
        method, batch = config.split(":")
        name = f"step: {method} batch {batch}" + (" (again)" if config in seen else "")
        seen.add(config)
        row = run_part(report, name, one_configuration, method, int(batch), args, device,
                       dtype, rate.get("tflops") if device == "cuda" else None)
        first = first or (row if "error" not in row else None)
    if first is not None:
        result = finetune.result_line(
            method=first["method"], batch=first["batch"], tokens_per_s=first["tokens_per_s"],
            step_ms=first["step_ms_median"], mfu=first["mfu_datasheet"] if first["mfu_datasheet"] is not None
            else float("nan"),
            peak_mem_predicted_mb=first["step_peak_over_start_predicted_mb"],
            peak_mem_measured_mb=first.get("step_peak_over_start_measured_mb") or float("nan"), random_weights=1)
        report.part("RESULT", result)
        print(result)
    print(f"\nwhole run: {time.perf_counter() - t0:.0f} s; results in {args.out}/gpu.json and gpu.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
