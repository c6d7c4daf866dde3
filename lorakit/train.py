"""One small training loop for every notebook that trains.

A chat-formatted prompt, then the answer; the loss is cross-entropy on the answer tokens only
(prompt and padding positions get the label -100, which the loss ignores). Only parameters with
`requires_grad` are optimised, so the same loop trains LoRA adapters or a whole model.

    >>> losses = train(model, tokenizer, make_tickets(64), steps=20)   # doctest: +SKIP
"""

from __future__ import annotations

import random
import time
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
    timer: StepTimer | None = None,
) -> list[float]:
    """The loop every trainer here shares: `steps` AdamW steps on `params`, each on the loss `step_loss(step)`
    returns, with `model` in training mode (restored after); returns the loss of every step.
    `after_step(n, loss)`, if given, runs after the n-th step (n from 1): for evaluations during training.
    `optimizer_factory(params, lr=..., weight_decay=...)` builds the optimizer (AdamW by default; a GPU run may
    pass bitsandbytes' paged AdamW).

    `timer` (a `StepTimer`), if given, times every step.

    progress=False always hides the tqdm bar; otherwise tqdm's own settings apply (TQDM_DISABLE=1 hides it in CI).
    Reading a loss (`loss.item()`) makes the host wait for the GPU; with no bar shown and no `after_step`, the losses
    are read once, at the end, so that a GPU never waits for the host between steps.
    """
    optimizer = optimizer_factory(params, lr=lr, weight_decay=weight_decay)
    was_training = model.training
    model.train()
    losses: list = []
    bar = tqdm(range(steps), desc=desc, **({} if progress else {"disable": True}))
    live = after_step is not None or not bar.disable  # someone reads each loss as it comes
    try:
        for step in bar:
            if timer is not None:
                timer.start()
            loss = step_loss(step)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if timer is not None:
                timer.stop()
            if not live:
                losses.append(loss.detach())
                continue
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if after_step is not None:
                after_step(step + 1, losses[-1])
    finally:
        model.train(was_training)
    return [float(x) for x in torch.stack(losses).tolist()] if losses and not live else losses


class StepTimer:
    """Times the steps of a loop, leaving out the first `warmup` (one-time costs: kernel selection, the allocator
    growing, the optimizer allocating its state). On a CUDA device it records CUDA events and waits for the GPU only
    when read; elsewhere it reads the host's clock.

        >>> timer = StepTimer("cpu", warmup=1)
        >>> for _ in range(3):
        ...     timer.start(); timer.stop()
        >>> len(timer.milliseconds())
        2
    """

    def __init__(self, device: str | torch.device = "cpu", warmup: int = 0):
        if not (isinstance(warmup, int) and warmup >= 0):
            raise ValueError(f"`warmup` should be an int >= 0, but the value passed is {warmup!r}")
        self.cuda = torch.device(device).type == "cuda"
        self.warmup = warmup
        self._marks: list[tuple] = []
        self._steps = 0
        self._current = None

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._current = self._mark() if self._steps >= self.warmup else None

    def stop(self) -> None:
        if self._current is not None:
            self._marks.append((self._current, self._mark()))
        self._steps += 1
        self._current = None

    def milliseconds(self) -> list[float]:
        """Each timed step's duration in ms."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in self._marks]
        return [(b - a) * 1e3 for a, b in self._marks]

    def seconds(self) -> float:
        """From the start of the first timed step to the end of the last (what happened between steps included)."""
        if not self._marks:
            return 0.0
        first, last = self._marks[0][0], self._marks[-1][1]
        if self.cuda:
            torch.cuda.synchronize()
            return first.elapsed_time(last) / 1e3
        return last - first
