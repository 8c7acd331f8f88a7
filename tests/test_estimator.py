"""The importance-weighted estimator is exact where the truth is known.

Tolerances come from the estimator's own Monte Carlo error, never from magic constants:

* the standard error of ``log p_hat_K`` by the delta method, from the effective sample size,
  ``se = sqrt(1/ESS - 1/K)`` (the relative variance of the mean weight), valid because every
  guide below is wider than its target so the weights have finite variance;
* the standard error of the ELBO, ``std(log w) / sqrt(K)``, from raw log weights;
* across-replicate standard errors where two estimators are compared.

Where the guide is the exact posterior every log weight equals the truth, so the only slack is
float32 round-off.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from inference.importance import estimate_log_marginal, log_weights, probe
from models import dirichlet
from models.common import GenlabError
from models.vae import VAE

Z = 5.0  # standard errors allowed (two-sided)
Z_RISE = 4.0  # standard errors by which a one-sided increase must be clear


def seed(s: int = 0) -> None:
    pyro.set_rng_seed(s)
    pyro.clear_param_store()


def delta_se(est) -> np.ndarray:
    """Standard error of ``log_marginal`` per value, from the ESS (delta method)."""
    return np.sqrt(np.maximum(1.0 / est.ess - 1.0 / est.num_samples, 0.0))


def raw_log_weights(model, guide, *args, num_samples, data_plate="data", **kwargs):
    """The estimator's own log weights, ``(K, N)`` or ``(K,)``, as float64 numpy."""
    st = probe(model, guide, args, kwargs, data_plate, None)
    with torch.no_grad():
        lw = log_weights(model, guide, args, kwargs, num_samples, st, data_plate)
    return lw.double().numpy()


# ============================================================================ a. Dirichlet
ALPHA = torch.tensor([1.0, 2.0, 0.5])
# 40 symbols (not 3, so no argument is mistaken for the data): counts 20, 12, 8
XS = torch.tensor([0] * 20 + [1] * 12 + [2] * 8)
XS = XS[torch.randperm(40, generator=torch.Generator().manual_seed(1))]


def test_dirichlet_closed_forms():
    c = dirichlet.counts(XS, 3)
    assert c.tolist() == [20.0, 12.0, 8.0]
    post = dirichlet.posterior_concentration(ALPHA, c)
    assert torch.allclose(post, ALPHA + c)
    pred = dirichlet.posterior_predictive(ALPHA, c)
    assert torch.allclose(pred, (ALPHA + c) / (ALPHA.sum() + 40)) and abs(float(pred.sum()) - 1) < 1e-6
    # the ordered-sequence evidence by the chain rule of predictive probabilities
    a64, chain, cnt = ALPHA.double(), 0.0, torch.zeros(3, dtype=torch.float64)
    for s in XS.tolist():
        chain += math.log(float((a64[s] + cnt[s]) / (a64.sum() + cnt.sum())))
        cnt[s] += 1
    assert abs(float(dirichlet.log_evidence(a64, XS)) - chain) < 1e-9
    # a symmetric scalar prior needs num_categories
    assert torch.allclose(
        dirichlet.log_evidence(0.7, XS, num_categories=3),
        dirichlet.log_evidence(torch.full((3,), 0.7), XS),
    )
    assert float(dirichlet.kl_dirichlet(post, post)) == pytest.approx(0.0, abs=1e-6)
    assert float(dirichlet.kl_dirichlet(ALPHA, post)) > 0


@pytest.mark.parametrize(
    "call",
    [
        lambda: dirichlet.log_evidence(torch.tensor([1.0, 0.0, 1.0]), XS),
        lambda: dirichlet.log_evidence(torch.tensor([1.0, 1.0]), XS),
        lambda: dirichlet.log_evidence(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0, -1])),
        lambda: dirichlet.log_evidence(1.0, XS),
        lambda: dirichlet.model(XS, torch.tensor([1.0, -2.0, 1.0])),
        lambda: dirichlet.guide(XS, ALPHA, concentration=torch.tensor([1.0, 0.0, 1.0])),
    ],
)
def test_dirichlet_refuses_bad_input(call):
    with pytest.raises(GenlabError):
        call()


