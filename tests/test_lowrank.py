"""lorakit.lowrank: Eckart–Young, energy and effective rank, subspace share, and bad arguments."""

from __future__ import annotations

import doctest

import pytest
import torch

import lorakit.lowrank
from lorakit.lowrank import effective_rank, energy_captured, subspace_share, truncated_svd


@pytest.mark.parametrize(("m", "n", "r"), [(40, 25, 1), (25, 40, 7), (30, 30, 30)])
def test_truncated_svd_is_the_best_rank_r_approximation(m, n, r):
    g = torch.Generator().manual_seed(m + n + r)
    M = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = truncated_svd(M, r)
    S = torch.linalg.svdvals(M)
    assert X.shape == M.shape and X.dtype == M.dtype and torch.linalg.matrix_rank(X) == r
    assert torch.isclose((M - X).norm(), S[r:].pow(2).sum().sqrt(), atol=1e-10)
    for _ in range(10):  # projections onto random r-dimensional subspaces never beat it
        Q, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
        assert (M - M @ Q @ Q.T).norm() >= (M - X).norm() - 1e-10


def test_energy_and_effective_rank():
    S = torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0])
    assert energy_captured(S, 0) == 0.0 and energy_captured(S, 1) == 9 / 16 and energy_captured(S, 5) == 1.0
    assert [effective_rank(S, t) for t in (0.5, 9 / 16, 0.6, 13 / 16, 0.9, 1.0)] == [1, 1, 2, 2, 4, 5]


def test_subspace_share():
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(200, 3, generator=g) @ torch.randn(3, 50, generator=g)  # rank 3
    inside = reference[:, :1] @ torch.randn(1, 50, generator=g)  # a column of the reference: inside its span
    assert subspace_share(inside, reference, 3) == pytest.approx(1.0, abs=1e-5)
    shares = [subspace_share(torch.randn(200, 50, generator=g), reference, 3) for _ in range(20)]
    assert sum(shares) / len(shares) == pytest.approx(3 / 200, rel=0.3)  # random: about r / d_out


@pytest.mark.parametrize(
    ("call", "shown"),
    [
        (lambda: truncated_svd(torch.ones(3), 1), "(3,)"),
        (lambda: truncated_svd(torch.ones(3, 3), 0), "0"),
        (lambda: energy_captured(torch.ones(0), 1), "tensor([])"),
        (lambda: energy_captured(torch.ones(3), -1), "-1"),
        (lambda: effective_rank(torch.ones(3), 1.5), "1.5"),
        (lambda: subspace_share(torch.ones(4, 2), torch.ones(5, 2), 1), "(5, 2)"),
    ],
)
def test_bad_arguments(call, shown):
    with pytest.raises(ValueError) as info:
        call()
    assert shown in str(info.value)


def test_doctests():
    result = doctest.testmod(lorakit.lowrank)
    assert result.attempted > 0 and result.failed == 0
