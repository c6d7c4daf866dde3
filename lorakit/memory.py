"""Memory arithmetic for fine-tuning: what full fine-tuning, LoRA and QLoRA keep in memory.

Every stored number is parameters x bytes per parameter. Full fine-tuning with Adam in mixed precision
keeps, per parameter, fp16 weights (2 bytes), fp16 gradients (2) and two fp32 Adam moments (4 + 4):
12 bytes, or 16 with an fp32 master copy of the weights (Rajbhandari et al., 2020, ZeRO, section 3.1,
count 16 bytes: "2 + 2 + 12"). LoRA freezes the base, so the base costs only its weights, 2 bytes in
fp16 (Hu et al., 2021, section 4.2); QLoRA stores it in 4-bit NF4 with one fp32 absmax per block of 64,
itself quantized to 8 bits per block of 256 (Dettmers et al., 2023, section 3, "Double Quantization"):
4 + 8/64 + 32/(64*256) = 4.127 bits per parameter. GB is 1e9 bytes, MB 1e6 and KB 1e3 throughout.

    >>> print(state_memory(70, "full fp16 + fp32 Adam"))
    full fp16 + fp32 Adam, 70B parameters
    component           bytes/param   GB
    ------------------  -----------  ---
    fp16 weights                  2  140
    fp16 gradients                2  140
    fp32 Adam moment m            4  280
    fp32 Adam moment v            4  280
    total                        12  840

The calculators return small frozen dataclasses that print as aligned tables; nothing here plots.
`measure_training_state` runs one real training step and counts the bytes torch actually holds;
`predict_training_state` computes the same from parameter shapes and dtypes alone.
"""

from __future__ import annotations

import numbers
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.lora import _positive_int, _positive_number, lora_parameter_count

__all__ = [
    "GB",
    "MB",
    "KB",
    "Recipe",
    "RECIPES",
    "StateMemory",
    "state_memory",
    "compare_finetuning",
    "nf4_bits_per_param",
    "QLoRAStorage",
    "qlora_storage",
    "LLAMA_BLOCK_4096",
    "AdapterBudget",
    "lora_budget",
    "square_projection_table",
    "rank_budget",
    "MultiAdapterStorage",
    "multi_adapter_storage",
    "DoraOverhead",
    "dora_extra_params",
    "TrainingState",
    "measure_training_state",
    "predict_training_state",
    "ModelShape",
    "MODEL_SHAPES",
    "TARGET_PRESETS",
    "METHODS",
    "MemoryBreakdown",
    "finetune_memory",
]

GB = 1e9
MB = 1e6
KB = 1e3


# ---------------------------------------------------------------------------------------------------
# Small helpers: argument checks and the text table every result prints as
# ---------------------------------------------------------------------------------------------------


def _fmt(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, numbers.Integral):
        return f"{value:,d}"
    if isinstance(value, numbers.Real):
        if float(value).is_integer():
            return f"{value:,.0f}"
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.1f}"
    return str(value)


def _table(title: str, header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """An aligned text table: first column left-aligned, the others right-aligned."""
    cells = [list(header)] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([title, line(cells[0]), rule] + [line(r) for r in cells[1:]])


# ---------------------------------------------------------------------------------------------------
# Bytes per parameter: named recipes
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """A named way to hold a model in memory: (component, bytes per parameter) pairs."""

    name: str
    components: tuple[tuple[str, float], ...]

    @property
    def bytes_per_param(self) -> float:
        return sum(b for _, b in self.components)

    def __str__(self) -> str:
        rows = [(c, b) for c, b in self.components] + [("total", self.bytes_per_param)]
        return _table(self.name, ("component", "bytes/param"), rows)


_FP16_W = ("fp16 weights", 2)
_FP16_G = ("fp16 gradients", 2)
_ADAM = (("fp32 Adam moment m", 4), ("fp32 Adam moment v", 4))

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("full fp16 + fp32 Adam", (_FP16_W, _FP16_G, *_ADAM)),  # 12 bytes
        Recipe("full fp16 + fp32 Adam + fp32 master", (_FP16_W, _FP16_G, *_ADAM, ("fp32 master weights", 4))),  # 16
        Recipe("frozen fp16 base", (_FP16_W,)),  # 2: the floor LoRA cannot go under
        Recipe("frozen bf16 base", (("bf16 weights", 2),)),
    )
}


