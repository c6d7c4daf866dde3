"""Low-rank structure of a matrix: the best rank-r approximation, and how much of a matrix r directions hold.

The singular value decomposition M = U diag(S) Vᵀ orders a matrix's directions by importance; by the
Eckart–Young theorem the top r terms are the best rank-r approximation in Frobenius norm, and its error is
the energy of the rest, sqrt(S_{r+1}² + ...). Notebook 02 uses these on the update ΔW = W_after − W_before
of a real fine-tuning run.

    >>> S = torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0])     # squares 9, 4, 1, 1, 1
    >>> energy_captured(S, 2), effective_rank(S, 0.8)
    (0.8125, 2)
"""

from __future__ import annotations

import torch

from lorakit.lora import _positive_int

__all__ = ["truncated_svd", "energy_captured", "effective_rank", "subspace_share"]


def _matrix(name: str, M: object) -> torch.Tensor:
    if not isinstance(M, torch.Tensor) or M.ndim != 2:
        shape = tuple(M.shape) if isinstance(M, torch.Tensor) else type(M).__name__
        raise ValueError(f"`{name}` should be a 2-D tensor, but got {shape}")
    return M


def _spectrum(S: object) -> torch.Tensor:
    if not isinstance(S, torch.Tensor) or S.ndim != 1 or S.numel() == 0:
        raise ValueError(f"`S` should be a non-empty 1-D tensor of singular values, but got {S!r}")
    return S


def truncated_svd(M: torch.Tensor, r: int) -> torch.Tensor:
    """The best rank-r approximation of M (Eckart–Young), same shape and dtype as M."""
    M, r = _matrix("M", M), _positive_int("r", r)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)  # (m, k), (k,), (k, n)
    return (U[:, :r] * S[:r]) @ Vh[:r]  # (m, r) scaled by S, times (r, n)


def energy_captured(S: torch.Tensor, r: int) -> float:
    """Fraction of the squared Frobenius norm held by the top r singular values (S sorted, decreasing)."""
    energy = _spectrum(S).double() ** 2
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"`r` should be a non-negative integer, but the value passed is {r!r}")
    return float(energy[:r].sum() / energy.sum())


def effective_rank(S: torch.Tensor, threshold: float = 0.9) -> int:
    """The smallest r whose top-r singular values hold at least `threshold` of the energy."""
    if not 0 < threshold <= 1:
        raise ValueError(f"`threshold` should be in (0, 1], but the value passed is {threshold!r}")
    energy = _spectrum(S).double() ** 2
    cumulative = energy.cumsum(0) / energy.sum()
    return min(int((cumulative < threshold - 1e-12).sum()) + 1, len(S))


def subspace_share(update: torch.Tensor, reference: torch.Tensor, r: int) -> float:
    """Share of `update`'s energy inside the span of `reference`'s top-r left singular vectors (its r most
    important output directions): 1.0 if the update lies inside, about r / d_out for a random one."""
    update, reference, r = _matrix("update", update), _matrix("reference", reference), _positive_int("r", r)
    if update.shape[0] != reference.shape[0]:
        raise ValueError(f"`update` {tuple(update.shape)} and `reference` {tuple(reference.shape)} need the same rows")
    U = torch.linalg.svd(reference, full_matrices=False)[0][:, :r]  # (d_out, r), orthonormal columns
    inside = U @ (U.T @ update)  # projection of every column of the update onto span(U)
    return float(inside.norm() ** 2 / update.norm() ** 2)
