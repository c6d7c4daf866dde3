"""Benchmark: lorakit's LoRALinear against peft's LoRA Linear layer, forward + backward on CPU.

What it measures
    Wall-clock time of one training step of a single LoRA-wrapped linear layer: forward, then
    backward with a fixed random output gradient, in float32 on the CPU. r=16, alpha=32, no dropout,
    input of 8 x 128 tokens. The input requires grad (as it does for every layer but the first in a
    network), so backward computes the gradients of lora_A, lora_B and of the input; W0 and its bias
    are frozen in both.

    Both layers are built in one process around the same frozen base nn.Linear: peft's through
    `peft.get_peft_model` on a one-Linear module (the layer itself, a `peft.tuners.lora.layer.Linear`,
    is then called directly, so PeftModel's wrapper is not timed), lorakit's by wrapping that very
    base module (same W0 memory) and copying peft's lora_A / lora_B (B set non-zero first). Outputs
    and all gradients are checked with `torch.testing.assert_close` before any timing. After a
    warm-up, each repetition times one step of each implementation, alternating which goes first, and
    the table reports the median per implementation, the ratio of the medians and a 95% bootstrap
    interval for that ratio. The number of repetitions is sized per shape from a time budget
    (--budget), at least 45.

    Shapes (in_features, out_features): 576x576 (SmolLM2-135M's q_proj / o_proj), 576x1536 (its MLP
    gate_proj / up_proj), 1536x576 (its down_proj) and 4096x4096 (a 7B-class attention projection).

How to run
    .venv/bin/python benchmarks/bench_lora.py            # full run, about 70 s on 2 idle cores
    .venv/bin/python benchmarks/bench_lora.py --quick    # a few seconds: smoke test, numbers are noise
    .venv/bin/python benchmarks/bench_lora.py --threads 4

The goal
    lorakit is a teaching implementation, but it must not cost more than peft's: the ratio
    lorakit / peft should be at most 1.05 on every shape. The line after the table says whether it
    held; a note follows for shapes whose 95% interval still contains 1.05 (too noisy to decide).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # standalone script: make the repository's lorakit importable without installing it
    sys.path.insert(0, str(ROOT))

# isort: off
from lorakit.lora import LoRALinear  # noqa: E402  (first: lorakit quiets the warning bitsandbytes logs when peft loads it)
import peft  # noqa: E402
# isort: on

SHAPES = [(576, 576), (576, 1536), (1536, 576), (4096, 4096)]
R, ALPHA = 16, 32
BATCH, SEQ = 8, 128
GOAL = 1.05
MIN_REPS, MAX_REPS = 45, 301


class OneLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build_pair(d_in: int, d_out: int) -> tuple[nn.Module, LoRALinear]:
    """peft's LoRA layer and a lorakit LoRALinear with identical base and adapter weights."""
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"])
    peft_layer = peft.get_peft_model(OneLinear(d_in, d_out), config).base_model.model.proj
    assert isinstance(peft_layer, peft.tuners.lora.layer.Linear), type(peft_layer)
    with torch.no_grad():
        nn.init.normal_(peft_layer.lora_B["default"].weight, std=0.02)  # B = 0 would make the check trivial
    # The very same frozen base module (same W0 memory), so only the adapter code differs between the two.
    ours = LoRALinear(peft_layer.base_layer, r=R, alpha=ALPHA)
    with torch.no_grad():
        ours.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.copy_(peft_layer.lora_B["default"].weight)
    assert ours.scaling == peft_layer.scaling["default"]
    return peft_layer.train(), ours.train()