def _recipe(recipe: str | Recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"`recipe` should be one of {sorted(RECIPES)} or a Recipe, but the value passed is {recipe!r}")
    return RECIPES[recipe]


@dataclass(frozen=True)
class StateMemory:
    """Memory of one recipe for a model of `params_billion` parameters, per component, in GB."""

    recipe: Recipe
    params_billion: float

    @property
    def component_gb(self) -> dict[str, float]:
        return {c: self.params_billion * 1e9 * b / GB for c, b in self.recipe.components}

    @property
    def total_gb(self) -> float:
        return self.params_billion * 1e9 * self.recipe.bytes_per_param / GB

    def __str__(self) -> str:
        gb = self.component_gb
        rows = [(c, b, gb[c]) for c, b in self.recipe.components]
        rows.append(("total", self.recipe.bytes_per_param, self.total_gb))
        title = f"{self.recipe.name}, {self.params_billion:g}B parameters"
        return _table(title, ("component", "bytes/param", "GB"), rows)


def state_memory(params_billion: float, recipe: str | Recipe = "full fp16 + fp32 Adam") -> StateMemory:
    """Weights + gradients + optimizer state of a model under a recipe (activations not included).

    >>> state_memory(70).total_gb, state_memory(70, "frozen fp16 base").total_gb
    (840.0, 140.0)
    """
    return StateMemory(_recipe(recipe), _positive_number("params_billion", params_billion))


@dataclass(frozen=True)
class FinetuningComparison:
    """Several recipes side by side for one model size."""

    params_billion: float
    states: tuple[StateMemory, ...]

    def total_gb(self, recipe: str) -> float:
        for s in self.states:
            if s.recipe.name == recipe:
                return s.total_gb
        raise ValueError(f"`recipe` should be one of {[s.recipe.name for s in self.states]}, but got {recipe!r}")

    def __str__(self) -> str:
        rows = [(s.recipe.name, s.recipe.bytes_per_param, s.total_gb) for s in self.states]
        return _table(f"state memory, {self.params_billion:g}B parameters", ("recipe", "bytes/param", "GB"), rows)


def compare_finetuning(
    params_billion: float,
    recipes: Sequence[str | Recipe] = (
        "full fp16 + fp32 Adam",
        "full fp16 + fp32 Adam + fp32 master",
        "frozen fp16 base",
    ),
) -> FinetuningComparison:
    """Full fine-tuning (12 and 16 bytes per parameter) against LoRA's frozen fp16 floor (2 bytes).

    >>> [s.total_gb for s in compare_finetuning(65).states]
    [780.0, 1040.0, 130.0]
    """
    size = _positive_number("params_billion", params_billion)
    return FinetuningComparison(size, tuple(state_memory(size, r) for r in recipes))


# ---------------------------------------------------------------------------------------------------
# QLoRA: NF4 storage
# ---------------------------------------------------------------------------------------------------


def nf4_bits_per_param(
    double_quant: bool = True, blocksize: int = 64, second_blocksize: int = 256, code_bits: int = 4
) -> float:
    """Bits per stored parameter of a blockwise 4-bit code plus its quantization constants.

    Without double quantization: one fp32 absmax per block, 4 + 32/64 = 4.5. With it, the absmax values
    are stored in 8 bits, plus one fp32 constant per `second_blocksize` of them:
    4 + 8/64 + 32/(64*256) = 4.127 (QLoRA, section 3).

    >>> nf4_bits_per_param(False), round(nf4_bits_per_param(True), 3)
    (4.5, 4.127)
    """
    blocksize = _positive_int("blocksize", blocksize)
    second_blocksize = _positive_int("second_blocksize", second_blocksize)
    code_bits = _positive_int("code_bits", code_bits)
    if double_quant:
        return code_bits + 8 / blocksize + 32 / (blocksize * second_blocksize)
    return code_bits + 32 / blocksize


