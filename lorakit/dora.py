"""DoRA from scratch: LoRA on the direction of a weight, plus a trainable magnitude per output feature.

W' = m * (W0 + s B A) / ||W0 + s B A||_c                        (Liu et al., 2024, eq. 5)

DoRA ("DoRA: Weight-Decomposed Low-Rank Adaptation", Liu et al., ICML 2024, arXiv:2402.09353) splits a
weight into a magnitude and a direction, as weight normalisation does (Salimans & Kingma, 2016):
W = m * V / ||V||_c. The direction V = W0 + s B A gets an ordinary LoRA update (s = alpha / r, or
alpha / sqrt(r) with rsLoRA) and the magnitude m, one number per output feature, is trained directly.
The paper writes W as (in, out) and takes the norm of each column; in PyTorch's (out_features,
in_features) layout that is the norm of each row, over dim=1.

m starts as the row norms of W0 and B as zero, so W' = W0 and the wrapped layer starts as a no-op.
Following section 4.3 of the paper, the norm ||W0 + s B A||_c is treated as a constant in the backward
pass. Names, the forward formula and merging follow peft (peft/tuners/lora/dora.py, DoraLinearLayer,
and peft/tuners/lora/variants.py, DoraLinearVariant), the oracle of the tests.

A weight with rows (3, 4) and (0, 2) has magnitudes 5 and 2; its direction has rows of length one:

    >>> import torch
    >>> m, v = magnitude_and_direction(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    >>> m
    tensor([5., 2.])
    >>> v
    tensor([[0.6000, 0.8000],
            [0.0000, 1.0000]])
    >>> layer = DoRALinear(torch.nn.Linear(4, 3), r=2, alpha=4)
    >>> layer.lora_A.shape, layer.lora_B.shape, layer.magnitude.shape, layer.scaling
    (torch.Size([2, 4]), torch.Size([3, 2]), torch.Size([3]), 2.0)

On top of LoRA's r * (in + out) parameters DoRA trains out_features magnitudes: for a 4096 x 4096
projection at r = 16 that is 131,072 + 4,096, i.e. 3.125% more than LoRA.

The module imports only torch: peft is the oracle the tests compare against, never a dependency.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lorakit.lora import LoRALinear

__all__ = ["DoRALinear", "magnitude_and_direction"]


def _row_norms(weight: torch.Tensor) -> torch.Tensor:
    return torch.linalg.norm(weight, dim=1)  # (out, in) -> (out,)


def magnitude_and_direction(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a linear weight into (magnitude, direction) with weight = magnitude[:, None] * direction.

    `weight` has PyTorch's (out_features, in_features) layout; the magnitude is the L2 norm of each row,
    shape (out_features,), and every row of the direction has length one (a zero row gives NaNs).
    """
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"`weight` should be a 2-D (out_features, in_features) tensor, but got {shape}")
    magnitude = _row_norms(weight)  # (out,)
    return magnitude, weight / magnitude.unsqueeze(1)  # (out, in) / (out, 1) -> (out, in)


