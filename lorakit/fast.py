"""Fast, exact training of a decoder's top layers from cached hidden states of its frozen lower layers.

When adapters sit only in the top `k` decoder layers, everything below them is frozen: the hidden states
that enter layer `L - k` depend on the tokens alone, never on the adapters. So we run the lower layers once
over every ticket, keep their output, and each training step runs only the top `k` layers, the final norm
and the output head. Nothing is approximated: the loss and the logits are those of the full model (checked
in the tests to float32 rounding), only the repeated work below the adapters is skipped.

    >>> cache = cache_hidden_states(model, tokenizer, tickets, top_k=10)      # doctest: +SKIP
    >>> add_lora(model, top_layer_targets(model, 10), r=8, alpha=16)          # doctest: +SKIP
    >>> losses = train_cached(model, cache, steps=60)                         # doctest: +SKIP
    >>> accuracy_with_stderr(evaluate_cached(model, test_cache))              # doctest: +SKIP

Two more savings keep a step cheap: the output head (49,152 x 576, as costly as several decoder layers
when applied everywhere) is applied only at the positions the loss needs, and accuracy scores the four
actions by their first token at the answer position (the four first tokens differ), one forward pass for
all four. Works with `lorakit` adapters (LoRA, DoRA) and with peft's LoRA/DoRA (a `PeftModel` is unwrapped
with `get_base_model()`); peft's prompt and prefix tuning change the lower layers' inputs, so they cannot
use a cache: train those with `lorakit.train.train` and score them with `accuracy`.
"""

from __future__ import annotations

import functools
import inspect
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from lorakit.data import ACTIONS, SYSTEM
from lorakit.lora import _positive_int, _positive_number
from lorakit.train import IGNORE_INDEX, encode, optimize, prompt_ids

__all__ = [
    "HiddenCache",
    "label_token_ids",
    "top_layer_targets",
    "cache_hidden_states",
    "cached_loss",
    "cached_logits",
    "train_cached",
    "evaluate_cached",
    "accuracy",
    "perplexity",
]


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(causal LM, its decoder stack, its output head), through a peft wrapper if there is one."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(lm, "model", None)
    if decoder is None or not hasattr(decoder, "layers") or not hasattr(decoder, "rotary_emb"):
        raise TypeError(f"expected a Llama-style causal LM (.model.layers, .model.rotary_emb), got {type(lm).__name__}")
    return lm, decoder, lm.get_output_embeddings()


def _start(model: nn.Module, top_k: int) -> int:
    n_layers = len(_parts(model)[1].layers)
    top_k = _positive_int("top_k", top_k)
    if top_k > n_layers:
        raise ValueError(f"`top_k`={top_k} is more than the model's {n_layers} decoder layers")
    return n_layers - top_k


def label_token_ids(tokenizer, actions: Sequence[str] = ACTIONS) -> list[int]:
    """The first token of each action as the model writes it after the assistant header; accuracy compares
    the model's logits on these. Raises if two actions share their first token (then they could not be told
    apart by one token)."""
    ids = [tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in actions]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the actions {list(actions)} do not have distinct first tokens ({ids})")
    return ids


def top_layer_targets(model: nn.Module, top_k: int, modules: str | Sequence[str] = "all-linear") -> list[str]:
    """Full names of the linear layers inside the top `top_k` decoder layers, for `add_lora(model, names, ...)`
    or peft's `LoraConfig(target_modules=names)`. `modules`: "all-linear" or short names like ["q_proj", "v_proj"].

    For SmolLM2 with top_k=1 and ["q_proj"]: ["model.layers.29.self_attn.q_proj"].
    """
    lm, decoder, _ = _parts(model)
    start = _start(model, top_k)
    top = {id(layer) for layer in decoder.layers[start:]}
    inside = {id(m) for layer in decoder.layers if id(layer) in top for m in layer.modules()}
    wanted = None if modules == "all-linear" else set([modules] if isinstance(modules, str) else modules)
    names = []
    for name, module in lm.named_modules():
        inner = any(part.startswith("lora_") or part in ("base", "base_layer") for part in name.split("."))
        if id(module) in inside and isinstance(module, nn.Linear) and not inner:  # not the parts of an adapter
            short = name.rsplit(".", 1)[-1]
            if wanted is None or short in wanted:
                names.append(name)
    missing = (wanted or set()) - {n.rsplit(".", 1)[-1] for n in names}
    if missing:
        raise ValueError(f"module names {sorted(missing)} match no linear layer in the top {top_k} decoder layers")
    return names


class RowLengths:
    """For a cache of right-padded rows (`attention_mask`, and `_lengths` once read): each row's real tokens as a
    Python list read from the device once, so that a training step on a GPU chooses its batch's width and counts
    its tokens without waiting for the GPU."""

    attention_mask: torch.Tensor
    _lengths: list[int] | None

    def lengths(self) -> list[int]:
        if self._lengths is None:
            self._lengths = self.attention_mask.sum(1).tolist()
        return self._lengths

    def width(self, idx) -> int:
        """The longest row among `idx` (right padding: columns past it are padding in every one of these rows)."""
        lengths = self.lengths()
        return max(lengths[int(i)] for i in idx)


@dataclass
class HiddenCache(RowLengths):
    """Inputs of decoder layer `start` for N tickets, plus what the top layers and the loss need.

    hidden: (N, T, d) float; attention_mask: (N, T), 1 on tokens, 0 on the right padding;
    labels: (N, T), the answer tokens and end-of-turn, -100 elsewhere; answer_pos: (N,), the position
    whose logits predict the first answer token (the prompt's last); targets: (N,), index into `ACTIONS`;
    label_ids: the first token of each action. Position ids are 0..T-1 for every row (right padding), and
    the rotary embeddings and causal mask are rebuilt from them exactly as the model does.
    """

    hidden: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    answer_pos: torch.Tensor
    targets: torch.Tensor
    label_ids: list[int]
    start: int
    prefix_len: int = 0  # leading tokens every row shares (the chat template's system turn): see `share_prefix`
    _lengths: list[int] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def nbytes(self) -> int:
        return self.hidden.element_size() * self.hidden.numel()


@functools.cache
def _cache_keyword(layer_type: type) -> str:
    """The keyword under which a decoder layer takes its key/value cache: `cache` from transformers 5.24 on,
    `past_key_values` before (5.17 on GPU images, say). Read from the layer's own signature, so the shared prefix
    reaches the attention whichever version is installed, instead of being dropped silently."""
    params = inspect.signature(layer_type.forward).parameters  # follows a deprecation wrapper to the real one
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(f"{layer_type.__name__}.forward takes neither `cache` nor `past_key_values`: this transformers "
                    "version is not supported by lorakit.fast (tested with 5.17 and 5.24)")


def _run_layers(decoder: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, layers) -> torch.Tensor:
    """What the decoder's forward does around its layers: causal mask and rotary embeddings from
    position ids 0..T-1, then each layer in turn."""
    from transformers.masking_utils import create_causal_mask

    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)  # (1, T)
    # the cache argument is positional: transformers 5.24 names it `cache`, earlier 5.x `past_key_values`
    mask = create_causal_mask(decoder.config, hidden, attention_mask, None, position_ids=position_ids)
    position_embeddings = decoder.rotary_emb(hidden, position_ids=position_ids)
    for layer in layers:
        hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)
    return hidden


class _SharedPrefix:
    """Stands in for transformers' `Cache` in the top layers' attention, with one job: keep the keys and values of
    the prefix that every row shares (computed once, for one row) and put them in front of each row's own."""

    def __init__(self):
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx not in self.kv:  # the prefix pass: (1, heads, p, head_dim)
            self.kv[layer_idx] = (key, value)
            return key, value
        k0, v0 = self.kv[layer_idx]
        b = key.shape[0]
        return torch.cat([k0.expand(b, -1, -1, -1), key], 2), torch.cat([v0.expand(b, -1, -1, -1), value], 2)