@dataclass(frozen=True)
class QLoRAStorage:
    """Frozen-base storage of one model: 16-bit, raw 4-bit codes, and codes plus constants, in GB."""

    params_billion: float
    bf16_gb: float
    nf4_payload_gb: float
    nf4_with_constants_gb: float
    constant_bits_per_param: float

    def __str__(self) -> str:
        bits = 4 + self.constant_bits_per_param
        rows = [
            ("bf16 weights", 16, self.bf16_gb),
            ("nf4 codes only", 4, self.nf4_payload_gb),
            ("nf4 + quant constants", bits, self.nf4_with_constants_gb),
        ]
        return _table(f"frozen base, {self.params_billion:g}B parameters", ("storage", "bits/param", "GB"), rows)


def qlora_storage(params_billion: float, double_quant: bool = True, blocksize: int = 64) -> QLoRAStorage:
    """The frozen base of QLoRA against a bf16 base.

    >>> s = qlora_storage(65)
    >>> s.bf16_gb, s.nf4_payload_gb, round(s.nf4_with_constants_gb, 1)
    (130.0, 32.5, 33.5)
    """
    n = _positive_number("params_billion", params_billion) * 1e9
    bits = nf4_bits_per_param(double_quant, blocksize)
    return QLoRAStorage(params_billion, n * 16 / 8 / GB, n * 4 / 8 / GB, n * bits / 8 / GB, bits - 4)


# ---------------------------------------------------------------------------------------------------
# LoRA parameter budgets
# ---------------------------------------------------------------------------------------------------

