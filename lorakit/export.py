"""Save `lorakit` adapters in peft's on-disk format, so `PeftModel.from_pretrained` can load them.

A peft LoRA adapter is a folder with two files:

* `adapter_config.json`: the `LoraConfig` (peft_type "LORA", r, lora_alpha, target_modules, ...);
* `adapter_model.safetensors`: the A and B factors only, keyed by the wrapped module's name with peft's prefix and
  without the adapter name, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`
  (A: (r, in_features)) and `...q_proj.lora_B.weight` (B: (out_features, r)).

lorakit names its factors `lora_A` and `lora_B` with the same shapes as peft, so exporting is a renaming. The
frozen base weights are not saved: whoever loads the adapter supplies the base model.

    >>> add_lora(model, ["q_proj", "v_proj"], r=8, alpha=16)          # doctest: +SKIP
    >>> save_peft_adapter(model, "my-adapter")                         # doctest: +SKIP
    >>> peft_model = PeftModel.from_pretrained(fresh_base, "my-adapter")   # doctest: +SKIP

Like the rest of lorakit, this module does not import peft (the tests use peft as the oracle).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from lorakit.dora import DoRALinear
from lorakit.lora import LoRALinear

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "peft_state_dict", "peft_adapter_config", "save_peft_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # what PeftModel (-> LoraModel -> your model) puts in front of every module name


def _adapters(model: nn.Module) -> dict[str, LoRALinear]:
    """name -> LoRALinear for every lorakit adapter in `model`, in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_peft_adapter expects an nn.Module, but got {type(model).__name__}")
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, DoRALinear):
            raise TypeError(f"module {name!r} is a DoRALinear: only plain LoRA adapters (LoRALinear) are exported")
        if isinstance(module, LoRALinear):
            if module.merged:
                raise ValueError(f"module {name!r} is merged into its base weight: unmerge it before exporting")
            found[name] = module
    if not found:
        raise ValueError("the model has no lorakit LoRA adapter (LoRALinear): nothing to export; call add_lora first")
    return found


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under the key names peft's `save_pretrained` writes (detached, contiguous copies)."""
    state = {}
    for name, layer in _adapters(model).items():
        state[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().contiguous().clone()  # (r, in)
        state[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().contiguous().clone()  # (out, r)
    return state


def _short_targets(model: nn.Module, adapted: dict[str, LoRALinear]) -> list[str]:
    """peft matches `target_modules` against the end of each module name. Use the short names (`q_proj`) when they
    select exactly the adapted layers, otherwise the full names, which match only themselves."""
    short = sorted({name.rpartition(".")[2] for name in adapted})
    candidates = {
        name
        for name, module in model.named_modules()
        if name and isinstance(module, (nn.Linear, LoRALinear)) and name.rpartition(".")[2] in short
        and not any(name.startswith(a + ".") for a in adapted)  # a LoRALinear's own `.base` is not a candidate
    }
    return short if candidates == set(adapted) else sorted(adapted)


def _most_common(values: list[float]) -> float:
    return max(sorted(set(values)), key=values.count)


def peft_adapter_config(
    model: nn.Module, base_model_name_or_path: str | None = None, task_type: str | None = "CAUSAL_LM"
) -> dict:
    """The `adapter_config.json` content for the model's adapters, as a dict that `peft.LoraConfig` accepts.

    A rank or alpha that differs between layers goes into `rank_pattern` / `alpha_pattern` (full module names),
    as peft does; every adapter must agree on rsLoRA and dropout."""
    adapted = _adapters(model)
    layers = list(adapted.values())
    for setting, values in (("use_rslora", {la.rslora for la in layers}), ("lora_dropout", set(map(_dropout, layers)))):
        if len(values) > 1:
            raise ValueError(f"peft's LoraConfig has one `{setting}` for all layers, but the adapters have {values}")
    r = int(_most_common([la.r for la in layers]))
    alpha = _most_common([la.alpha for la in layers])
    if base_model_name_or_path is None:
        config = getattr(model, "config", None)
        base_model_name_or_path = getattr(config, "_name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "target_modules": _short_targets(model, adapted),
        "rank_pattern": {re.escape(n): la.r for n, la in adapted.items() if la.r != r},
        "alpha_pattern": {re.escape(n): la.alpha for n, la in adapted.items() if la.alpha != alpha},
        "lora_dropout": _dropout(layers[0]),
        "use_rslora": layers[0].rslora,
        "use_dora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def _dropout(layer: LoRALinear) -> float:
    return float(layer.dropout.p) if isinstance(layer.dropout, nn.Dropout) else 0.0


def save_peft_adapter(
    model: nn.Module,
    path: str | Path,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> Path:
    """Write the model's lorakit LoRA adapters to the folder `path` in peft's format; returns the folder.

    Args:
        model: a model with `LoRALinear` layers (from `add_lora`), not merged.
        path: the folder to write (created if needed): `adapter_config.json` and `adapter_model.safetensors`.
        base_model_name_or_path: recorded in the config (default: the model's `config._name_or_path`, if any).
        task_type: peft's task type, "CAUSAL_LM" for a causal LM (then `PeftModel.from_pretrained` returns a
            `PeftModelForCausalLM`); None for a plain module.

    Load it back with `peft.PeftModel.from_pretrained(base_model, path)` on a fresh copy of the base model.
    """
    from safetensors.torch import save_file

    config = peft_adapter_config(model, base_model_name_or_path, task_type)
    state = peft_state_dict(model)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder
