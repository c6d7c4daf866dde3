"""LoRA from scratch: a low-rank overlay on a frozen linear layer.

h = W0 x + (alpha / r) * B A x                                  (Hu et al., 2021, eq. 3)

W0 is the frozen pretrained weight, shape (out_features, in_features). The update is the product of
two thin matrices, A of shape (r, in_features) and B of shape (out_features, r), so it has rank at most
r and costs r * (in_features + out_features) parameters instead of in_features * out_features.

Names and initialisation follow microsoft/LoRA and peft: `lora_A` is Kaiming-uniform, `lora_B` is
zero, so B @ A = 0 and the wrapped layer starts as an exact no-op. `scaling` is alpha / r, or
alpha / sqrt(r) with rank-stabilised LoRA (Kalajdzievski, 2023).

    >>> import torch
    >>> layer = LoRALinear(torch.nn.Linear(4, 3), r=2, alpha=4)
    >>> layer.lora_A.shape, layer.lora_B.shape, layer.scaling
    (torch.Size([2, 4]), torch.Size([3, 2]), 2.0)

The module imports only torch: peft is the oracle the tests compare against, never a dependency.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "LoRALinear",
    "add_lora",
    "merge_lora",
    "remove_lora",
    "lora_parameter_count",
    "get_nb_trainable_parameters",
    "print_trainable_parameters",
]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` should be a positive integer, but the value passed is {value!r}")
    return int(value)


def _positive_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` should be a positive finite number, but the value passed is {value!r}")
    return float(value)


def _check_rank(r: object) -> int:
    return _positive_int("r", r)


def _check_alpha(alpha: object) -> float:
    return _positive_number("alpha", alpha)


def _check_dropout(dropout: object) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` should be a number in [0, 1), but the value passed is {dropout!r}")
    return float(dropout)


def lora_parameter_count(d_in: int, d_out: int, r: int) -> int:
    """Trainable parameters of one LoRA adapter: A is (r, d_in), B is (d_out, r).

    >>> lora_parameter_count(4096, 4096, 16)
    131072
    """
    r, d_in, d_out = _check_rank(r), _positive_int("d_in", d_in), _positive_int("d_out", d_out)
    return r * d_in + d_out * r


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update (alpha / r) * B @ A.

    Args:
        base: the pretrained layer; its parameters are frozen in place.
        r: rank of the update (a positive integer).
        alpha: strength of the update; the overlay is multiplied by `scaling`.
        dropout: dropout probability on the adapter path only (the base path never sees it).
        rslora: use alpha / sqrt(r) instead of alpha / r.

    Adapter weights live in float32 when the base is in half precision (as peft does by default),
    otherwise in the base's dtype.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps an nn.Linear, but got {type(base).__name__}")
        self.r = _check_rank(r)
        self.alpha = _check_alpha(alpha)
        dropout_p = _check_dropout(dropout)
        self.rslora = bool(rslora)
        self.scaling = self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r

        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)  # W0 (and the bias) stay frozen: no gradient, no optimizer state

        weight = base.weight  # (out_features, in_features)
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A = nn.Parameter(torch.empty(self.r, base.in_features, dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, self.r, dtype=dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.dropout = nn.Dropout(dropout_p) if dropout_p > 0 else nn.Identity()
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """The update the adapter adds to W0: scaling * B @ A, shape (out_features, in_features)."""
        return self.scaling * (self.lora_B @ self.lora_A)  # (out, r) @ (r, in) -> (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)  # (..., out)
        if self.merged:
            return result  # the update already lives inside base.weight
        z = self.dropout(x.to(self.lora_A.dtype))  # (..., in)
        update = F.linear(F.linear(z, self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        return (result + update * self.scaling).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight: W <- W0 + scaling * B @ A. Idempotent."""
        if not self.merged:
            self.base.weight += self.delta_weight()  # a float32 update on a half base is rounded once, as in peft
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out: W <- W - scaling * B @ A, which restores W0 up to rounding."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, merged={self.merged}"


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def add_lora(
    model: nn.Module,
    target_modules: str | Iterable[str],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    rslora: bool = False,
) -> nn.Module:
    """Freeze `model` and wrap the targeted linear layers in `LoRALinear`, in place.

    `target_modules` is a list of names matched against the end of each module's dotted name
    (`"q_proj"` matches `model.layers.0.self_attn.q_proj`), or `"all-linear"`: every `nn.Linear` but the
    output head, as peft does. Every name must match at least one module, and every match must be
    an `nn.Linear`.

        >>> m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = add_lora(m, ["0"], r=2, alpha=4)
        >>> get_nb_trainable_parameters(m)  # 2*8 + 8*2 adapter parameters of 90 (+ 32)
        (32, 122)
    """
    _check_rank(r)
    _check_alpha(alpha)
    _check_dropout(dropout)
    if not isinstance(model, nn.Module):
        raise TypeError(f"add_lora expects an nn.Module, but got {type(model).__name__}")

    # Modules inside an existing adapter (its .base) are not candidates.
    inner = {id(m) for lora in model.modules() if isinstance(lora, LoRALinear) for m in lora.modules() if m is not lora}
    named = [(n, m) for n, m in model.named_modules() if n and id(m) not in inner]

    if isinstance(target_modules, str):
        if target_modules != "all-linear":
            raise ValueError(
                f"`target_modules` should be a list of module names or 'all-linear', but the value passed is "
                f"{target_modules!r}; for one module write [{target_modules!r}]"
            )
        head = _output_head(model)
        chosen = [(n, m) for n, m in named if isinstance(m, nn.Linear) and m is not head]
        if not chosen:
            raise ValueError("`target_modules='all-linear'` matched no nn.Linear layer in this model")
    else:
        targets = list(target_modules)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"`target_modules` should be non-empty module names, but the value passed is {targets!r}")
        chosen = [(n, m) for n, m in named if any(_matches(n, t) for t in targets)]
        for t in targets:
            if not any(_matches(n, t) for n, _ in chosen):
                raise ValueError(f"target module {t!r} matches no module in this model")
        for n, m in chosen:
            if isinstance(m, LoRALinear):
                raise ValueError(f"module {n!r} already has a LoRA adapter")
            if not isinstance(m, nn.Linear):
                raise TypeError(f"target module {n!r} is a {type(m).__name__}, not an nn.Linear")

    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in chosen:
        _set_submodule(model, name, LoRALinear(module, r, alpha, dropout=dropout, rslora=rslora))
    return model


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain `nn.Linear` layers back, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            module.merge()
            _set_submodule(model, name, module.base)
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Take every adapter out without merging, in place: each `LoRALinear` gives back the frozen `nn.Linear` it
    wraps, so the model is the pretrained one again (peft's `unload()`). Undoes `add_lora`; the next run of a sweep
    can start from here."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _set_submodule(model, name, module.base)
    return model


def get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), counted once each, as peft's method of that name."""
    params = list(model.parameters())  # a tied weight (lm_head = embed_tokens) is yielded once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model: nn.Module) -> None:
    """Print the counts in peft's format: trainable params, all params and the trainable share."""
    trainable, total = get_nb_trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