# (d_in, d_out) of the seven linear layers of one 4096-wide LLaMA-7B block (the lesson's example).
LLAMA_BLOCK_4096: dict[str, tuple[int, int]] = {
    "q_proj": (4096, 4096),
    "k_proj": (4096, 4096),
    "v_proj": (4096, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (4096, 11008),
    "up_proj": (4096, 11008),
    "down_proj": (11008, 4096),
}


@dataclass(frozen=True)
class AdapterBudget:
    """LoRA parameters per target module at one rank, against the modules' full weights."""

    r: int
    modules: tuple[tuple[str, int, int], ...]  # (name, d_in, d_out)
    bytes_per_param: float = 2

    @property
    def per_module(self) -> dict[str, int]:
        return {n: lora_parameter_count(i, o, self.r) for n, i, o in self.modules}

    @property
    def adapter_params(self) -> int:
        return sum(self.per_module.values())

    @property
    def full_params(self) -> int:
        return sum(i * o for _, i, o in self.modules)

    @property
    def percent(self) -> float:
        return 100 * self.adapter_params / self.full_params

    @property
    def adapter_bytes(self) -> float:
        return self.adapter_params * self.bytes_per_param

    @property
    def full_bytes(self) -> float:
        return self.full_params * self.bytes_per_param

    def __str__(self) -> str:
        per = self.per_module
        rows = [(n, f"{i}x{o}", i * o, per[n]) for n, i, o in self.modules]
        rows.append(("total", "", self.full_params, self.adapter_params))
        title = f"LoRA r={self.r}: {self.adapter_params:,d} adapter parameters, {self.percent:.2f}% of the weights"
        return _table(title, ("module", "d_in x d_out", "full params", "LoRA params"), rows)


def lora_budget(
    r: int,
    targets: str | Iterable[str] = "all-linear",
    shapes: Mapping[str, tuple[int, int]] = LLAMA_BLOCK_4096,
    bytes_per_param: float = 2,
) -> AdapterBudget:
    """LoRA parameters r * (d_in + d_out) summed over the target modules (one block).

    >>> lora_budget(16, ["q_proj", "v_proj"]).adapter_params, lora_budget(16).adapter_params
    (262144, 1249280)
    """
    r = _positive_int("r", r)
    bytes_per_param = _positive_number("bytes_per_param", bytes_per_param)
    if isinstance(targets, str):
        if targets != "all-linear":
            raise ValueError(
                f"`targets` should be a list of module names or 'all-linear', but the value passed is {targets!r}"
            )
        names = list(shapes)
    else:
        names = list(targets)
        if not names:
            raise ValueError(f"`targets` should name at least one module, but the value passed is {names!r}")
    for name in names:
        if name not in shapes:
            raise ValueError(f"target module {name!r} is not in `shapes` ({sorted(shapes)})")
    for name, (d_in, d_out) in shapes.items():
        _positive_int(f"shapes[{name!r}] d_in", d_in)
        _positive_int(f"shapes[{name!r}] d_out", d_out)
    return AdapterBudget(r, tuple((n, *shapes[n]) for n in names), bytes_per_param)


@dataclass(frozen=True)
class BudgetTable:
    """Several budgets side by side, relative to one reference budget."""

    title: str
    budgets: tuple[AdapterBudget, ...]
    reference: AdapterBudget

    def relative(self, budget: AdapterBudget) -> float:
        return budget.adapter_params / self.reference.adapter_params

    def __str__(self) -> str:
        rows = [
            (b.r, b.adapter_params, b.percent, b.adapter_bytes / KB, self.relative(b)) for b in self.budgets
        ]
        rows.append(("full", self.reference.full_params, 100.0, self.reference.full_bytes / KB, ""))
        header = ("r", "params", "% of full", f"KB at {self.reference.bytes_per_param:g} B/param", "relative")
        return _table(self.title, header, rows)


def square_projection_table(
    d: int = 4096, ranks: Sequence[int] = (8, 16, 64), bytes_per_param: float = 2
) -> BudgetTable:
    """LoRA on one d x d projection at several ranks, against its d*d weights.

    >>> [b.adapter_params for b in square_projection_table().budgets]
    [65536, 131072, 524288]
    """
    d = _positive_int("d", d)
    shapes = {"proj": (d, d)}
    budgets = tuple(lora_budget(r, ["proj"], shapes, bytes_per_param) for r in ranks)
    if not budgets:
        raise ValueError(f"`ranks` should name at least one rank, but the value passed is {ranks!r}")
    return BudgetTable(f"LoRA on one {d}x{d} projection", budgets, budgets[0])


def rank_budget(
    ranks: Sequence[int] = (4, 8, 16, 64, 256),
    reference_r: int = 16,
    targets: str | Iterable[str] = "all-linear",
    shapes: Mapping[str, tuple[int, int]] = LLAMA_BLOCK_4096,
) -> BudgetTable:
    """Adapter parameters of one block at several ranks, relative to rank `reference_r` (linear in r).

    >>> t = rank_budget()
    >>> [t.relative(b) for b in t.budgets]
    [0.25, 0.5, 1.0, 4.0, 16.0]
    """
    targets = targets if isinstance(targets, str) else list(targets)
    budgets = tuple(lora_budget(r, targets, shapes) for r in ranks)
    if not budgets:
        raise ValueError(f"`ranks` should name at least one rank, but the value passed is {ranks!r}")
    reference = lora_budget(reference_r, targets, shapes)
    return BudgetTable(f"LoRA budget per block relative to r={reference.r}", budgets, reference)


# ---------------------------------------------------------------------------------------------------
# Serving many adapters, and DoRA's extra parameters
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MultiAdapterStorage:
    """One merged model per tenant against one shared base plus one adapter per tenant."""

    base_gb: float
    adapter_mb: float
    tenants: int
    mb_per_gb: float

    @property
    def merged_gb(self) -> float:
        return self.tenants * self.base_gb

    @property
    def shared_gb(self) -> float:
        return self.base_gb + self.tenants * self.adapter_mb / self.mb_per_gb

    @property
    def reduction(self) -> float:
        return self.merged_gb / self.shared_gb

    def __str__(self) -> str:
        rows = [
            (f"{self.tenants} merged models", self.merged_gb),
            (f"1 base + {self.tenants} adapters", self.shared_gb),
            ("reduction (x)", self.reduction),
        ]
        return _table(f"storage for {self.tenants} tenants", ("layout", "GB"), rows)


def multi_adapter_storage(
    base_gb: float = 14, adapter_mb: float = 128, tenants: int = 50, mb_per_gb: float = 1024
) -> MultiAdapterStorage:
    """Storage of `tenants` fine-tuned variants. `mb_per_gb` is 1024 as in the lesson (1000 for SI units).

    >>> s = multi_adapter_storage()
    >>> s.merged_gb, s.shared_gb, round(s.reduction, 1)
    (700.0, 20.25, 34.6)
    """
    return MultiAdapterStorage(
        _positive_number("base_gb", base_gb),
        _positive_number("adapter_mb", adapter_mb),
        _positive_int("tenants", tenants),
        _positive_number("mb_per_gb", mb_per_gb),
    )


@dataclass(frozen=True)
class DoraOverhead:
    """DoRA's magnitude vector (one value per output feature) against the LoRA adapter it sits on."""

    d_in: int
    d_out: int
    r: int

    @property
    def lora_params(self) -> int:
        return lora_parameter_count(self.d_in, self.d_out, self.r)

    @property
    def magnitude_params(self) -> int:
        return self.d_out

    @property
    def percent(self) -> float:
        return 100 * self.magnitude_params / self.lora_params

    def __str__(self) -> str:
        rows = [("LoRA A and B", self.lora_params), ("DoRA magnitude m", self.magnitude_params)]
        title = f"DoRA on {self.d_in}->{self.d_out}, r={self.r}: +{self.percent:.2f}% parameters"
        return _table(title, ("part", "params"), rows)


def dora_extra_params(d_in: int = 4096, d_out: int = 4096, r: int = 16) -> DoraOverhead:
    """DoRA adds `d_out` magnitude parameters per adapted matrix (Liu et al., 2024, eq. 5).

    >>> o = dora_extra_params()
    >>> o.magnitude_params, o.lora_params, f"{o.percent:.2f}"
    (4096, 131072, '3.12')
    """
    return DoraOverhead(_positive_int("d_in", d_in), _positive_int("d_out", d_out), _positive_int("r", r))


# ---------------------------------------------------------------------------------------------------
# A real model: measured and predicted training state
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingState:
    """Bytes held during one training step, by kind. `activations` is None for a prediction.

    `optimizer` maps a state name (exp_avg, exp_avg_sq, step, ...) to its bytes.
    `saved_parameter_bytes` is what autograd saved that is a parameter's storage (weights an op needs
    for its backward): it is already counted in the parameters and is no extra memory.
    """

    trainable_parameters: int
    frozen_parameters: int
    gradients: int
    optimizer: dict[str, int]
    activations: int | None = None
    saved_parameter_bytes: int | None = None
    paged_optimizer: int = 0  # of the optimizer's bytes, those in bitsandbytes' paged (unified) memory

    @property
    def parameters(self) -> int:
        return self.trainable_parameters + self.frozen_parameters

    @property
    def optimizer_total(self) -> int:
        return sum(self.optimizer.values())

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_total + (self.activations or 0)

    def __str__(self) -> str:
        rows: list[tuple[str, object]] = [
            ("parameters, trainable", self.trainable_parameters / MB),
            ("parameters, frozen", self.frozen_parameters / MB),
            ("gradients", self.gradients / MB),
        ]
        rows += [(f"optimizer {k}", v / MB) for k, v in self.optimizer.items()]
        if self.paged_optimizer:
            rows.append(("  of which paged (unified memory)", self.paged_optimizer / MB))
        rows.append(("activations (saved for backward)", "n/a" if self.activations is None else self.activations / MB))
        rows.append(("total", self.total / MB))
        return _table("training state", ("kind", "MB"), rows)


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def _unique_storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views and tied tensors count once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        seen[_storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _nbytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


PAGED_MIN_ELEMENTS = 100_000  # bitsandbytes' paged optimizers page a state tensor only from this many elements


def _is_bitsandbytes(optimizer: Callable | None) -> bool:
    owner = getattr(optimizer, "func", optimizer)  # a functools.partial of an optimizer class counts as that class
    return getattr(owner, "__module__", "").startswith("bitsandbytes")


def predict_training_state(model: nn.Module, amsgrad: bool = False, optimizer: Callable | None = None) -> TrainingState:
    """What one AdamW (or Adam) step will hold, from parameter shapes, dtypes and requires_grad alone.

    `optimizer` (the class or factory the step uses; torch's by default) sets the layout of its state.

    * torch's default (for-each, not fused, not capturable) Adam/AdamW: `exp_avg` and `exp_avg_sq` (and
      `max_exp_avg_sq` with amsgrad) as `zeros_like(param)`, and `step` as a 0-d CPU tensor of the default float
      dtype (float32, 4 bytes) per parameter tensor;
    * bitsandbytes' 32-bit optimizers (`bnb.optim.AdamW`, `PagedAdamW`, ...): `state1` and `state2` in float32
      whatever the parameter's dtype, and the step count as a Python int (no tensor). The paged ones put a state
      tensor of at least `PAGED_MIN_ELEMENTS` elements on a CUDA device in paged (unified) memory, which torch's
      allocator does not count: those bytes are also reported apart, as `paged_optimizer`.

    In both, a gradient for every trainable parameter in its dtype; frozen parameters get none of these. Tied
    parameters count once. Activations depend on the batch and are not predicted.

        >>> m = nn.Linear(10, 4)                      # 44 float32 parameters in 2 tensors
        >>> predict_training_state(m).optimizer
        {'exp_avg': 176, 'exp_avg_sq': 176, 'step': 8}
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"predict_training_state expects an nn.Module, but got {type(model).__name__}")
    params = list(model.parameters())  # a tied weight (lm_head = embed_tokens) is yielded once
    trainable = [p for p in params if p.requires_grad]
    train_bytes = sum(_nbytes(p) for p in trainable)
    paged = 0
    if _is_bitsandbytes(optimizer):
        if amsgrad:
            raise ValueError("bitsandbytes' optimizers have no amsgrad state: predict with amsgrad=False")
        state_bytes = 4 * sum(p.numel() for p in trainable)  # float32 states
        optimizer_state = {"state1": state_bytes, "state2": state_bytes}
        if "Paged" in getattr(getattr(optimizer, "func", optimizer), "__name__", ""):
            paged = 2 * 4 * sum(p.numel() for p in trainable if p.is_cuda and p.numel() >= PAGED_MIN_ELEMENTS)
    else:
        step_bytes = torch.empty((), dtype=torch.get_default_dtype()).element_size()
        optimizer_state = {"exp_avg": train_bytes, "exp_avg_sq": train_bytes}
        if amsgrad:
            optimizer_state["max_exp_avg_sq"] = train_bytes
        optimizer_state["step"] = step_bytes * len(trainable)
    return TrainingState(
        trainable_parameters=train_bytes,
        frozen_parameters=sum(_nbytes(p) for p in params if not p.requires_grad),
        gradients=train_bytes,
        optimizer=optimizer_state,
        paged_optimizer=paged,
    )


def measure_training_state(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    optimizer_factory: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
    loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
) -> TrainingState:
    """Run one forward, backward and optimizer step on `model` and count the bytes torch holds.

    This really trains: the model's trainable weights change by one step. Existing gradients are
    cleared first, and the step's gradients are cleared (set to None) at the end.

    - parameters: distinct storages of the model's parameters, split by requires_grad;
    - gradients: distinct storages of the `.grad` tensors after backward;
    - optimizer: distinct storages of the optimizer state after the step, by state name;
    - activations: distinct storages that autograd saved for backward during the forward and still holds when the
      forward ends, counted with `torch.autograd.graph.saved_tensors_hooks` (a temporary graph built and dropped
      inside the forward saves nothing that backward reads). A saved tensor whose storage is a parameter's (an
      op saving its weight, or a view of it such as weight.t()) is not an activation: its bytes go to
      `saved_parameter_bytes` and are not added to `total`. The integer input ids that the
      embedding saves do count (they are small).

    `loss_fn(model, batch)` defaults to `model(**batch).loss` (lorakit.train.answer_loss).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"measure_training_state expects an nn.Module, but got {type(model).__name__}")
    params = list(model.parameters())  # a tied weight (lm_head = embed_tokens) is yielded once
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("no parameter requires grad: add adapters (add_lora) or unfreeze something first")
    if loss_fn is None:
        from lorakit.train import answer_loss as loss_fn

    param_storages = {_storage_key(p) for p in params}
    packed: list[tuple[weakref.ref, tuple[str, int], int]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append((weakref.ref(t), _storage_key(t), t.untyped_storage().nbytes()))
        return t

    for p in params:
        p.grad = None
    optimizer = optimizer_factory(trainable)
    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(model, batch)
        # what backward will read: tensors still held when the forward ends (a graph built and dropped inside the
        # forward, as peft's DoRA does for its weight norm, saved tensors that are already freed)
        saved: dict[tuple[str, int], int] = {}
        saved_params: dict[tuple[str, int], int] = {}
        for ref, key, nbytes in packed:
            if ref() is not None:
                (saved_params if key in param_storages else saved)[key] = nbytes
        del packed[:]
        loss.backward()
        grads = _unique_storage_bytes(p.grad for p in params if p.grad is not None)
        optimizer.step()
    finally:
        model.train(was_training)

    by_kind: dict[str, dict[tuple[str, int], int]] = {}
    paged: dict[tuple[str, int], int] = {}
    for state in optimizer.state.values():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                by_kind.setdefault(name, {})[_storage_key(value)] = value.untyped_storage().nbytes()
                if getattr(value, "is_paged", False):  # bitsandbytes' unified-memory state
                    paged[_storage_key(value)] = value.untyped_storage().nbytes()
    optimizer.zero_grad(set_to_none=True)
    return TrainingState(
        trainable_parameters=_unique_storage_bytes(trainable),
        frozen_parameters=_unique_storage_bytes(p for p in params if not p.requires_grad),
        gradients=grads,
        optimizer={k: sum(v.values()) for k, v in by_kind.items()},
        activations=sum(saved.values()),
        saved_parameter_bytes=sum(saved_params.values()),
        paged_optimizer=sum(paged.values()),
    )


# ---------------------------------------------------------------------------------------------------
# Whole models by architecture: full fine-tuning, LoRA and QLoRA side by side (the memory explorer)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """A LLaMA-style decoder by its sizes: `kv_dim` is the width of k_proj and v_proj (smaller than
    `hidden` under grouped-query attention); `tied` means lm_head shares the embedding matrix."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int
    tied: bool

    @property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of the seven linear layers of one block."""
        h, f, kv = self.hidden, self.intermediate, self.kv_dim
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}

    @property
    def linear_params(self) -> int:
        """Parameters of the decoder blocks' seven projections: what QLoRA stores in NF4."""
        return self.layers * sum(i * o for i, o in self.linear_shapes.values())

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.linear_params + self.layers * 2 * self.hidden + embeddings + self.hidden  # + RMSNorm weights

    def adapter_params(self, r: int, targets: str | Iterable[str] = ("q_proj", "v_proj")) -> int:
        return self.layers * lora_budget(r, targets, self.linear_shapes).adapter_params


