"""One small training loop for every notebook that trains.

A chat-formatted prompt, then the answer; the loss is cross-entropy on the answer tokens only
(prompt and padding positions get the label -100, which the loss ignores). Only parameters with
`requires_grad` are optimised, so the same loop trains LoRA adapters or a whole model.

    >>> losses = train(model, tokenizer, make_tickets(64), steps=20)   # doctest: +SKIP
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from lorakit.lora import _positive_int

IGNORE_INDEX = -100


def prompt_ids(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """The prompt as a user turn in the chat template, ending with the assistant header.

    `system=None` leaves the template's default system message in place (SmolLM2 inserts its own, about 20
    tokens); pass a string (`lorakit.data.SYSTEM`, or "" for an empty one) to keep sequences short."""
    messages = [{"role": "user", "content": prompt}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def encode(tokenizer, prompt: str, answer: str, system: str | None = None) -> tuple[list[int], list[int]]:
    """(input ids, labels) for one example: the prompt in the chat template, then the answer and
    the end-of-turn token; labels are -100 everywhere but on the answer tokens."""
    ids = prompt_ids(tokenizer, prompt, system)
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids + answer_ids, [IGNORE_INDEX] * len(ids) + answer_ids


def collate(tokenizer, examples: Sequence[dict], system: str | None = None) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask and labels, each (B, T)."""
    pairs = [encode(tokenizer, ex["prompt"], ex["answer"], system) for ex in examples]
    width = max(len(ids) for ids, _ in pairs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(pairs), width), pad, dtype=torch.long)  # (B, T)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)  # (B, T)
    for i, (ids, lab) in enumerate(pairs):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention_mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over answer tokens (the model shifts the labels by one position itself)."""
    return model(**batch).loss


def train(
    model,
    tokenizer,
    examples: Sequence[dict],
    steps: int,
    batch_size: int = 8,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
    system: str | None = None,
    after_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train the parameters that require grad with AdamW for `steps` steps; returns the loss per step.

    Batches cycle through `examples` in a seeded shuffled order; `system` is the chat template's system
    message (see `prompt_ids`). For many steps on SmolLM2, `lorakit.fast.train_cached` trains only the top
    layers from cached hidden states, many times faster and with the same loss. Runs in the model's own dtype
    (float32 in the notebooks, so results do not depend on the CPU's bf16 support).
    """
    steps = _positive_int("steps", steps)
    if len(examples) < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} examples, got {len(examples)}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no parameter requires grad: add adapters (add_lora) or unfreeze something first")
    torch.manual_seed(seed)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)

    def step_loss(step: int) -> torch.Tensor:
        start = (step * batch_size) % len(order)
        idx = (order + order)[start : start + batch_size]
        return answer_loss(model, collate(tokenizer, [examples[i] for i in idx], system))

    return optimize(model, params, steps, step_loss, lr=lr, desc="training", progress=progress, after_step=after_step)


def optimize(
    model,
    params: Sequence[torch.nn.Parameter],
    steps: int,
    step_loss: Callable[[int], torch.Tensor],
    lr: float,
    weight_decay: float = 0.0,
    desc: str = "training",
    progress: bool = True,
    after_step: Callable[[int, float], None] | None = None,
    optimizer_factory: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
) -> list[float]:
    """The loop every trainer here shares: `steps` AdamW steps on `params`, each on the loss `step_loss(step)`
    returns, with `model` in training mode (restored after); returns the loss of every step.
    `after_step(n, loss)`, if given, runs after the n-th step (n from 1): for evaluations during training.
    `optimizer_factory(params, lr=..., weight_decay=...)` builds the optimizer (AdamW by default; a GPU run may
    pass bitsandbytes' paged AdamW).

    progress=False always hides the tqdm bar; otherwise tqdm's own settings apply (TQDM_DISABLE=1 hides it in CI).
    """
    optimizer = optimizer_factory(params, lr=lr, weight_decay=weight_decay)
    was_training = model.training
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, **({} if progress else {"disable": True}))
    try:
        for step in bar:
            loss = step_loss(step)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if after_step is not None:
                after_step(step + 1, losses[-1])
    finally:
        model.train(was_training)
    return losses
