"""Benchmark: notebook 11's fine-tune, headless, on a CPU or a CUDA GPU, ending in its RESULT line.

What it runs
    The guarded fine-tune of notebook 11 with `lorakit.finetune`: the base model (SmolLM2-135M-Instruct offline by
    default, or `--model` a local folder / hub id), peft LoRA (or `--method qlora` / `dora`) on every linear layer of
    the top `--top-k` decoder layers, trained from cached hidden states of the frozen lower layers, with the KL-to-base
    guard on replayed general text. Before and after: task accuracy (exact match of the greedy reply on `--n-test`
    held-out tickets) and regression perplexity on 64 held-out chatterbot-corpus conversations. Then throughput
    (real tokens trained on per second), model FLOPs utilisation where the device's peak is known
    (`lorakit.finetune.PEAK_FLOPS_BF16`; FLOPs counted on the token positions computed, the tickets' shared prefix
    once a batch), and memory: predicted (`predict_training_state` +
    `predict_activation_bytes`) against measured (CPU: `measure_training_state`, the tensors themselves; GPU:
    `torch.cuda.max_memory_allocated` over the training run, which also holds the model, the caches and temporary
    buffers, printed next to the prediction of the step alone).

    `--random-weights` builds the model from its config with random weights instead of loading it: throughput,
    MFU and memory are then honest for that architecture's shapes, but the accuracies and perplexities mean
    nothing. Use it only to measure speed on a machine without the weights, and say so.

How to run
    .venv/bin/python benchmarks/bench_finetune.py                    # CPU: about 5 minutes on 2 idle cores
    .venv/bin/python benchmarks/bench_finetune.py --steps 4 --n-train 32 --n-test 16 --n-replay 16   # smoke test
    python benchmarks/bench_finetune.py --model /path/to/SmolLM2-1.7B-Instruct --top-k 12   # on a GPU

Prints the settings, progress, one line per measurement and, last, the RESULT line; `--out FILE.json` also writes
them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
    p.add_argument("--random-weights", action="store_true", help="speed and memory only: see the docstring")
    p.add_argument("--out", type=Path, default=None, help="also write the measurements as JSON")
    args = p.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(finetune.Settings)
              if f.name not in ("device", "dtype", "targets")}
    values["targets"] = args.targets if args.targets == "all-linear" else args.targets.split(",")
    return finetune.Settings(**values), args


def load(settings: finetune.Settings, random_weights: bool):
    if not random_weights:
        return finetune.load_base(settings)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lorakit.models import prepare_smollm2

    source = str(prepare_smollm2()) if settings.model == finetune.DEFAULT_MODEL else settings.model
    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=settings.dtype).to(settings.device)
    return model.eval().requires_grad_(False), AutoTokenizer.from_pretrained(source)


def main(argv: list[str]) -> int:
    settings, args = parse(argv)
    report: dict = {"settings": settings.as_dict(), "platform": platform.platform(), "torch": torch.__version__,
                    "random_weights": args.random_weights}
    device_name = torch.cuda.get_device_name() if settings.device == "cuda" else platform.processor() or "cpu"
    print(f"device: {settings.device} ({device_name}), dtype {settings.dtype}, "
          f"optimizer {finetune.optimizer_name(settings.device)}", flush=True)
    print("settings:", report["settings"], flush=True)
    if args.random_weights:
        print("NOTE: random weights: throughput, MFU and memory only; accuracy and perplexity are meaningless")
    t_start = time.perf_counter()
    model, tokenizer = load(settings, args.random_weights)
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

    idx, ridx = list(range(settings.batch_size)), list(range(settings.replay_batch))
    predicted = predict_training_state(peft_model)
    width = int(train_cache.attention_mask[idx].sum(1).max())
    p = train_cache.prefix_len  # train_guarded runs the tickets' shared prefix once a batch
    acts = finetune.predict_activation_bytes(
        peft_model, settings.top_k, ticket_tokens=p + len(idx) * (width - p), prefix_kv_tokens=len(idx) * p,
        answer_tokens=int((train_cache.labels[idx, 1:width] != -100).sum()),
        replay_tokens=len(ridx) * int(replay.attention_mask[ridx].sum(1).max()),
        replay_positions=int(replay.attention_mask[ridx, 1:].sum()))
    step_predicted = predicted.total + acts["total"]
    step_measured = None
    if settings.device == "cpu":  # counted from the tensors, on a copy of the adapter's weights (the step trains)
        saved = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        measured = measure_training_state(
            peft_model, {}, optimizer_factory=finetune.optimizer_factory(settings.device),
            loss_fn=lambda m, _b: cached_loss(m, train_cache, idx, share_prefix=True)
            + settings.kl_weight * finetune.kl_to_base(m, replay, ridx))
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
        step_measured = measured.total
        report["activations_predicted_mb"] = acts["total"] / MB
        report["activations_measured_mb"] = measured.activations / MB

    with finetune.cuda_peak_memory() as peak_stats:
        run = finetune.train_guarded(peft_model, train_cache, settings.steps, replay=replay,
                                     kl_weight=settings.kl_weight, replay_batch=settings.replay_batch,
                                     batch_size=settings.batch_size, lr=settings.lr, seed=settings.seed,
                                     optimizer_factory=finetune.optimizer_factory(settings.device))
    tokens_per_s = run["tokens"] / run["seconds"]
    seq_len = int(train_cache.attention_mask.sum(1).float().mean())
    flops = finetune.flops_per_token(peft_model, settings.top_k, seq_len)
    peak = finetune.peak_flops() if settings.device == "cuda" else None
    computed_per_s = run["computed_tokens"] / run["seconds"]  # FLOPs are done on these (the prefix once a batch)
    mfu = finetune.estimate_mfu(flops["flops"], computed_per_s, peak)

    replies = finetune.generate_answers(peft_model, tokenizer, splits["test"])
    after = finetune.exact_match(replies, splits["test"])
    ppl_after = perplexity(peft_model, tokenizer, eval_texts)
    total_s = time.perf_counter() - t_start
    print(f"after:  task accuracy {format_accuracy(after)}, regression perplexity {ppl_after:.2f} "
          f"({ppl_after / ppl_before - 1:+.1%})")
    print(f"training: {settings.steps} steps in {run['seconds']:.1f} s, {tokens_per_s:,.0f} tokens/s, "
          f"{trainable:,} trainable parameters")
    print(f"FLOPs per token {flops['flops']:,}; {computed_per_s:,.0f} token positions computed a second; "
          f"achieved {flops['flops'] * computed_per_s / 1e12:.3f} TFLOP/s; MFU "
          + (f"{mfu:.2%} of {peak / 1e12:.0f} TFLOP/s (bf16 dense peak)" if mfu is not None else "n/a (no peak)"))
    measured_mb = (step_measured / MB) if step_measured is not None else (peak_stats["peak_bytes"] or 0) / MB
    print(f"memory of one step, predicted: {step_predicted / MB:.1f} MB; measured: {measured_mb:.1f} MB "
          + ("(tensors of one step)" if step_measured is not None
             else "(torch.cuda.max_memory_allocated over the whole run: model, caches, buffers included)"))
    print(f"whole run: {total_s:.0f} s")
    report.update(task_acc_before=accuracy_with_stderr(before)[0], task_acc_after=accuracy_with_stderr(after)[0],
                  regression_ppl_before=ppl_before, regression_ppl_after=ppl_after, tokens_per_s=tokens_per_s,
                  flops_per_token=flops["flops"], mfu=mfu, peak_flops=peak, device_name=device_name,
                  peak_mem_predicted_mb=step_predicted / MB, peak_mem_measured_mb=measured_mb,
                  train_seconds=run["seconds"], total_seconds=total_s, losses=run["loss"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str))
    print(finetune.result_line(
        task_acc_before=report["task_acc_before"], task_acc_after=report["task_acc_after"],
        regression_ppl_before=ppl_before, regression_ppl_after=ppl_after, tokens_per_s=tokens_per_s,
        peak_mem_predicted_mb=step_predicted / MB, peak_mem_measured_mb=measured_mb,
        **({"mfu": mfu} if mfu is not None else {})))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