MODEL_SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in (
        ModelShape("SmolLM2-135M", 30, 576, 1536, 192, 49152, tied=True),
        ModelShape("LLaMA-7B", 32, 4096, 11008, 4096, 32000, tied=False),
        ModelShape("LLaMA-65B", 80, 8192, 22016, 8192, 32000, tied=False),
        ModelShape("Llama-2-70B", 80, 8192, 28672, 1024, 32000, tied=False),
    )
}

TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "q,v": ("q_proj", "v_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all-linear": tuple(LLAMA_BLOCK_4096),
}

METHODS = ("full", "LoRA", "QLoRA")


@dataclass(frozen=True)
class MemoryBreakdown:
    """Training-state memory of one model under one method, by component, in GB (no activations).

    Mixed precision as the lesson counts it: 16-bit weights and gradients, two fp32 Adam moments, and
    optionally an fp32 master copy, for every *trainable* parameter. The frozen base costs 2 bytes per
    parameter (16-bit) under LoRA. QLoRA as bitsandbytes and peft do it: the decoder's linear layers in NF4
    with double quantization (4.127 bits), the embedding, the output head and the norms left in 16 bits, and
    the adapters in float32 (weights, gradients and Adam moments: 16 bytes per parameter).
    """

    model: str
    method: str
    params: int
    trainable: int
    components: tuple[tuple[str, float], ...]

    @property
    def total_gb(self) -> float:
        return sum(gb for _, gb in self.components)

    def __str__(self) -> str:
        title = (f"{self.method} on {self.model}: {self.trainable:,d} trainable of {self.params:,d} parameters "
                 f"({100 * self.trainable / self.params:.3g}%)")
        return _table(title, ("component", "GB"), [*self.components, ("total", self.total_gb)])