class DoRALinear(LoRALinear):
    """A frozen `nn.Linear` whose weight becomes m * (W0 + s B A) / ||W0 + s B A||, row by row.

    Args:
        base: the pretrained layer; its parameters are frozen in place.
        r: rank of the directional update B @ A (a positive integer).
        alpha: strength of the directional update; B @ A is multiplied by `scaling`.
        dropout: dropout probability on the adapter input (see `forward` for where peft applies it).
        rslora: use alpha / sqrt(r) instead of alpha / r.

    A `LoRALinear` (same `lora_A`, `lora_B`, `scaling`, `delta_weight()`) plus `magnitude`, shape
    (out_features,). Adapter weights and the magnitude live in float32 when the base is in half precision
    (as peft does by default), otherwise in the base's dtype.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__(base, r, alpha, dropout=dropout, rslora=rslora)
        # m = ||W0|| row by row, which is ||W0 + s B A|| while B = 0: the layer starts as an exact no-op.
        self.magnitude = nn.Parameter(_row_norms(self.base.weight.detach().to(self.lora_A.dtype)))  # (out,)
        # The norm the merged weight was built with; unmerge needs it, as the merged weight no longer holds W0.
        self.register_buffer("merged_norm", None, persistent=False)

    def _weight_and_norm(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W0 + s B A, its detached row norms), shapes (out, in) and (out,), in the adapter dtype."""
        weight = self.base.weight.to(self.lora_A.dtype) + self.delta_weight()  # (out, in)
        # Section 4.3 of the paper: "we suggest treating ||V + ∆V||_c in Eq. (5) as a constant, thereby
        # detaching it from the gradient graph. This means that while ||V + ∆V||_c dynamically reflects the
        # updates of ∆V, it won't receive any gradient during backpropagation". It saves training memory; the
        # paper reports no noticeable loss in accuracy. peft detaches the norm the same way.
        return weight, _row_norms(weight).detach()  # (out,)

    def weight_norm(self) -> torch.Tensor:
        """||W0 + s B A|| for each output feature, shape (out_features,), detached from the graph.

        While merged, the norm the merged weight was built with (the base weight no longer holds W0).
        """
        return self.merged_norm if self.merged else self._weight_and_norm()[1]

    def adapted_weight(self) -> torch.Tensor:
        """W' = m * (W0 + s B A) / ||W0 + s B A||, shape (out_features, in_features): the weight merge writes.

        While merged, that is the base weight itself (a copy in the adapter dtype).
        """
        if self.merged:
            return self.base.weight.detach().to(self.lora_A.dtype, copy=True)
        weight, norm = self._weight_and_norm()
        return (self.magnitude / norm).unsqueeze(1) * weight  # (out, 1) * (out, in) -> (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)  # (..., out) = W0 x + b
        if self.merged:
            return result  # W' already lives inside base.weight
        x = x.to(self.lora_A.dtype)  # (..., in)
        scale = self.magnitude / self.weight_norm()  # (out,): m / ||W0 + s B A||, the norm a constant
        # W' x + b = W0 x + b + (scale - 1) * W0 x + scale * s * B A x: the base output plus a correction, so
        # that W0 x is computed once. With dropout, peft evaluates the correction on the dropped input and
        # must then recompute W0 on it (DoraLinearVariant.forward passes base_result=None), so the output is
        # W0 x + b + (scale - 1) * W0 d(x) + scale * s * B A d(x) = W0 x + b + (W' - W0) d(x): the base path
        # sees the clean x and dropout acts on the input of the whole update W' - W0, as in LoRA on s B A.
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base_result = result if self.base.bias is None else result - self.base.bias  # (..., out) W0 x
        else:
            x = self.dropout(x)  # (..., in)
            base_result = F.linear(x, self.base.weight.to(x.dtype))  # (..., out) W0 d(x), no bias
        lora_result = F.linear(F.linear(x, self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        correction = (scale - 1) * base_result + scale * lora_result * self.scaling  # (..., out)
        return (result + correction).to(result.dtype)  # the bias is in `result` once, never rescaled

    @torch.no_grad()
    def merge(self) -> None:
        """Write W' into the base weight and remember the norm it was built with. Idempotent."""
        if not self.merged:
            norm = self.weight_norm()  # (out,), from W0 before it is overwritten
            new_weight = self.adapted_weight()  # (out, in), in the adapter dtype
            self.merged_norm = norm
            self.base.weight.copy_(new_weight)  # a float32 W' on a half base is rounded once, as in peft
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge as peft does, W0 = W' / (m / norm) - s B A, which restores W0 up to rounding."""
        if self.merged:
            scale = (self.magnitude / self.merged_norm).unsqueeze(1)  # (out, 1)
            weight = self.base.weight.to(scale.dtype) / scale - self.delta_weight()  # (out, in)
            self.base.weight.copy_(weight)
            self.merged_norm = None
            self.merged = False
