"""Issue 12: the Dirichlet closed forms the estimator is checked against, in float64 whatever
comes in.  The truth is the same formula in Python's double-precision ``math.lgamma``; the
tolerance is float64 round-off, a few hundred ulps of the largest term."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models import dirichlet

EPS = np.finfo(np.float64).eps


def truth(alpha, counts) -> float:
    A, n = sum(alpha), sum(counts)
    return (math.lgamma(A) - math.lgamma(A + n)
            + sum(math.lgamma(a + c) - math.lgamma(a) for a, c in zip(alpha, counts)))


def tol(alpha, counts) -> float:
    return 256 * EPS * max(abs(math.lgamma(sum(alpha) + sum(counts))), 1.0)


ALPHA = [1.0, 2.0, 0.5]


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32, torch.float64])
def test_log_evidence_from_counts_of_any_dtype(dtype):
    c = [20, 12, 8]
    got = dirichlet.log_evidence_from_counts(torch.tensor(ALPHA), torch.tensor([c], dtype=dtype))
    assert got.dtype == torch.float64 and got.shape == (1,)
    assert abs(float(got[0]) - truth(ALPHA, c)) < tol(ALPHA, c)


def test_log_evidence_float32_with_a_million_symbols():
    c = [500_000, 300_000, 200_000]
    x = torch.cat([torch.full((k,), j) for j, k in enumerate(c)])
    a32 = torch.tensor(ALPHA, dtype=torch.float32)
    t = truth(ALPHA, c)
    got = dirichlet.log_evidence(a32, x)
    assert got.dtype == torch.float64
    assert abs(float(got) - t) < tol(ALPHA, c)
    got = dirichlet.log_evidence_from_counts(a32, torch.tensor(c, dtype=torch.float32))
    assert abs(float(got) - t) < tol(ALPHA, c)
    # a symmetric scalar prior too
    got = dirichlet.log_evidence(0.5, x, num_categories=3)
    assert abs(float(got) - truth([0.5] * 3, c)) < tol([0.5] * 3, c)