def step(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """One forward + backward; gradients are reset (to None) before, outside the timed region."""
    out = layer(x)
    out.backward(grad_out)
    return out


def reset_grads(layer: nn.Module, x: torch.Tensor) -> None:
    x.grad = None
    for p in layer.parameters():
        p.grad = None


def check_match(peft_layer: nn.Module, ours: LoRALinear, x: torch.Tensor, grad_out: torch.Tensor) -> None:
    reset_grads(peft_layer, x)
    out_p = step(peft_layer, x, grad_out).detach()
    gx_p = x.grad.clone()
    reset_grads(ours, x)
    out_o = step(ours, x, grad_out).detach()
    gx_o = x.grad.clone()
    torch.testing.assert_close(out_o, out_p)
    torch.testing.assert_close(gx_o, gx_p)
    torch.testing.assert_close(ours.lora_A.grad, peft_layer.lora_A["default"].weight.grad)
    torch.testing.assert_close(ours.lora_B.grad, peft_layer.lora_B["default"].weight.grad)
    assert ours.base.weight.grad is None and peft_layer.base_layer.weight.grad is None


def timed_step(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> float:
    reset_grads(layer, x)
    start = time.perf_counter()
    step(layer, x, grad_out)
    return time.perf_counter() - start


def bench_shape(d_in: int, d_out: int, warmup: int, reps: int | None, budget: float) -> dict[str, list[float]]:
    """Seconds per step of each repetition, per implementation ("lorakit", "peft").

    With `reps` None, the count is sized from the warm-up so that the timed loop takes about `budget`
    seconds, within [MIN_REPS, MAX_REPS].
    """
    torch.manual_seed(0)
    peft_layer, ours = build_pair(d_in, d_out)
    x = torch.randn(BATCH, SEQ, d_in, requires_grad=True)
    grad_out = torch.randn(BATCH, SEQ, d_out)
    check_match(peft_layer, ours, x, grad_out)

    layers = {"lorakit": ours, "peft": peft_layer}
    pair = 0.0
    for _ in range(warmup):
        pair = sum(timed_step(layer, x, grad_out) for layer in layers.values())
    if reps is None:
        reps = max(MIN_REPS, min(MAX_REPS, int(budget / max(pair, 1e-6))))

    times: dict[str, list[float]] = {name: [] for name in layers}
    gc.collect()
    for i in range(reps):
        order = ("lorakit", "peft") if i % 2 == 0 else ("peft", "lorakit")  # alternate who goes first
        for name in order:
            times[name].append(timed_step(layers[name], x, grad_out))
    return times


def ratio_ci(ours: list[float], theirs: list[float], resamples: int = 1000) -> tuple[float, float]:
    """95% bootstrap interval of median(ours) / median(theirs), resampling the repetitions in pairs."""
    rng = random.Random(0)
    n = len(ours)
    ratios = []
    for _ in range(resamples):
        idx = rng.choices(range(n), k=n)
        ratios.append(statistics.median(ours[i] for i in idx) / statistics.median(theirs[i] for i in idx))
    ratios.sort()
    return ratios[int(0.025 * resamples)], ratios[int(0.975 * resamples) - 1]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cpus() -> int:
    affinity = getattr(os, "sched_getaffinity", None)  # Linux only
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def busy_cores(seconds: float = 0.5) -> float | None:
    """CPU cores kept busy by other processes right now (from /proc/stat; None where unavailable)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    ncpu = os.cpu_count() or 1
    return ncpu * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (1 warm-up, 3 repetitions): a smoke test")
    parser.add_argument("--budget", type=float, default=8.0, help="seconds of timed loop per shape (default 8)")
    parser.add_argument("--threads", type=int, default=usable_cpus(), help="torch intra-op threads (default: all)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per shape (default: from --budget)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per shape (default 3, quick 1)")
    args = parser.parse_args()
    reps = 3 if args.quick and args.reps is None else args.reps
    warmup = max(1, args.warmup if args.warmup is not None else (1 if args.quick else 3))

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, peft {peft.__version__}, CPU: {cpu_model()}")
    print(f"torch threads: {torch.get_num_threads()}; float32; r={R}, alpha={ALPHA}; input {BATCH}x{SEQ} tokens")
    how_many = reps or f"{MIN_REPS}-{MAX_REPS} (about {args.budget:g} s per shape)"
    print(f"forward + backward per step; {warmup} warm-up, median of {how_many} interleaved repetitions")
    busy = busy_cores()
    if busy is not None:
        print(f"CPU cores busy with other work before the run: {busy:.2f} of {os.cpu_count()}")
        if busy > 0.25:
            print("warning: other processes are using the CPUs; timings will be noisy")
    print()

    rows, missed, unresolved, counts = [], [], [], []
    t0 = time.perf_counter()
    for d_in, d_out in SHAPES:
        times = bench_shape(d_in, d_out, warmup, reps, args.budget)
        shape = f"{d_in}x{d_out}"
        counts.append(f"{shape}: {len(times['lorakit'])}")
        ours, theirs = statistics.median(times["lorakit"]), statistics.median(times["peft"])
        ratio = ours / theirs
        lo, hi = ratio_ci(times["lorakit"], times["peft"])
        rows.append(f"| {shape} | {ours * 1e3:.2f} | {theirs * 1e3:.2f} | {ratio:.3f} | {lo:.3f}-{hi:.3f} |")
        if ratio > GOAL:
            missed.append(f"{shape} ({ratio:.3f})")
        if lo <= GOAL < hi:
            unresolved.append(shape)

    print("| shape (in x out) | lorakit ms | peft ms | ratio (lorakit/peft) | ratio 95% CI |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(rows))
    print(f"\n(repetitions: {', '.join(counts)}; {time.perf_counter() - t0:.1f} s)")
    if missed:
        print(f"Goal ratio <= {GOAL} NOT met on: {', '.join(missed)}")
    else:
        print(f"Goal ratio <= {GOAL} held on every shape.")
    if unresolved:
        print(f"(noise: the 95% interval contains {GOAL} for {', '.join(unresolved)}; a larger --budget narrows it)")


if __name__ == "__main__":
    main()
