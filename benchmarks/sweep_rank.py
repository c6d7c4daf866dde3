"""Notebook 04's full experiments, too long to run live: a rank sweep with several seeds, and plain LoRA against
rsLoRA at high rank as learning curves. The notebook plots the stored results beside a short live re-run.

What it runs (SmolLM2-135M-Instruct, float32, offline; `lorakit.add_lora` on every linear layer of the top three
decoder layers; the cached path of `lorakit.fast`; AdamW, batch 16, learning rate 2e-3; 320 training, 64
validation and 200 test tickets from `task_splits(seed=0)`):
  ranks    r = 1, 2, 4, 8, 16, 32, 64 with alpha = 2r (multiplier alpha/r = 2 for every rank), `--steps` steps
           (default 100), seeds 0, 1, 2 (the seed sets the initial A and the batch order). Per run: held-out
           accuracy on the 200 test tickets, validation loss every 10 steps.
  scaling  alpha = 16 held fixed, r = 4, 16, 64, 256, plain LoRA (multiplier 16/r) and rsLoRA (16/sqrt(r)),
           seed 0, the same steps; validation loss every 10 steps and held-out accuracy at the end.

How to run
    .venv/bin/python benchmarks/sweep_rank.py                 # about 20 minutes on 2 idle cores
    .venv/bin/python benchmarks/sweep_rank.py --steps 4 --seeds 0 --ranks 1 2 --scaling-ranks 4 --out /tmp/x
                                                              # smoke test

Writes `<out>.json`, by default benchmarks/results/sweep_rank.json; notebook 04 reads it (`make sweep-rank`).
"""

from __future__ import annotations

import argparse
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

import lorakit  # noqa: E402,F401
from lorakit.data import accuracy_with_stderr, task_splits  # noqa: E402
from lorakit.fast import cache_hidden_states, cached_logits, cached_loss, top_layer_targets, train_cached  # noqa: E402
from lorakit.lora import add_lora, remove_lora  # noqa: E402
from lorakit.models import load_smollm2  # noqa: E402

ROOT = Path(__file__).resolve().parent
TOP, BATCH, LR, EVAL_EVERY = 3, 16, 2e-3, 10
SPLITS = {"n_train": 320, "n_val": 64, "n_test": 200, "seed": 0}
FIXED_ALPHA = 16


def mean_loss(model, cache, batch_size: int = 64) -> float:
    """Mean answer-token loss over a whole cache (rows weighted equally: one answer token each)."""
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(cache), batch_size):
            idx = list(range(i, min(i + batch_size, len(cache))))
            total += cached_loss(model, cache, idx).item() * len(idx)
    model.train(was_training)
    return total / len(cache)


def one_run(model, caches, targets, r, alpha, rslora, seed, steps) -> dict:
    torch.manual_seed(seed)
    add_lora(model, targets, r=r, alpha=alpha, rslora=rslora)
    curve = [(0, mean_loss(model, caches["val"]))]

    def after_step(n, _loss):
        if n % EVAL_EVERY == 0 or n == steps:
            curve.append((n, mean_loss(model, caches["val"])))

    start = time.perf_counter()
    losses = train_cached(model, caches["train"], steps=steps, batch_size=BATCH, lr=LR, seed=seed,
                          progress=False, after_step=after_step)
    seconds = time.perf_counter() - start
    predicted = cached_logits(model, caches["test"]).argmax(-1)
    correct = (predicted == caches["test"].targets).tolist()
    remove_lora(model)
    acc, se = accuracy_with_stderr(correct)
    return {"r": r, "alpha": alpha, "rslora": rslora, "seed": seed, "steps": steps, "seconds": round(seconds, 1),
            "train_loss": [round(x, 5) for x in losses], "val_loss": [(n, round(v, 5)) for n, v in curve],
            "accuracy": acc, "stderr": se, "n_test": len(correct), "predicted": predicted.tolist()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--scaling-ranks", type=int, nargs="+", default=[4, 16, 64, 256])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "sweep_rank")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    splits = task_splits(**SPLITS)
    caches = {k: cache_hidden_states(model, tokenizer, splits[k], top_k=TOP, progress=False) for k in splits}
    targets = top_layer_targets(model, TOP, "all-linear")
    jobs = [("ranks", r, 2 * r, False, seed) for r in args.ranks for seed in args.seeds]
    jobs += [("scaling", r, FIXED_ALPHA, rs, 0) for r in args.scaling_ranks for rs in (False, True)]
    runs = {"ranks": [], "scaling": []}
    for part, r, alpha, rs, seed in tqdm(jobs, desc="runs"):
        runs[part].append(one_run(model, caches, targets, r, alpha, rs, seed, args.steps))
        res = runs[part][-1]
        tqdm.write(f"{part:<8} r={r:<4} alpha={alpha:<4} rslora={rs!s:<5} seed={seed}  acc {res['accuracy']:.3f}"
                   f"  val loss {res['val_loss'][-1][1]:.4f}  {res['seconds']:.0f} s")
    out = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
           "python": sys.version.split()[0], "torch": torch.__version__,
           "settings": {"top_layers": TOP, "targets": "all-linear", "batch_size": BATCH, "lr": LR,
                        "steps": args.steps, "eval_every": EVAL_EVERY, "splits": SPLITS, "fixed_alpha": FIXED_ALPHA,
                        "test_targets": caches["test"].targets.tolist()},
           "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    path = args.out.with_suffix(".json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
