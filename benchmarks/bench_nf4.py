"""Benchmark: lorakit.nf4 against bitsandbytes on CPU (quantize, dequantize), and QLoRALinear against
bitsandbytes' Linear4bit + peft LoRA (forward + backward).

What it measures
    1. NF4 quantization throughput: `lorakit.nf4.quantize_nf4(w, 64)` against
       `bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")`, float32 input, in GB/s
       of float32 input (4 bytes per weight). The packed bytes and absmax are checked equal first.
    2. NF4 dequantization throughput: `dequantize_nf4` against `bitsandbytes.functional.dequantize_4bit`
       (its C kernel), in GB/s of float32 output; results checked equal first (every shape here has rows a
       multiple of 64, where bitsandbytes' 2-D CPU dequantization is right). `dequantize_nf4` runs
       lorakit.native's C kernel when it builds here (the report's first lines say which path ran); its
       pure-torch path (`native=False`, the reference the kernel is tested against) is timed beside it.
    3. One QLoRA training step of a single layer: forward, then backward with a fixed output gradient, input
       8 x 128 tokens that requires grad, r=16, alpha=32, NF4 blocksize 64 with double quantization, float32
       compute. lorakit's `QLoRALinear.from_linear` against peft's LoRA on a `bitsandbytes.nn.Linear4bit`
       (`support_avx512bf16_for_cpu = False`), built from the same nn.Linear, with the same A and non-zero B;
       outputs and gradients checked close first.

    Shapes (out x in): 4096x4096 (a 7B-class projection) and SmolLM2-135M's 576x576 (q_proj / o_proj),
    1536x576 (gate_proj / up_proj) and 192x576 (k_proj / v_proj); for the training step, its 576x1536
    down_proj too. Each repetition times both implementations, alternating which goes first; the table
    reports medians, the ratio lorakit / bitsandbytes of throughputs (of times for the training step) and a
    95% bootstrap interval for it. Repetitions are sized from a time budget per row (--budget), at least 15.

How to run
    .venv/bin/python benchmarks/bench_nf4.py                 # about 1.5 minutes on 2 idle cores
    .venv/bin/python benchmarks/bench_nf4.py --quick         # seconds: a smoke test, numbers are noise
    .venv/bin/python benchmarks/bench_nf4.py --out benchmarks/results/bench_nf4.md

The goals
    quantize and dequantize: throughput ratio lorakit / bitsandbytes >= 1.0 (at least as fast).
    The training step is reported for information (the issue sets no bound on it).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import io
import os
import statistics
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (ROOT, HERE):  # standalone script: the repository's lorakit, and bench_lora's helpers
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

# isort: off
from lorakit.nf4 import dequantize_nf4, quantize_nf4  # noqa: E402  (first: lorakit quiets bitsandbytes' logger)
from lorakit import native  # noqa: E402
from lorakit.qlora import QLoRALinear  # noqa: E402
import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbF  # noqa: E402
import peft  # noqa: E402
from bench_lora import busy_cores, cpu_model, ratio_ci, usable_cpus  # noqa: E402
# isort: on

QUANT_SHAPES = [(4096, 4096), (576, 576), (1536, 576), (192, 576)]  # (out, in)
STEP_SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096)]
BLOCKSIZE, R, ALPHA = 64, 16, 32
BATCH, SEQ = 8, 128
GOAL = 1.0
MIN_REPS, MAX_REPS = 15, 301


def interleaved(fns: dict, warmup: int, reps: int | None, budget: float) -> dict[str, list[float]]:
    """Seconds per call of each function, repetitions interleaved and alternating in order."""
    names = list(fns)
    pair = 0.0
    for _ in range(warmup):
        pair = 0.0
        for name in names:
            start = time.perf_counter()
            fns[name]()
            pair += time.perf_counter() - start
    if reps is None:
        reps = max(MIN_REPS, min(MAX_REPS, int(budget / max(pair, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    for i in range(reps):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def bench_quant(shape, warmup, reps, budget) -> tuple[dict, dict]:
    torch.manual_seed(0)
    w = 0.02 * torch.randn(shape)
    q = quantize_nf4(w, BLOCKSIZE)
    packed, state = bnbF.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4")
    assert torch.equal(q.data, packed.view(-1)) and torch.equal(q.absmax, state.absmax)
    assert torch.equal(dequantize_nf4(q), bnbF.dequantize_4bit(packed, state))
    assert torch.equal(dequantize_nf4(q, native=False), bnbF.dequantize_4bit(packed, state))
    quant = interleaved(
        {
            "lorakit": lambda: quantize_nf4(w, BLOCKSIZE),
            "bnb": lambda: bnbF.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4"),
        },
        warmup,
        reps,
        budget,
    )
    dequant = interleaved(
        {
            "lorakit": lambda: dequantize_nf4(q),
            "torch": lambda: dequantize_nf4(q, native=False),
            "bnb": lambda: bnbF.dequantize_4bit(packed, state),
        },
        warmup,
        reps,
        budget,
    )
    return quant, dequant


class OneLinear(nn.Module):
    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build_step_pair(d_out: int, d_in: int) -> tuple[nn.Module, nn.Module]:
    """(peft's LoRA layer on a Linear4bit, QLoRALinear) from the same nn.Linear, same A, same non-zero B."""
    linear = nn.Linear(d_in, d_out)
    layer = bnb.nn.Linear4bit(d_in, d_out, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    layer.support_avx512bf16_for_cpu = False
    layer.weight = bnb.nn.Params4bit(
        linear.weight.detach().clone(),
        requires_grad=False,
        blocksize=BLOCKSIZE,
        compress_statistics=True,
        quant_type="nf4",
        module=layer,
    )
    layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"])
    peft_layer = peft.get_peft_model(OneLinear(layer.to("cpu")), config).base_model.model.proj
    ours = QLoRALinear.from_linear(linear, R, ALPHA, blocksize=BLOCKSIZE, double_quant=True)
    with torch.no_grad():
        nn.init.normal_(peft_layer.lora_B["default"].weight, std=0.02)
        ours.weight_absmax_code.copy_(peft_layer.base_layer.weight.quant_state.absmax)  # identical stored base
        ours.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.copy_(peft_layer.lora_B["default"].weight)
    return peft_layer.train(), ours.train()


def bench_step(shape, warmup, reps, budget) -> dict:
    torch.manual_seed(0)
    d_out, d_in = shape
    peft_layer, ours = build_step_pair(d_out, d_in)
    x = torch.randn(BATCH, SEQ, d_in, requires_grad=True)
    grad_out = torch.randn(BATCH, SEQ, d_out)

    def step(layer: nn.Module) -> torch.Tensor:
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        out = layer(x)
        out.backward(grad_out)
        return out.detach()

    out_p, gx_p = step(peft_layer), x.grad.clone()
    out_o, gx_o = step(ours), x.grad.clone()
    torch.testing.assert_close(out_o, out_p, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx_o, gx_p, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.lora_B.grad, peft_layer.lora_B["default"].weight.grad, atol=1e-3, rtol=1e-4)
    return interleaved({"lorakit": lambda: step(ours), "bnb": lambda: step(peft_layer)}, warmup, reps, budget)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (1 warm-up, 3 repetitions): a smoke test")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timed loop per row (default 3)")
    parser.add_argument("--threads", type=int, default=usable_cpus(), help="torch intra-op threads (default: all)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per row (default: from --budget)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report as markdown to this file")
    args = parser.parse_args()
    reps = 3 if args.quick and args.reps is None else args.reps
    warmup = 1 if args.quick else 2

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        run(args, reps, warmup)
    text = buffer.getvalue()
    print(text, end="")
    if args.out is not None:
        command = " ".join([".venv/bin/python benchmarks/bench_nf4.py", *sys.argv[1:]])
        header = (
            "# bench_nf4: lorakit.nf4 / QLoRALinear vs bitsandbytes (+ peft) on CPU\n\n"
            f"Produced by `{command}` on {datetime.date.today()}, "
            f"{cpu_model()}, {usable_cpus()} usable CPUs.\n\n"
        )
        args.out.write_text(header + "```\n" + text + "```\n")


def run(args, reps, warmup) -> None:
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, peft {peft.__version__}, CPU: {cpu_model()}")
    how_many = reps or f"{MIN_REPS}-{MAX_REPS} (about {args.budget:g} s per row)"
    print(
        f"torch threads: {torch.get_num_threads()}; NF4 blocksize {BLOCKSIZE}; {warmup} warm-up, median of "
        f"{how_many} interleaved repetitions"
    )
    print(f"lorakit dequantize_nf4 on this CPU: {native.status()}")
    busy = busy_cores()
    if busy is not None:
        print(f"CPU cores busy with other work before the run: {busy:.2f} of {os.cpu_count()}")
        if busy > 0.25:
            print("warning: other processes are using the CPUs; timings will be noisy")
    print()

    t0 = time.perf_counter()
    quant_rows, dequant_rows, missed, unresolved = [], [], [], []
    for shape in QUANT_SHAPES:
        gbytes = shape[0] * shape[1] * 4 / 1e9
        name = f"{shape[0]}x{shape[1]}"
        for kind, times, rows in zip(
            ("quantize", "dequantize"),
            bench_quant(shape, warmup, reps, args.budget),
            (quant_rows, dequant_rows),
            strict=True,
        ):
            ours, theirs = statistics.median(times["lorakit"]), statistics.median(times["bnb"])
            ratio = theirs / ours  # throughput ratio lorakit / bitsandbytes
            lo_t, hi_t = ratio_ci(times["lorakit"], times["bnb"])  # interval of the time ratio
            lo, hi = 1 / hi_t, 1 / lo_t
            pure = f" {gbytes / statistics.median(times['torch']):.2f} |" if "torch" in times else ""
            rows.append(
                f"| {name} | {gbytes / ours:.2f} |{pure} {gbytes / theirs:.2f} | {ratio:.2f} | {lo:.2f}-{hi:.2f} "
                f"| {len(times['lorakit'])} |"
            )
            if ratio < GOAL:
                missed.append(f"{kind} {name} ({ratio:.2f})")
            if lo <= GOAL < hi:
                unresolved.append(f"{kind} {name}")
    head = "| shape (out x in) | lorakit GB/s | bitsandbytes GB/s | ratio (lorakit/bnb) | ratio 95% CI | reps |"
    rule = "|---|---:|---:|---:|---:|---:|"
    print("NF4 quantize, GB/s of float32 input")
    print("\n".join([head, rule, *quant_rows]))
    print("\nNF4 dequantize, GB/s of float32 output (pure torch: `dequantize_nf4(q, native=False)`, for reference)")
    head = head.replace("| lorakit GB/s |", "| lorakit GB/s | pure torch GB/s |")
    print("\n".join([head, rule + "---:|", *dequant_rows]))
    if missed:
        print(f"\nGoal throughput ratio >= {GOAL} NOT met on: {', '.join(missed)}")
    else:
        print(f"\nGoal throughput ratio >= {GOAL} held on every shape.")
    if unresolved:
        print(f"(noise: the 95% interval contains {GOAL} for {', '.join(unresolved)}; a larger --budget narrows it)")

    step_rows = []
    for shape in STEP_SHAPES:
        times = bench_step(shape, warmup, reps, args.budget)
        ours, theirs = statistics.median(times["lorakit"]), statistics.median(times["bnb"])
        lo, hi = ratio_ci(times["lorakit"], times["bnb"])
        step_rows.append(
            f"| {shape[0]}x{shape[1]} | {ours * 1e3:.2f} | {theirs * 1e3:.2f} | {ours / theirs:.3f} "
            f"| {lo:.3f}-{hi:.3f} | {len(times['lorakit'])} |"
        )
    print(f"\nQLoRA training step (forward + backward), {BATCH}x{SEQ} tokens, r={R}, double-quantized NF4 base")
    print(
        "| shape (out x in) | QLoRALinear ms | Linear4bit + peft ms | time ratio (lorakit/bnb) | ratio 95% CI | reps |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(step_rows))
    print(f"\n({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
