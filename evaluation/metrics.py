r"""Generic metrics: KL and cross-entropy of categorical predictions, and the rank statistics of
simulation-based calibration (SBC; Talts, Betancourt, Simpson, Vehtari & Gelman 2018).

SBC: draw :math:`\theta^* \sim p(\theta)`, data :math:`y \sim p(y \mid \theta^*)`, then L draws
:math:`\theta_1..\theta_L` from the (approximate) posterior given :math:`y`.  The rank
:math:`r = \#\{l : \theta_l < \theta^*\} \in \{0..L\}` of each scalar component is uniform on
:math:`\{0..L\}` exactly when the posterior is correct (for the law of the data).  Uniformity is
tested per component with Pearson's chi-square on ``bins`` equal groups of rank values (L + 1
must be divisible by ``bins``, so each group has expected count R / bins), and the components
are combined by Bonferroni: :math:`p = \min(1, D \min_d p_d)`, valid however the components
depend on each other (e.g. the entries of a probability vector).
"""

from __future__ import annotations

import numpy as np
import torch

from models.common import GenlabError


def categorical_kl(p, log_q) -> torch.Tensor:
    """KL(p || q) over the last dim, with 0 log 0 = 0; ``p`` probabilities, ``log_q`` log-probs."""
    p = torch.as_tensor(p)
    log_q = torch.as_tensor(log_q, dtype=p.dtype)
    if p.shape[-1] != log_q.shape[-1]:
        raise GenlabError(f"p and q need the same number of categories, got {p.shape[-1]} and "
                          f"{log_q.shape[-1]}")
    pos = p > 0
    terms = torch.where(pos, p * (torch.log(torch.where(pos, p, torch.ones_like(p))) - log_q),
                        torch.zeros_like(p))
    return terms.sum(-1)


def cross_entropy(log_q, target) -> torch.Tensor:
    """-log q(target) for integer targets; ``log_q`` ``(..., C)``, ``target`` ``(...)``."""
    log_q = torch.as_tensor(log_q)
    target = torch.as_tensor(target).long()
    return -log_q.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def sbc_ranks(truth, draws) -> np.ndarray:
    """Ranks ``(R, D)`` of ``truth`` ``(R, D)`` among ``draws`` ``(R, L, D)``: #draws below."""
    truth = np.asarray(truth, dtype=float)
    draws = np.asarray(draws, dtype=float)
    if draws.ndim != 3 or truth.shape != (draws.shape[0], draws.shape[2]):
        raise GenlabError(f"SBC needs truth (R, D) and draws (R, L, D), got {truth.shape} and "
                          f"{draws.shape}")
    return (draws < truth[:, None, :]).sum(1)


def rank_uniformity(ranks, num_draws: int, bins: int = 10) -> dict:
    """Chi-square test that ranks ``(R, D)`` in ``0..num_draws`` are uniform (module docstring).

    Returns ``counts`` ``(bins, D)``, ``expected`` (per bin), ``chi2`` and ``pvalue`` ``(D,)``,
    and ``pvalue_bonferroni`` (one number).
    """
    from scipy import stats  # heavy; only the uniformity test needs it (arviz brings scipy)

    ranks = np.asarray(ranks)
    if ranks.ndim == 1:
        ranks = ranks[:, None]
    L1 = int(num_draws) + 1
    if bins < 2 or L1 % bins:
        raise GenlabError(f"the number of rank values ({L1} = draws + 1) must be divisible by the "
                          f"number of bins ({bins})")
    if ranks.min() < 0 or ranks.max() > num_draws:
        raise GenlabError(f"ranks must lie in 0..{num_draws}")
    group = ranks // (L1 // bins)
    counts = np.stack([np.bincount(group[:, d], minlength=bins) for d in range(ranks.shape[1])], 1)
    expected = ranks.shape[0] / bins
    chi2 = ((counts - expected) ** 2 / expected).sum(0)
    pvalue = stats.chi2.sf(chi2, bins - 1)
    return dict(counts=counts, expected=expected, chi2=chi2, pvalue=pvalue,
                pvalue_bonferroni=float(min(1.0, pvalue.min() * pvalue.size)),
                replications=int(ranks.shape[0]), draws=int(num_draws), bins=int(bins))


# ----------------------------------------------------------------------------- calibration
def central_coverage(pit, levels=(0.5, 0.9, 0.95)) -> np.ndarray:
    r"""Empirical coverage of central predictive intervals, one value per nominal level.

    ``pit`` holds :math:`F_i(y_i)`, each test response's predictive CDF value.  For a continuous
    predictive, :math:`y_i` lies in the central interval of level :math:`p` exactly when
    :math:`(1-p)/2 \le F_i(y_i) \le (1+p)/2`, so coverage needs no quantile function (and works
    for mixture predictives).
    """
    pit = np.asarray(pit, dtype=float).reshape(-1)
    levels = np.asarray(levels, dtype=float).reshape(-1)
    if pit.size == 0 or not np.all((pit >= 0) & (pit <= 1)):
        raise GenlabError("PIT values must be a non-empty array of numbers in [0, 1]")
    if not np.all((levels > 0) & (levels < 1)):
        raise GenlabError(f"coverage levels must lie in (0, 1), got {levels.tolist()}")
    lo, hi = (1 - levels) / 2, (1 + levels) / 2
    return ((pit[:, None] >= lo) & (pit[:, None] <= hi)).mean(0)


def pit_histogram(pit, bins: int = 10) -> np.ndarray:
    """Counts of PIT values in ``bins`` equal bins of [0, 1] (flat for a calibrated predictive)."""
    pit = np.asarray(pit, dtype=float).reshape(-1)
    if bins < 1:
        raise GenlabError(f"the PIT histogram needs at least one bin, got {bins}")
    return np.histogram(np.clip(pit, 0, 1), bins=bins, range=(0.0, 1.0))[0]
