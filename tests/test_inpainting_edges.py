"""Issue 12: in-painting holes at the end of the image (an RNN refuses an empty sequence).

The truth is log p(x_o) by brute force: the exact log-probability of every completion of the
missing pixels under the GRU, summed; importance estimates must lie within Z standard errors
(delta method from their ESS) of it.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from evaluation import inpainting as IP
from models.pixelrnn import PixelGRU

Z = 5.0
T = 12


def gru_and_images():
    torch.manual_seed(0)
    gru = PixelGRU(x_dim=T, hidden=6, head=(6,))
    x = torch.bernoulli(torch.full((3, T), 0.5), generator=torch.Generator().manual_seed(2))
    return gru, x


def brute_force(gru, x, hole) -> np.ndarray:
    out = []
    with torch.no_grad():
        for img in x:
            cands = []
            for bits in itertools.product((0.0, 1.0), repeat=len(hole)):
                c = img.clone()
                c[list(hole)] = torch.tensor(bits)
                cands.append(c)
            lp = gru.log_prob(torch.stack(cands)).double()
            out.append(float(torch.logsumexp(lp, 0)))
    return np.array(out)


def mask(hole) -> torch.Tensor:
    m = torch.zeros(T, dtype=torch.bool)
    m[list(hole)] = True
    return m


@pytest.mark.parametrize("hole", [(T - 1,), (T - 2, T - 1), (T - 4, T - 1), (0, T - 1)])
def test_exact_inpainting_with_the_last_pixel_missing(hole):
    gru, x = gru_and_images()
    r = IP.exact_inpaint(gru, x, mask(hole))
    truth = brute_force(gru, x, hole)
    assert np.abs(r.log_marginal - truth).max() < 1e-4  # float32 GRU, float64 sums


@pytest.mark.parametrize("smc", [False, True])
@pytest.mark.parametrize("hole", [(T - 2,), (T - 5, T - 2), (T - 2, T - 1)])
def test_importance_inpainting_with_the_hole_ending_at_the_image_end(hole, smc):
    gru, x = gru_and_images()
    K = 4000
    r = IP.importance_inpaint(gru, x, mask(hole), num_particles=K, smc=smc,
                              generator=torch.Generator().manual_seed(1))
    truth = brute_force(gru, x, hole)
    se = np.sqrt(np.maximum(1 / r.ess - 1 / K, 0))
    assert (np.abs(r.log_marginal - truth) < Z * se + se**2 + 1e-4).all()
    # the exact in-painter agrees on the same hole
    assert np.abs(IP.exact_inpaint(gru, x, mask(hole)).log_marginal - truth).max() < 1e-4
