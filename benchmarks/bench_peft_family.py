"""Benchmark: prompt tuning, prefix tuning and LoRA (peft) on the course's warehouse task, trained long enough
to compare, with results that notebook 07 plots beside its own short live run.

What it runs
    SmolLM2-135M-Instruct (float32, offline) wrapped three ways with peft, each on its own copy of the model:
      prompt  PromptTuningConfig, 8 virtual tokens initialised from the text of an instruction
      prefix  PrefixTuningConfig, 8 virtual tokens (a key/value prefix in each of the 30 layers)
      lora    LoraConfig r=8, alpha=16, every linear layer of the top three decoder layers
    The same 320 training tickets, trained by `lorakit.train.train` (the loop notebook 07's live run uses: the same
    batches in the same order for every method), batch 8, AdamW, `--steps` steps (default 96); learning rates 3e-2
    (prompt, peft's own prompt-tuning example), 1e-2 (prefix, peft's example) and 2e-3 (LoRA, the course's value).
    Every method runs the whole model forward and backward (no cache). Held-out accuracy (the four actions ranked at
    the answer position, `lorakit.fast.accuracy`) on 200 test tickets at the steps in `--eval-at` and at the end,
    with standard errors.

How to run
    .venv/bin/python benchmarks/bench_peft_family.py            # about 15 minutes on 2 idle cores
    .venv/bin/python benchmarks/bench_peft_family.py --steps 4 --eval-at 2 --n-test 16 --out /tmp/x  # smoke test

Writes `<out>.json` (loss per step, accuracy per evaluation, seconds) and `<out>.md` (the tables), by default
benchmarks/results/peft_family.{json,md}; notebook 07 reads the JSON.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import lorakit  # noqa: E402,F401  (before peft: quiets bitsandbytes' import warning)
from lorakit.data import SYSTEM, accuracy_with_stderr, task_splits  # noqa: E402
from lorakit.fast import accuracy, top_layer_targets  # noqa: E402
from lorakit.models import checkpoint_dir, load_smollm2  # noqa: E402
from lorakit.train import train  # noqa: E402

from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model  # noqa: E402  isort: skip

N_VIRTUAL = 8
INIT_TEXT = "Reply with one action: ESCALATE, REPLACE, REFUND or DENY."
LEARNING_RATES = {"prompt": 3e-2, "prefix": 1e-2, "lora": 2e-3}
ROOT = Path(__file__).resolve().parent


def configs(base) -> dict:
    return {
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, prompt_tuning_init="TEXT",
                                     prompt_tuning_init_text=INIT_TEXT, tokenizer_name_or_path=str(checkpoint_dir())),
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL),
        "lora": LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=top_layer_targets(base, 3)),
    }


def run(method, config, base, tokenizer, splits, steps, batch_size, eval_at, seed=0) -> dict:
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), config)
    evals, eval_seconds = [], 0.0

    def evaluate(step: int, loss: float) -> None:  # lorakit.train's hook after each step
        nonlocal eval_seconds
        if step in eval_at or step == steps:
            t0 = time.perf_counter()
            correct = accuracy(model, tokenizer, splits["test"], system=SYSTEM)
            eval_seconds += time.perf_counter() - t0
            p, se = accuracy_with_stderr(correct)
            evals.append({"step": step, "accuracy": p, "stderr": se, "correct": [int(c) for c in correct]})
            tqdm.write(f"{method:<7} step {step:>4}: loss {loss:.3f}, held-out accuracy {p:.3f} ± {se:.3f}")

    start = time.perf_counter()
    losses = train(model, tokenizer, splits["train"], steps=steps, batch_size=batch_size, lr=LEARNING_RATES[method],
                   seed=seed, system=SYSTEM, after_step=evaluate)  # the loop notebook 07's live run uses
    seconds = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"lr": LEARNING_RATES[method], "trainable": trainable, "losses": losses, "evals": evals,
            "seconds_per_step": (seconds - eval_seconds) / steps, "seconds": seconds}


def markdown(result: dict) -> str:
    lines = ["# bench_peft_family: prompt tuning vs prefix tuning vs LoRA on the warehouse task", "",
             f"Produced by `{result['command']}` on {result['date']}, {result['machine']}.", "",
             f"{result['steps']} steps of batch {result['batch_size']}, {result['n_train']} training tickets, "
             f"{result['n_test']} held-out tickets, float32, torch threads {result['threads']}.", "",
             "| method | lr | trainable | " + " | ".join(f"acc @ {s}" for s in result["eval_steps"])
             + " | s/step | final loss (mean of last 8) |",
             "|---|---:|---:|" + "---:|" * len(result["eval_steps"]) + "---:|---:|"]
    for method, res in result["methods"].items():
        accs = " | ".join(f"{e['accuracy']:.3f} ± {e['stderr']:.3f}" for e in res["evals"])
        tail = res["losses"][-8:]
        lines.append(f"| {method} | {res['lr']:g} | {res['trainable']:,} | {accs} | {res['seconds_per_step']:.2f} | "
                     f"{sum(tail) / len(tail):.3f} |")
    lines += ["", f"(whole run: {result['seconds']:.0f} s; 1-minute load average at start and end: "
              f"{result.get('load_average', '?')}; above 2 on 2 CPUs, other work shared them: s/step is noise)",
              ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n-train", type=int, default=320)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--eval-at", type=int, nargs="*", default=[32])
    parser.add_argument("--out", default=str(ROOT / "results" / "peft_family"))
    args = parser.parse_args()
    torch.set_default_dtype(torch.float32)
    base, tokenizer = load_smollm2()
    splits = task_splits(n_train=args.n_train, n_val=0, n_test=args.n_test, seed=0)
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    methods = {}
    for method, config in configs(base).items():
        methods[method] = run(method, config, base, tokenizer, splits, args.steps, args.batch_size, set(args.eval_at))
    cpu = platform.processor() or platform.machine()
    result = {
        "command": " ".join(["python benchmarks/bench_peft_family.py", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(), "machine": f"{cpu}, {os.cpu_count()} CPUs",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "steps": args.steps,
        "batch_size": args.batch_size, "n_train": args.n_train, "n_test": args.n_test,
        "eval_steps": sorted({s for s in args.eval_at if s < args.steps} | {args.steps}),
        "methods": methods, "seconds": time.perf_counter() - start,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
