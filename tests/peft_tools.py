"""Shared by the peft-oracle tests (test_lora.py, test_dora.py): the same base layer wrapped by peft and by
lorakit, with peft's adapter weights copied into lorakit's."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from lorakit.dora import DoRALinear
from lorakit.lora import LoRALinear


class Tiny(nn.Module):
    """The smallest model peft can wrap: one linear layer named `proj`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def make_pair(
    in_features: int,
    out_features: int,
    *,
    dora: bool = False,
    bias: bool = True,
    r: int = 4,
    alpha: float = 8,
    rslora: bool = False,
    dropout: float = 0.0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """(lorakit layer, peft model, peft's lora.Linear) on the same base with the same A and a non-zero B;
    with `dora`, a DoRALinear against peft's use_dora=True, and a magnitude m != ||W0||."""
    torch.manual_seed(seed)
    base = Tiny(in_features, out_features, bias).to(dtype)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora, use_dora=dora, target_modules=["proj"]
    )
    peft_model = get_peft_model(copy.deepcopy(base), config)
    peft_layer = peft_model.base_model.model.proj
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_()
        if dora:
            m = peft_layer.lora_magnitude_vector["default"].weight
            m.mul_(1 + 0.2 * torch.randn_like(m))
    layer = DoRALinear if dora else LoRALinear
    ours = layer(copy.deepcopy(base.proj), r=r, alpha=alpha, dropout=dropout, rslora=rslora)
    copy_adapter(ours, peft_layer)
    return ours, peft_model, peft_layer


@torch.no_grad()
def copy_adapter(ours: LoRALinear, peft_layer: LoraLayer) -> None:
    """Copy peft's A and B (and DoRA's magnitude) into a lorakit layer."""
    ours.lora_A.copy_(peft_layer.lora_A["default"].weight)
    ours.lora_B.copy_(peft_layer.lora_B["default"].weight)
    if isinstance(ours, DoRALinear):
        ours.magnitude.copy_(peft_layer.lora_magnitude_vector["default"].weight)


def inputs(in_features: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """A 2-D batch and a 3-D (batch, sequence, features) batch."""
    return [torch.randn(3, in_features, dtype=dtype), torch.randn(2, 4, in_features, dtype=dtype)]