def _run_layers_shared(decoder: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, layers,
                       prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`_run_layers` for rows whose first `prefix` positions are the same tokens: those positions go through each
    layer once (row 0's), the rest of every row attends to their keys and values. Returns the outputs of the
    prefix (1, prefix, d) and of the rest of the rows (B, w - prefix, d): together, what `_run_layers` gives up to
    float rounding, for (B - 1)·prefix fewer token positions through the layers."""
    b, w, _ = hidden.shape
    if not 0 < prefix < w:
        raise ValueError(f"a shared prefix must leave each row a token of its own: prefix {prefix}, width {w}")
    s = w - prefix
    pre, suf = hidden[:1, :prefix], hidden[:, prefix:]
    pos_pre = torch.arange(prefix, device=hidden.device).unsqueeze(0)
    pos_suf = torch.arange(prefix, w, device=hidden.device).unsqueeze(0)
    pe_pre, pe_suf = decoder.rotary_emb(pre, position_ids=pos_pre), decoder.rotary_emb(suf, position_ids=pos_suf)
    mask_pre = torch.ones(prefix, prefix, dtype=torch.bool, device=hidden.device).tril()[None, None]
    own = torch.ones(s, s, dtype=torch.bool, device=hidden.device).tril()[None]
    own = own & attention_mask[:, None, prefix:].bool()  # causal within the row's own tokens, no padding keys
    mask_suf = torch.cat([own.new_ones(b, s, prefix), own], -1)[:, None]  # (B, 1, s, prefix + s): True = attend
    kv = _SharedPrefix()
    for n, layer in enumerate(layers, 1):  # layer by layer: each suffix pass needs that layer's prefix keys and values
        cache = {_cache_keyword(type(layer)): kv}
        pre = layer(pre, attention_mask=mask_pre, position_ids=pos_pre, position_embeddings=pe_pre, **cache)
        if len(kv.kv) != n:  # a layer that dropped the cache would run the rows without the prefix
            raise RuntimeError(f"decoder layer {n - 1} of these {len(layers)} never took the shared prefix's keys and "
                               "values: this transformers version passes the cache under another name")
        suf = layer(suf, attention_mask=mask_suf, position_ids=pos_suf, position_embeddings=pe_suf, **cache)
    return pre, suf


def _common_prefix(rows: Sequence[list[int]]) -> int:
    n = min(map(len, rows))
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return n


def _pad(rows: Sequence[list[int]], value: int, width: int) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def cache_hidden_states(
    model: nn.Module,
    tokenizer,
    tickets: Sequence[dict],
    top_k: int,
    system: str | None = SYSTEM,
    batch_size: int = 32,
    progress: bool = True,
    share_prefix: bool = False,
) -> HiddenCache:
    """Run the embeddings and the lower `L - top_k` decoder layers once over every ticket (prompt in the chat
    template with `system`, then the answer and end-of-turn) and keep their output for `train_cached`,
    `cached_loss` and `evaluate_cached`. Call it before adding adapters, or with adapters only in the top layers.
    `share_prefix=True`: the tickets' common prefix goes through the lower layers once a batch, as `cached_loss`
    does in the top layers (the same hidden states up to float rounding, for fewer token positions)."""
    start = _start(model, top_k)
    batch_size = _positive_int("batch_size", batch_size)
    if not tickets:
        raise ValueError("no tickets to cache")
    _, decoder, _ = _parts(model)
    pairs = [encode(tokenizer, t["prompt"], t["answer"], system) for t in tickets]
    width = max(len(ids) for ids, _ in pairs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = _pad([ids for ids, _ in pairs], pad, width)  # (N, T)
    labels = _pad([lab for _, lab in pairs], IGNORE_INDEX, width)  # (N, T)
    attention_mask = _pad([[1] * len(ids) for ids, _ in pairs], 0, width)  # (N, T)
    answer_pos = torch.tensor([lab.index(next(x for x in lab if x != IGNORE_INDEX)) - 1 for _, lab in pairs])
    targets = torch.tensor([ACTIONS.index(t["answer"]) if t["answer"] in ACTIONS else -1 for t in tickets])
    prefix = min(_common_prefix([ids for ids, _ in pairs]), int(answer_pos.min()))  # never into the answer
    chunks = []
    was_training = decoder.training
    decoder.eval()
    with torch.no_grad():
        bar = tqdm(range(0, len(pairs), batch_size), desc=f"caching layers 0-{start - 1}",
                   **({} if progress else {"disable": True}))
        for i in bar:
            ids, mask = input_ids[i : i + batch_size], attention_mask[i : i + batch_size]
            hidden = decoder.embed_tokens(ids.to(decoder.embed_tokens.weight.device))
            if share_prefix and prefix > 0 and len(ids) > 1:
                pre, suf = _run_layers_shared(decoder, hidden, mask.to(hidden.device), decoder.layers[:start], prefix)
                chunks.append(torch.cat([pre.expand(len(ids), -1, -1), suf], 1))
            else:
                chunks.append(_run_layers(decoder, hidden, mask.to(hidden.device), decoder.layers[:start]))
    decoder.train(was_training)
    hidden = torch.cat(chunks)  # (N, T, d)
    return HiddenCache(hidden, attention_mask.to(hidden.device), labels.to(hidden.device),
                       answer_pos.to(hidden.device), targets.to(hidden.device), label_token_ids(tokenizer), start,
                       prefix, _lengths=attention_mask.sum(1).tolist())


def _top_hidden(model: nn.Module, cache: HiddenCache, idx, share_prefix: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Final-norm output of the top layers for rows `idx`, cut to their longest row: (B, w, d), and idx.
    `share_prefix`: run the rows' common prefix (`cache.prefix_len` tokens) through the top layers once."""
    _, decoder, _ = _parts(model)
    if cache.start >= len(decoder.layers) or cache.hidden.shape[-1] != decoder.config.hidden_size:
        raise ValueError("this cache was made for another model")
    width = cache.width(idx)  # right padding: later columns are padding in every row
    idx = torch.as_tensor(idx, dtype=torch.long, device=cache.hidden.device)
    mask = cache.attention_mask[idx]
    layers = decoder.layers[cache.start :]
    if share_prefix and cache.prefix_len > 0 and len(idx) > 1:
        pre, suf = _run_layers_shared(decoder, cache.hidden[idx, :width], mask[:, :width], layers, cache.prefix_len)
        return torch.cat([decoder.norm(pre).expand(len(idx), -1, -1), decoder.norm(suf)], 1), idx
    hidden = _run_layers(decoder, cache.hidden[idx, :width], mask[:, :width], layers)
    return decoder.norm(hidden), idx


def cached_loss(model: nn.Module, cache: HiddenCache, idx, share_prefix: bool = False) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of rows `idx` (as `lorakit.train.answer_loss` on the full
    model), running only the top layers; the output head is applied at the answer positions alone.

    `share_prefix=True`: every ticket starts with the same tokens (the chat template's system turn and the start
    of the user turn, `cache.prefix_len` of them), so in the top layers they are computed once for the batch,
    not once per row; the rows attend to their keys and values. Equal up to float rounding, and cheaper."""
    hidden, idx = _top_hidden(model, cache, idx, share_prefix)  # (B, w, d)
    labels = cache.labels[idx, 1 : hidden.shape[1]]  # (B, w - 1): the token each position predicts
    keep = labels != IGNORE_INDEX
    logits = _parts(model)[2](hidden[:, :-1][keep])  # (n_answer_tokens, V)
    return F.cross_entropy(logits.float(), labels[keep])


def cached_logits(model: nn.Module, cache: HiddenCache, batch_size: int = 64, share_prefix: bool = False
                  ) -> torch.Tensor:
    """(N, 4) logits of the four actions' first tokens at each ticket's answer position, without gradients.
    `share_prefix`: as in `cached_loss`."""
    batch_size = _positive_int("batch_size", batch_size)
    head = _parts(model)[2]
    out = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(cache), batch_size):
            hidden, idx = _top_hidden(model, cache, range(i, min(i + batch_size, len(cache))), share_prefix)
            at_answer = hidden[torch.arange(len(idx)), cache.answer_pos[idx]]  # (B, d)
            out.append(head(at_answer)[:, cache.label_ids].float())  # (B, 4)
    model.train(was_training)
    return torch.cat(out)


def evaluate_cached(model: nn.Module, cache: HiddenCache, batch_size: int = 64) -> list[bool]:
    """Per ticket: does the model rank the required action's first token above the other three?
    Feed the list to `lorakit.data.accuracy_with_stderr` or `format_accuracy`."""
    predictions = cached_logits(model, cache, batch_size).argmax(-1)
    return (predictions == cache.targets).tolist()


def _check_trainable(model: nn.Module, start: int) -> list[nn.Parameter]:
    lm, decoder, _ = _parts(model)
    below = {id(p) for p in decoder.embed_tokens.parameters()}
    below |= {id(p) for layer in decoder.layers[:start] for p in layer.parameters()}
    params = []
    for name, p in lm.named_parameters():
        if p.requires_grad:
            if id(p) in below:
                raise ValueError(
                    f"parameter {name!r} is trainable but lies below layer {start}, whose inputs are cached: "
                    f"put adapters only in the top layers (`top_layer_targets`) or cache fewer layers"
                )
            params.append(p)
    if not params:
        raise ValueError("no parameter requires grad: add adapters to the top layers first (`top_layer_targets`)")
    return params


def train_cached(
    model: nn.Module,
    cache: HiddenCache,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    weight_decay: float = 0.0,
    progress: bool = True,
    after_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train the trainable parameters (adapters in the top layers) with AdamW for `steps` steps on `cache`;
    returns the loss of every step. Batches cycle through the cache in a seeded shuffled order, reshuffled
    every epoch. tqdm shows progress (hidden by `progress=False` or TQDM_DISABLE=1); `after_step(n, loss)` runs
    after the n-th step, as in `lorakit.train.optimize`."""
    steps = _positive_int("steps", steps)
    batch_size = _positive_int("batch_size", batch_size)
    lr = _positive_number("lr", lr)
    if len(cache) < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} cached tickets, got {len(cache)}")
    params = _check_trainable(model, cache.start)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    order: list[int] = []

    def step_loss(step: int) -> torch.Tensor:
        nonlocal order
        if len(order) < batch_size:
            epoch = list(range(len(cache)))
            rng.shuffle(epoch)
            order += epoch
        idx, order = order[:batch_size], order[batch_size:]
        return cached_loss(model, cache, idx)

    return optimize(model, params, steps, step_loss, lr=lr, weight_decay=weight_decay,
                    desc=f"training layers {cache.start}+", progress=progress, after_step=after_step)


def _prompt_learning_offset(model: nn.Module) -> int | None:
    """Virtual tokens a peft prompt-learning model puts in front of the logits (None: not prompt learning)."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return None
    return 0 if str(getattr(config, "peft_type", "")).endswith("PREFIX_TUNING") else config.num_virtual_tokens


def accuracy(
    model: nn.Module, tokenizer, tickets: Sequence[dict], system: str | None = SYSTEM, batch_size: int = 16
) -> list[bool]:
    """Per ticket, whether the full model ranks the required action's first token first (no cache: works
    for any model, merged, peft prompt or prefix tuning included). Same ranking as `evaluate_cached`."""
    batch_size = _positive_int("batch_size", batch_size)
    label_ids = label_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    offset = _prompt_learning_offset(model)
    correct = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(tickets), batch_size):
            chunk = tickets[i : i + batch_size]
            rows = [prompt_ids(tokenizer, t["prompt"], system) for t in chunk]
            width = max(map(len, rows))
            ids, mask = _pad(rows, pad, width).to(device), _pad([[1] * len(r) for r in rows], 0, width).to(device)
            last = torch.tensor([len(r) - 1 for r in rows], device=device)
            if offset is None:  # only the distinct answer positions go through the output head
                keep = torch.unique(last)
                logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits  # (B, |keep|, V)
                at = logits[torch.arange(len(rows)), torch.searchsorted(keep, last)]
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits
                at = logits[torch.arange(len(rows)), last + logits.shape[1] - width]
            predicted = at[:, label_ids].argmax(-1).tolist()
            correct += [ACTIONS[p] == t["answer"] for p, t in zip(predicted, chunk, strict=True)]
    model.train(was_training)
    return correct


def perplexity(model: nn.Module, tokenizer, texts: Sequence, batch_size: int = 8, max_length: int = 256) -> float:
    """exp(mean negative log-likelihood per predicted token) of `texts`: plain strings, or message lists
    (`regression_texts(chat=True)`), which go through the chat template. Each text's first token is context
    only; texts are cut at `max_length` tokens. Lower is better; compare a model with itself before and after."""
    batch_size = _positive_int("batch_size", batch_size)
    if not texts:
        raise ValueError("no texts to score")
    rows = []
    for text in texts:
        if isinstance(text, str):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = list(tokenizer.apply_chat_template(list(text), tokenize=True, return_dict=False))
        rows.append(ids[:max_length])
    rows.sort(key=len)  # similar lengths share a batch: little padding
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            width = max(map(len, chunk))
            ids = _pad(chunk, 0, width).to(device)
            mask = _pad([[1] * len(r) for r in chunk], 0, width).to(device)
            targets = _pad(chunk, IGNORE_INDEX, width).to(device)[:, 1:]  # (B, T-1): the next token
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
            keep = targets != IGNORE_INDEX
            total += F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum").item()
            count += int(keep.sum())
    model.train(was_training)
    if count == 0:
        raise ValueError("the texts have no token to predict (each needs at least two tokens)")
    return math.exp(total / count)