def test_dirichlet_joint_estimate_converges_to_evidence():
    seed(0)
    c = dirichlet.counts(XS, 3)
    beta = ALPHA + c / 2 + 1  # not the posterior (alpha + c), but wider: bounded weights
    truth = float(dirichlet.log_evidence(ALPHA.double(), XS))
    K = 20000
    ks = (1, 10, 100, 1000)
    est = estimate_log_marginal(
        dirichlet.model, dirichlet.guide, XS, ALPHA, concentration=beta, num_samples=K, ks=ks
    )
    assert est.per_datapoint is False and est.n == 1
    assert "'p'" in est.summed and "outside plate 'data'" in est.summed
    assert est.scaled_sites == []

    se = float(delta_se(est)[0])
    assert 0 < se < 0.05
    assert abs(float(est.log_marginal[0]) - truth) < Z * se + se**2  # bias is O(se^2)

    # ELBO: below the truth, and equal to truth - KL(q || posterior) within its own SE
    lw = raw_log_weights(dirichlet.model, dirichlet.guide, XS, ALPHA, concentration=beta,
                         num_samples=K)
    se_elbo = lw.std() / math.sqrt(K)
    kl = float(dirichlet.kl_dirichlet(beta.double(), ALPHA.double() + c.double()))
    assert kl > 10 * se_elbo
    assert abs(float(est.elbo[0]) - (truth - kl)) < Z * se_elbo
    assert float(est.elbo[0]) < truth - Z * se_elbo

    # IWAE at k rises towards the truth as k grows (the k = 1 value is the ELBO)
    assert float(est.iwae[1][0]) == pytest.approx(float(est.elbo[0]), abs=1e-9)
    gaps = [truth - float(est.iwae[k][0]) for k in ks]
    assert gaps[0] > gaps[1] > gaps[2] > 0
    # iwae[1000] averages K / 1000 groups, each with sd about se * sqrt(K / 1000): its SE is
    # about se again, and its bias about half the squared sd of one group
    se_1000 = se * math.sqrt(K / 1000)
    assert abs(gaps[3]) < Z * se + se_1000**2
    assert abs(truth - float(est.log_marginal[0])) < gaps[1]


def test_dirichlet_exact_posterior_guide_has_zero_variance():
    seed(0)
    post = dirichlet.posterior_concentration(ALPHA, dirichlet.counts(XS, 3))
    truth = float(dirichlet.log_evidence(ALPHA.double(), XS))
    K = 500
    est = estimate_log_marginal(
        dirichlet.model, dirichlet.guide, XS, ALPHA, concentration=post, num_samples=K, ks=(1, 10)
    )
    lw = raw_log_weights(dirichlet.model, dirichlet.guide, XS, ALPHA, concentration=post,
                         num_samples=K)
    assert np.abs(lw - truth).max() < 1e-4
    for v in (est.log_marginal, est.elbo, est.iwae[1], est.iwae[10], est.iwae[K]):
        assert abs(float(v[0]) - truth) < 1e-4
    assert est.khat.tolist() == [-1.0]
    assert est.ess.tolist() == [float(K)]


def test_dirichlet_learnable_guide_starts_at_the_prior():
    seed(0)
    est = estimate_log_marginal(dirichlet.model, dirichlet.guide, XS, ALPHA, num_samples=2000)
    assert torch.equal(pyro.param("concentration").detach(), ALPHA)
    # the prior as proposal is a valid (if poor) importance sampler: below or near the truth
    truth = float(dirichlet.log_evidence(ALPHA.double(), XS))
    assert float(est.elbo[0]) < float(est.log_marginal[0]) < truth + Z * float(delta_se(est)[0])


# ============================================================================ b, h. PPCA
D, L, S = 5, 2, 0.5
_g = torch.Generator().manual_seed(2)
W_PPCA = torch.randn(D, L, generator=_g)
B_PPCA = torch.randn(D, generator=_g)


def ppca_posterior(x):
    """Exact q(z | x): mean (N, L) and covariance (L, L)."""
    prec = torch.eye(L) + W_PPCA.T @ W_PPCA / S**2
    cov = torch.linalg.inv(prec)
    mean = (x - B_PPCA) @ W_PPCA @ cov / S**2  # cov symmetric
    return mean, cov


def ppca_truth(x) -> np.ndarray:
    cov = (W_PPCA @ W_PPCA.T + S**2 * torch.eye(D)).double()
    return dist.MultivariateNormal(B_PPCA.double(), cov).log_prob(x.double()).numpy()


def make_ppca(plate: str = "data", mean_factor: float = 0.8, scale_factor: float = 1.3):
    """PPCA model and an amortized linear-Gaussian guide (exact when both factors are 1)."""

    def model(x):
        n = x.shape[0]
        with pyro.plate(plate, n):
            z = pyro.sample("z", dist.Normal(x.new_zeros(n, L), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W_PPCA.T + B_PPCA, S).to_event(1), obs=x)

    def guide(x):
        mean, cov = ppca_posterior(x)
        tril = scale_factor * torch.linalg.cholesky(cov)
        with pyro.plate(plate, x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(mean_factor * mean, scale_tril=tril))

    return model, guide