def finetune_memory(
    model: str | ModelShape = "Llama-2-70B",
    method: str = "LoRA",
    r: int = 16,
    targets: str | Iterable[str] = "q,v",
    master_weights: bool = False,
) -> MemoryBreakdown:
    """Weights, gradients and optimizer state of full fine-tuning, LoRA or QLoRA of a whole model.

    `targets` is a preset ("q,v", "attention", "all-linear") or a list of module names; `r` and
    `targets` are ignored for full fine-tuning.

    >>> round(finetune_memory("LLaMA-65B", "full").total_gb)   # 65.3B parameters x 12 bytes
    783
    """
    shape = model if isinstance(model, ModelShape) else MODEL_SHAPES.get(model)
    if shape is None:
        raise ValueError(f"`model` should be one of {sorted(MODEL_SHAPES)} or a ModelShape, but got {model!r}")
    if method not in METHODS:
        raise ValueError(f"`method` should be one of {METHODS}, but the value passed is {method!r}")
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise ValueError(f"`targets` should be one of {sorted(TARGET_PRESETS)} or a list of module names, "
                             f"but the value passed is {targets!r}")
        targets = TARGET_PRESETS[targets]
    n = shape.params
    trainable = n if method == "full" else shape.adapter_params(_positive_int("r", r), targets)
    frozen = n - trainable if method == "full" else n
    rows: list[tuple[str, float]] = []
    if method == "full":
        rows.append(("16-bit weights (trainable)", 2 * trainable / GB))
    elif method == "LoRA":
        rows.append(("16-bit frozen base", 2 * frozen / GB))
        rows.append(("16-bit adapter weights", 2 * trainable / GB))
    else:  # bitsandbytes quantizes only the linear layers; peft keeps adapters over a 4-bit base in float32
        rows.append(("NF4 linear layers (4.127 bits)", nf4_bits_per_param(True) / 8 * shape.linear_params / GB))
        rows.append(("16-bit embeddings, head, norms", 2 * (n - shape.linear_params) / GB))
        rows.append(("fp32 adapter weights", 4 * trainable / GB))
    grad_bytes = 4 if method == "QLoRA" else 2
    rows.append((f"{'fp32' if method == 'QLoRA' else '16-bit'} gradients", grad_bytes * trainable / GB))
    rows.append(("fp32 Adam moments m, v", 8 * trainable / GB))
    if master_weights:
        rows.append(("fp32 master weights", 4 * trainable / GB))
    return MemoryBreakdown(shape.name, method, n, trainable, tuple(rows))
