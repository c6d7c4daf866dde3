"""Benchmark: notebook 11's fine-tune, headless, on a CPU or a CUDA GPU, ending in its RESULT line.

What it runs
    The guarded fine-tune of notebook 11 with `lorakit.finetune`: the base model (SmolLM2-135M-Instruct offline by
    default, or `--model` a local folder / hub id), peft LoRA (or `--method qlora` / `dora`) on every linear layer of
    the top `--top-k` decoder layers, trained from cached hidden states of the frozen lower layers, with the KL-to-base
    guard on replayed general text. Before and after: task accuracy (exact match of the greedy reply on `--n-test`
    held-out tickets) and regression perplexity on 64 held-out chatterbot-corpus conversations. Then throughput
    (real tokens trained on per second, after `--warmup` untimed steps), the FLOPs of the matrix products the timed
    steps ran (`lorakit.finetune.step_flops`: top layers, output head, the guard's two replay passes) and, where the
    device's peak is known (`lorakit.finetune.PEAK_FLOPS_BF16`), model FLOPs utilisation. Memory is compared like
    with like: one guarded step's state (weights, gradients, optimizer state and the activations kept for backward)
    predicted from shapes (`predict_training_state` + `predict_activation_bytes`) against the same step measured from
    its tensors (`measure_training_state`), on every device. On a GPU the whole run's `max_memory_allocated` (which
    also holds the caches and temporary buffers) is printed beside it, as what it is.

    `--random-weights` builds the model from the config and tokenizer in `--model`'s folder (or SmolLM2's) with
    random weights instead of loading them (`lorakit.finetune.random_base`; QLoRA quantizes them): throughput, MFU and
    memory are then honest for that architecture's shapes, but the accuracies and perplexities mean nothing. Use it
    only to measure speed where the weights are not at hand, and say so.

How to run
    .venv/bin/python benchmarks/bench_finetune.py                    # CPU: about 5 minutes on 2 idle cores
    .venv/bin/python benchmarks/bench_finetune.py --steps 4 --n-train 32 --n-test 16 --n-replay 16   # smoke test
    python benchmarks/bench_finetune.py --method qlora --random-weights --model path/to/config-and-tokenizer

Prints the settings, progress, one line per measurement and, last, the RESULT line; `--out FILE.json` also writes
them all. `benchmarks/bench_gpu.py` runs it on a GPU with real weights (its `--gguf` mode).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if (Path(__file__).resolve().parents[1] / "lorakit").is_dir():  # run from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lorakit import finetune  # noqa: E402
from lorakit.data import accuracy_with_stderr, format_accuracy, regression_texts, task_splits  # noqa: E402
from lorakit.fast import cache_hidden_states, cached_loss, perplexity  # noqa: E402
from lorakit.memory import MB, measure_training_state, predict_training_state  # noqa: E402


def parse(argv: list[str]) -> tuple[finetune.Settings, argparse.Namespace]:
    defaults = finetune.Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field in dataclasses.fields(finetune.Settings):
        if field.name in ("device", "dtype", "targets"):
            continue
        value = getattr(defaults, field.name)
        p.add_argument("--" + field.name.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--targets", default="all-linear", help='"all-linear" or comma-separated short names')
    p.add_argument("--n-replay", type=int, default=None, help="replay texts (default: every one not held out)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default: 0 on a CPU, 5 on a GPU)")
    p.add_argument("--random-weights", action="store_true", help="speed and memory only: see the docstring")
    p.add_argument("--out", type=Path, default=None, help="also write the measurements as JSON")
    args = p.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(finetune.Settings)
              if f.name not in ("device", "dtype", "targets")}
    values["targets"] = args.targets if args.targets == "all-linear" else args.targets.split(",")
    settings = finetune.Settings(**values)
    if args.warmup is None:
        args.warmup = 5 if settings.device == "cuda" else 0
    return settings, args


def main(argv: list[str]) -> int:
    settings, args = parse(argv)
    report: dict = {"settings": settings.as_dict(), "platform": platform.platform(), "torch": torch.__version__,
                    "random_weights": args.random_weights, "warmup": args.warmup}
    device_name = torch.cuda.get_device_name() if settings.device == "cuda" else platform.processor() or "cpu"
    factory = finetune.optimizer_factory(settings.device)
    print(f"device: {settings.device} ({device_name}), dtype {settings.dtype}, "
          f"optimizer {finetune.optimizer_name(settings.device)}", flush=True)
    print("settings:", report["settings"], flush=True)
    if args.random_weights:
        print("NOTE: random weights: throughput, MFU and memory only; accuracy and perplexity are meaningless")
    t_start = time.perf_counter()
    model, tokenizer = (finetune.random_base(settings) if args.random_weights else finetune.load_base(settings))
    splits = task_splits(n_train=settings.n_train, n_val=0, n_test=settings.n_test, seed=settings.seed)
    texts = regression_texts(n=None, seed=0)
    eval_texts, replay_texts = texts[:64], texts[64:]
    if args.n_replay is not None:
        replay_texts = replay_texts[: args.n_replay]

    replies = finetune.generate_answers(model, tokenizer, splits["test"])
    before = finetune.exact_match(replies, splits["test"])
    ppl_before = perplexity(model, tokenizer, eval_texts)
    print(f"before: task accuracy {format_accuracy(before)}, regression perplexity {ppl_before:.2f}", flush=True)

    train_cache = cache_hidden_states(model, tokenizer, splits["train"], top_k=settings.top_k, share_prefix=True)
    replay = finetune.cache_texts(model, tokenizer, replay_texts, top_k=settings.top_k, max_length=settings.max_length)
    peft_model = finetune.add_adapter(model, settings)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)

    # one guarded step, predicted from shapes and measured from its tensors (the step trains: weights put back)
    idx, ridx = list(range(settings.batch_size)), list(range(settings.replay_batch))
    predicted = predict_training_state(peft_model, optimizer=factory)
    width, p = train_cache.width(idx), train_cache.prefix_len  # train_guarded runs the shared prefix once a batch
    acts = finetune.predict_activation_bytes(
        peft_model, settings.top_k, ticket_tokens=p + len(idx) * (width - p), prefix_kv_tokens=len(idx) * p,
        answer_tokens=int((train_cache.labels[idx, 1:width] != -100).sum()),
        replay_tokens=len(ridx) * replay.width(ridx), replay_positions=replay.tokens(ridx) - len(ridx))
    saved = {n: q.detach().clone() for n, q in peft_model.named_parameters() if q.requires_grad}
    measured = measure_training_state(
        peft_model, {}, optimizer_factory=factory,
        loss_fn=lambda m, _b: cached_loss(m, train_cache, idx, share_prefix=True)
        + settings.kl_weight * finetune.kl_to_base(m, replay, ridx))
    with torch.no_grad():
        for n, q in peft_model.named_parameters():
            if n in saved:
                q.copy_(saved[n])
    step_predicted, step_measured = predicted.total + acts["total"], measured.total

    with finetune.cuda_peak_memory() as peak_stats:
        run = finetune.train_guarded(peft_model, train_cache, settings.steps, replay=replay,
                                     kl_weight=settings.kl_weight, replay_batch=settings.replay_batch,
                                     batch_size=settings.batch_size, lr=settings.lr, seed=settings.seed,
                                     optimizer_factory=factory, warmup=args.warmup)
    timed_steps = settings.steps - args.warmup
    tokens_per_s = run["tokens"] / run["seconds"]
    flops = sum(finetune.step_flops(peft_model, train_cache, i, replay if r else None, r)["total"]
                for i, r in run["batches"])
    achieved = flops / run["seconds"]
    peak = finetune.peak_flops() if settings.device == "cuda" else None
    mfu = finetune.estimate_mfu(flops / run["computed_tokens"], run["computed_tokens"] / run["seconds"], peak)

    replies = finetune.generate_answers(peft_model, tokenizer, splits["test"])
    after = finetune.exact_match(replies, splits["test"])
    ppl_after = perplexity(peft_model, tokenizer, eval_texts)
    total_s = time.perf_counter() - t_start
    print(f"after:  task accuracy {format_accuracy(after)}, regression perplexity {ppl_after:.2f} "
          f"({ppl_after / ppl_before - 1:+.1%})")
    print(f"training: {settings.steps} steps ({args.warmup} untimed), {timed_steps} timed in {run['seconds']:.2f} s, "
          f"median {statistics.median(run['step_ms']):.1f} ms a step, {tokens_per_s:,.0f} tokens/s, "
          f"{trainable:,} trainable parameters")
    print(f"matrix FLOPs of the timed steps {flops:.4g} ({flops / timed_steps:.4g} a step); achieved "
          f"{achieved / 1e12:.3f} TFLOP/s; MFU "
          + (f"{mfu:.2%} of {peak / 1e12:.0f} TFLOP/s (bf16 dense peak)" if mfu is not None else "n/a (no peak)"))
    print(f"one guarded step, predicted from shapes: {step_predicted / MB:.1f} MB "
          f"(activations {acts['total'] / MB:.1f}); measured from its tensors: {step_measured / MB:.1f} MB "
          f"(activations {measured.activations / MB:.1f})")
    if peak_stats["peak_bytes"] is not None:
        print(f"whole training run, torch.cuda.max_memory_allocated: {peak_stats['peak_bytes'] / MB:.1f} MB "
              "(model, caches, every step's state and temporary buffers: not the step's state above)")
    print(f"whole run: {total_s:.0f} s")
    report.update(task_acc_before=accuracy_with_stderr(before)[0], task_acc_after=accuracy_with_stderr(after)[0],
                  regression_ppl_before=ppl_before, regression_ppl_after=ppl_after, tokens_per_s=tokens_per_s,
                  step_ms_median=statistics.median(run["step_ms"]), step_flops=flops / timed_steps,
                  achieved_tflops=achieved / 1e12, mfu=mfu, peak_flops=peak, device_name=device_name,
                  optimizer=finetune.optimizer_name(settings.device),
                  activations_predicted_mb=acts["total"] / MB, activations_measured_mb=measured.activations / MB,
                  step_mem_predicted_mb=step_predicted / MB, step_mem_measured_mb=step_measured / MB,
                  cuda_whole_run_peak_mb=None if peak_stats["peak_bytes"] is None else peak_stats["peak_bytes"] / MB,
                  train_seconds=run["seconds"], total_seconds=total_s, losses=run["loss"])
    result = finetune.result_line(
        task_acc_before=report["task_acc_before"], task_acc_after=report["task_acc_after"],
        regression_ppl_before=ppl_before, regression_ppl_after=ppl_after, tokens_per_s=tokens_per_s,
        peak_mem_predicted_mb=step_predicted / MB, peak_mem_measured_mb=step_measured / MB,
        **({"mfu": mfu} if mfu is not None else {}))
    report["result_line"] = result
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str))
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