def ppca_data(n: int, s: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(s)
    z = torch.randn(n, L, generator=g)
    return z @ W_PPCA.T + B_PPCA + S * torch.randn(n, D, generator=g)


def test_ppca_per_datapoint_matches_exact_marginal():
    seed(0)
    x = ppca_data(60)
    truth = ppca_truth(x)
    model, guide = make_ppca()
    K = 2000
    ks = (1, 10, 100, 1000)
    est = estimate_log_marginal(model, guide, x, num_samples=K, ks=ks)
    assert est.per_datapoint is True and est.n == 60
    assert est.log_marginal.shape == est.elbo.shape == est.khat.shape == est.ess.shape == (60,)
    assert all(v.shape == (60,) for v in est.iwae.values())

    se = delta_se(est)
    assert (se > 0).all() and (se < 0.1).all()
    assert (np.abs(est.log_marginal - truth) < Z * se + se**2).all()

    # ELBO below the truth for every datapoint, by more than its own standard error
    lw = raw_log_weights(model, guide, x, num_samples=K)
    se_elbo = lw.std(0) / math.sqrt(K)
    assert (est.elbo < truth - Z * se_elbo).all()
    assert (est.log_marginal >= est.elbo).all()  # Jensen, on the same draws

    # mean IWAE rises with k; paired differences on the same draws, SE across datapoints
    means = [est.iwae[k].mean() for k in ks]
    for k1, k2 in [(1, 10), (10, 100), (1, 1000)]:
        d = est.iwae[k2] - est.iwae[k1]
        assert d.mean() > Z_RISE * d.std(ddof=1) / math.sqrt(d.size), (k1, k2, means)
    # and approaches the truth from below: the k = 1 gap dwarfs the k = K error
    gap1 = (truth - est.iwae[1]).mean()
    errK = est.log_marginal - truth
    se_mean = math.sqrt((se**2).sum()) / se.size  # independent datapoints
    assert abs(errK.mean()) < Z * se_mean + (se**2).mean()
    assert gap1 > 10 * (abs(errK.mean()) + se_mean)
    s = est.summary()
    assert s["n"] == 60 and s["gap"]["mean"] > 0 and s["per_datapoint"] is True


def test_ppca_exact_posterior_guide_has_zero_variance():
    seed(0)
    x = ppca_data(10)
    truth = ppca_truth(x)
    model, guide = make_ppca(mean_factor=1.0, scale_factor=1.0)
    K = 300
    est = estimate_log_marginal(model, guide, x, num_samples=K, ks=(1, 10))
    lw = raw_log_weights(model, guide, x, num_samples=K)
    assert np.abs(lw - truth).max() < 1e-4
    for v in (est.log_marginal, est.elbo, est.iwae[1], est.iwae[10]):
        assert np.abs(v - truth).max() < 1e-4
    assert (est.khat == -1.0).all()
    assert (est.ess == K).all()


def test_renamed_plate_gives_a_joint_estimate_of_the_total():
    seed(0)
    x = ppca_data(3, s=4)
    truth = float(ppca_truth(x).sum())
    model, guide = make_ppca(plate="obs", mean_factor=0.9, scale_factor=1.2)
    est = estimate_log_marginal(model, guide, x, num_samples=8000)
    assert est.per_datapoint is False and est.n == 1
    assert "outside plate 'data'" in est.summed and "'z'" in est.summed and "'x'" in est.summed
    se = float(delta_se(est)[0])
    assert 0 < se < 0.1
    assert abs(float(est.log_marginal[0]) - truth) < Z * se + se**2
    # naming the plate makes it per datapoint again, and the parts add up to the joint value
    per = estimate_log_marginal(model, guide, x, num_samples=8000, data_plate="obs")
    assert per.per_datapoint is True and per.n == 3
    se_per = delta_se(per)
    assert (np.abs(per.log_marginal - ppca_truth(x)) < Z * se_per + se_per**2).all()


def test_extra_tensor_arguments_of_another_size():
    """A per-datapoint model with a parameter tensor whose first dimension is not N."""
    seed(0)
    x = ppca_data(4)

    def model(x, W, b):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], L), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + b, S).to_event(1), obs=x)

    _, exact = make_ppca(mean_factor=1.0, scale_factor=1.0)
    est = estimate_log_marginal(model, lambda x, W, b: exact(x), x, W_PPCA, B_PPCA,
                                num_samples=50)
    assert est.per_datapoint is True
    assert np.abs(est.log_marginal - ppca_truth(x)).max() < 1e-4


# ============================================================================ c. Bernoulli pixels
PIX = 20
_g = torch.Generator().manual_seed(5)
A_PIX = 1.5 * torch.randn(PIX, generator=_g)
C_PIX = 0.5 * torch.randn(PIX, generator=_g)


def pixel_model(x, loc, scale):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
        logits = z.unsqueeze(-1) * A_PIX + C_PIX
        pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


def pixel_guide(x, loc, scale):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, scale))


def pixel_quadrature(x):
    """Exact log p(x), posterior mean and sd by the trapezoid rule on a dense float64 grid."""
    z = torch.linspace(-12, 12, 24001, dtype=torch.float64)
    logits = z[:, None, None] * A_PIX.double() + C_PIX.double()  # (G, 1, D)
    lik = dist.Bernoulli(logits=logits).log_prob(x.double()).sum(-1)  # (G, N)
    lj = dist.Normal(0.0, 1.0).log_prob(z)[:, None] + lik
    m = lj.max(0).values
    dens = torch.exp(lj - m)
    dz = z[1] - z[0]
    area = torch.trapezoid(dens, dx=dz, dim=0)
    logp = m + torch.log(area)
    mean = torch.trapezoid(dens * z[:, None], dx=dz, dim=0) / area
    var = torch.trapezoid(dens * (z[:, None] - mean) ** 2, dx=dz, dim=0) / area
    return logp.numpy(), mean.float(), var.sqrt().float()


def test_bernoulli_pixels_match_quadrature():
    seed(0)
    g = torch.Generator().manual_seed(6)
    ztrue = torch.randn(30, generator=g)
    x = torch.bernoulli(torch.sigmoid(ztrue[:, None] * A_PIX + C_PIX), generator=g)
    truth, mean, sd = pixel_quadrature(x)
    # an imperfect guide: shifted by half a posterior sd, and wider than the prior, so the
    # weights N(z; 0, 1) lik / q are bounded and their variance finite
    loc, scale = mean + 0.5 * sd, torch.full_like(mean, 1.2)
    K = 3000
    est = estimate_log_marginal(pixel_model, pixel_guide, x, loc, scale, num_samples=K)
    assert est.per_datapoint is True and est.n == 30
    se = delta_se(est)
    assert (se > 0).all() and (se < 0.2).all()
    assert (np.abs(est.log_marginal - truth) < Z * se + se**2).all()
    assert (est.elbo < truth).all()


# ============================================================================ d. against Pyro
def test_vae_matches_pyro_renyi_elbo():
    """Mean per-datapoint IWAE equals Pyro's RenyiELBO(alpha=0) / N.

    Pyro's RenyiELBO sums log-probabilities over every plate that is not shared by all sites
    before the log-sum-exp over particles; it is per datapoint here only because both sites
    ("z" and "x") share the data plate, and only because the batch is not subsampled (Pyro's
    log-probabilities would carry the N / B scale inside the log-sum-exp).
    """
    seed(0)
    torch.manual_seed(0)
    vae = VAE(x_dim=20, latent_dim=2, hidden=(8,))
    x = torch.bernoulli(torch.full((6, 20), 0.3), generator=torch.Generator().manual_seed(7))
    N, K, R = x.shape[0], 200, 8
    renyi = pyro.infer.RenyiELBO(
        alpha=0, num_particles=K, vectorize_particles=True, max_plate_nesting=1
    )
    ours, theirs = [], []
    for r in range(R):
        pyro.set_rng_seed(100 + r)
        ours.append(float(estimate_log_marginal(vae.model, vae.guide, x, num_samples=K)
                          .log_marginal.mean()))
        pyro.set_rng_seed(200 + r)
        theirs.append(-renyi.loss(vae.model, vae.guide, x) / N)
    ours, theirs = np.array(ours), np.array(theirs)
    se = math.sqrt(ours.var(ddof=1) / R + theirs.var(ddof=1) / R)
    assert se > 0
    assert abs(ours.mean() - theirs.mean()) < Z * se


