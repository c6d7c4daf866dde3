"""QLoRA from scratch: LoRA adapters on a frozen base weight that is stored only in NF4.

h = dequant(W0_nf4) x + (alpha / r) * B A x                   (Dettmers et al., 2023, eq. 5)

The base weight W0 (out_features, in_features) is quantized once with `lorakit.nf4.quantize_nf4` (double
quantization on by default, as in QLoRA) and only the packed codes and constants are kept, as buffers:
about 4.127 bits per parameter instead of 16 or 32. Each forward pass dequantizes it to the compute dtype,
multiplies, and drops the float copy; backward dequantizes it again to pass the gradient to the input
(as bitsandbytes' `matmul_4bit` does), so no float copy of W0 lives between the two passes and W0 never
receives a gradient. The adapters A and B are ordinary float32 parameters, initialised and scaled exactly
as in `lorakit.lora.LoRALinear`.

    >>> import torch
    >>> layer = QLoRALinear.from_linear(torch.nn.Linear(128, 64), r=8, alpha=16)
    >>> layer.lora_A.shape, layer.lora_B.shape, layer.scaling, layer.weight_nf4.data.dtype
    (torch.Size([8, 128]), torch.Size([64, 8]), 2.0, torch.uint8)
    >>> [name for name, p in layer.named_parameters() if p.requires_grad]
    ['lora_A', 'lora_B']

bitsandbytes' `Linear4bit` with peft's LoRA is the oracle the tests compare against, never a dependency.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from lorakit.lora import _check_alpha, _check_dropout, _check_rank
from lorakit.nf4 import NF4Tensor, dequantize_nf4, quantize_nf4

__all__ = ["QLoRALinear"]

_BUFFERS = ("data", "absmax", "absmax_code", "absmax_scale", "absmax_offset")


class _NF4Linear(torch.autograd.Function):
    """y = x W^T (+ b) with W dequantized from NF4 in forward and again in backward; no gradient for W or b."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight  # the packed weight only: the float copy below is freed after the matmul
        w = dequantize_nf4(weight, x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize_nf4(ctx.weight, grad_out.dtype)  # (..., out) @ (out, in)
        return grad_x, None, None


class QLoRALinear(nn.Module):
    """A linear layer whose frozen weight is stored in NF4, plus a trainable low-rank update (alpha / r) * B @ A.

    Build one from an `nn.Linear` with `from_linear`. Args of the constructor:
        weight: the quantized (out_features, in_features) base weight.
        bias: the base bias (kept frozen, in its dtype), or None.
        r, alpha, dropout, rslora: as in `LoRALinear`.
        compute_dtype: the dtype the base weight is dequantized to and multiplied in; None follows the input
            (as bitsandbytes' `Linear4bit` does for float32 and bfloat16 inputs).

    The NF4 tensors are buffers (`weight_data`, then `weight_absmax` or `weight_absmax_code`,
    `weight_absmax_scale`, `weight_absmax_offset`), so they follow `.to(device)` and the state dict. Do not
    cast the module with `.half()` / `.to(dtype)`: that would round the float32 constants.
    """

    def __init__(
        self,
        weight: NF4Tensor,
        bias: torch.Tensor | None,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        compute_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if not isinstance(weight, NF4Tensor):
            raise TypeError(f"`weight` should be an NF4Tensor, but got {type(weight).__name__}")
        if len(weight.shape) != 2:
            raise ValueError(f"`weight` should be 2-D (out_features, in_features), but has shape {tuple(weight.shape)}")
        float_dtype = isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point
        if compute_dtype is not None and not float_dtype:
            raise ValueError(f"`compute_dtype` should be a floating-point torch.dtype, but got {compute_dtype!r}")
        self.out_features, self.in_features = weight.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"`bias` should have shape ({self.out_features},), but has {tuple(bias.shape)}")
        self.r = _check_rank(r)
        self.alpha = _check_alpha(alpha)
        dropout_p = _check_dropout(dropout)
        self.rslora = bool(rslora)
        self.scaling = self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r
        self.compute_dtype = compute_dtype

        self.blocksize = weight.blocksize
        self.weight_dtype = weight.dtype  # the dtype the weight had before quantization
        for name in _BUFFERS:
            self.register_buffer(f"weight_{name}", getattr(weight, name))  # None for the form not stored
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

        device = weight.data.device
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r, dtype=torch.float32, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as LoRALinear and peft
        self.dropout = nn.Dropout(dropout_p) if dropout_p > 0 else nn.Identity()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int,
        alpha: float,
        blocksize: int = 64,
        double_quant: bool = True,
        dropout: float = 0.0,
        compute_dtype: torch.dtype | None = None,
        rslora: bool = False,
    ) -> QLoRALinear:
        """Quantize `linear.weight` to NF4 (in blocks of `blocksize`, constants double-quantized by default)
        and wrap it with fresh adapters. `linear` itself is left untouched; the result keeps no float weight."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__} wraps an nn.Linear, but got {type(linear).__name__}")
        weight = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(weight, linear.bias, r, alpha, dropout=dropout, rslora=rslora, compute_dtype=compute_dtype)

    @property
    def weight_nf4(self) -> NF4Tensor:
        """The stored base weight as an NF4Tensor (views of this module's buffers)."""
        return NF4Tensor(
            self.weight_data,
            self.weight_absmax,
            self.blocksize,
            torch.Size((self.out_features, self.in_features)),
            self.weight_dtype,
            self.weight_absmax_code,
            self.weight_absmax_scale,
            self.weight_absmax_offset,
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight W0 as the forward pass sees it, (out_features, in_features); a fresh tensor.

        `dtype` defaults to `compute_dtype`, or else to the dtype the weight had before quantization."""
        return dequantize_nf4(self.weight_nf4, dtype or self.compute_dtype or self.weight_dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update the adapter adds to W0: scaling * B @ A, shape (out_features, in_features)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, but this layer expects {self.in_features}")
        dtype = self.compute_dtype or x.dtype
        result = _NF4Linear.apply(x.to(dtype), self.weight_nf4, self.bias)  # (..., out), in `dtype`
        z = self.dropout(x.to(self.lora_A.dtype))  # (..., in), float32
        update = F.linear(F.linear(z, self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        return (result + (update * self.scaling).to(result.dtype)).to(x.dtype)

    @property
    def nbytes_base(self) -> int:
        """Bytes the frozen base weight takes here: packed codes plus quantization constants."""
        return self.weight_nf4.nbytes

    def extra_repr(self) -> str:
        kind = "double-quantized" if self.weight_absmax is None else "float32 absmax"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha:g}, "
            f"scaling={self.scaling:g}, nf4 blocksize={self.blocksize} ({kind}), compute_dtype={self.compute_dtype}"
        )