# ============================================================================ e. scale factors
def test_scale_factors_never_enter_the_estimate():
    seed(0)
    torch.manual_seed(0)
    vae = VAE(x_dim=20, latent_dim=2, hidden=(8,))
    x = torch.bernoulli(torch.full((5, 20), 0.4), generator=torch.Generator().manual_seed(8))
    K, ks = 64, (1, 8)

    def run(model, guide, **kw):
        pyro.set_rng_seed(11)
        return estimate_log_marginal(model, guide, x, num_samples=K, ks=ks, **kw)

    base = run(vae.model, vae.guide)
    scaled = run(poutine.scale(vae.model, scale=7.0), poutine.scale(vae.guide, scale=7.0))
    sub = run(vae.model, vae.guide, data_size=50)  # a subsampling plate: scale 50 / 5
    assert base.scaled_sites == []
    assert scaled.scaled_sites == ["x", "z"] and sub.scaled_sites == ["x", "z"]
    for other in (scaled, sub):
        assert other.per_datapoint is True
        np.testing.assert_array_equal(other.log_marginal, base.log_marginal)
        np.testing.assert_array_equal(other.elbo, base.elbo)
        np.testing.assert_array_equal(other.ess, base.ess)
        np.testing.assert_array_equal(other.khat, base.khat)
        for k in base.iwae:
            np.testing.assert_array_equal(other.iwae[k], base.iwae[k])

    # a global site too: the scaled Dirichlet pair gives the same joint value
    c = dirichlet.counts(XS, 3)
    beta = ALPHA + c / 2 + 1
    pyro.set_rng_seed(12)
    d0 = estimate_log_marginal(dirichlet.model, dirichlet.guide, XS, ALPHA, concentration=beta,
                               num_samples=K)
    pyro.set_rng_seed(12)
    d7 = estimate_log_marginal(poutine.scale(dirichlet.model, scale=7.0),
                               poutine.scale(dirichlet.guide, scale=7.0), XS, ALPHA,
                               concentration=beta, num_samples=K)
    np.testing.assert_array_equal(d7.log_marginal, d0.log_marginal)
    assert d7.scaled_sites == ["p", "x"] and d0.scaled_sites == []


# ============================================================================ f. refusals
def _mixture_model(x):
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Categorical(logits=x.new_zeros(x.shape[0], 3)))
        pyro.sample("x", dist.Normal(c.to(x.dtype), 1.0), obs=x)


def test_enumerated_guide_site_is_refused():
    seed(0)
    x = torch.randn(4)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Categorical(logits=x.new_zeros(x.shape[0], 3)),
                        infer={"enumerate": "parallel"})

    with pytest.raises(GenlabError, match="enumerated"):
        estimate_log_marginal(_mixture_model, guide, x, num_samples=10)


def test_latent_missing_from_guide_is_refused():
    seed(0)
    x = torch.randn(4)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            w = pyro.sample("w", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z + w, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))

    with pytest.raises(GenlabError, match="'w'"):
        estimate_log_marginal(model, guide, x, num_samples=10)


# ============================================================================ g. chunking
def test_chunking_is_invisible_but_for_the_draws():
    seed(0)
    x = ppca_data(4)
    model, guide = make_ppca()
    K = 32
    pyro.set_rng_seed(21)
    big = estimate_log_marginal(model, guide, x, num_samples=K, ks=(1, 8))
    pyro.set_rng_seed(21)
    # memory=1 byte: one particle of one datapoint per chunk (K * N model runs)
    tiny = estimate_log_marginal(model, guide, x, num_samples=K, ks=(1, 8), memory=1)
    assert tiny.per_datapoint is True and tiny.num_samples == K
    for a, b in [(big.log_marginal, tiny.log_marginal), (big.elbo, tiny.elbo),
                 (big.khat, tiny.khat), (big.ess, tiny.ess)]:
        assert a.shape == b.shape == (4,)
    assert set(tiny.iwae) == set(big.iwae) == {1, 8, K}
    se = np.sqrt(delta_se(big) ** 2 + delta_se(tiny) ** 2)
    assert (np.abs(big.log_marginal - tiny.log_marginal) < Z * se).all()
    d = big.log_marginal - tiny.log_marginal
    assert abs(d.mean()) < Z * math.sqrt((se**2).sum()) / d.size
    # issue 16: the draws are fixed per block of datapoints, whatever the memory budget
    assert np.array_equal(big.log_marginal, tiny.log_marginal)
    # the exact guide is deterministic: chunked or not, every value is the truth
    exact_model, exact_guide = make_ppca(mean_factor=1.0, scale_factor=1.0)
    ex = estimate_log_marginal(exact_model, exact_guide, x, num_samples=8, memory=1)
    assert np.abs(ex.log_marginal - ppca_truth(x)).max() < 1e-4


def test_zero_samples_or_bad_k_are_refused():
    seed(0)
    x = ppca_data(3)
    model, guide = make_ppca()
    with pytest.raises(GenlabError, match="at least 1"):
        estimate_log_marginal(model, guide, x, num_samples=0)
    with pytest.raises(GenlabError):
        estimate_log_marginal(model, guide, x, num_samples=10, ks=(20,))
