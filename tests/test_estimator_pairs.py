"""Issue 12: the estimator on model/guide pairs written outside genlab, never silently wrong.

Every value is compared with an exact one (closed form, quadrature or enumeration) within
``Z`` standard errors of the estimator's own Monte Carlo error (``delta_se``: the delta method
from the ESS, valid because each guide is wider than its target); a guide that is the exact
posterior makes every log weight the truth, and then the only slack is float round-off.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

from inference.importance import estimate_log_marginal
from models.common import GenlabError

Z = 5.0  # standard errors allowed (two-sided)
S = 0.7  # observation noise of the normal-normal models
S0 = 1.5  # prior sd of the global mean


def delta_se(est) -> np.ndarray:
    return np.sqrt(np.maximum(1.0 / est.ess - 1.0 / est.num_samples, 0.0))


def close(est, truth) -> None:
    """Every value within Z standard errors (plus the O(se^2) bias) of the truth."""
    se = delta_se(est)
    err = np.abs(est.log_marginal - np.asarray(truth))
    assert (err < Z * se + se**2 + 1e-4).all(), (err, se)


def gen(n: int, s: int = 3, dtype=torch.float32) -> torch.Tensor:
    return (1.3 * torch.randn(n, generator=torch.Generator().manual_seed(s))).to(dtype)


# ---------------------------------------------------------------- per-datapoint normal-normal
# z_i ~ N(0, 1), x_i ~ N(z_i, S^2): p(x_i) = N(0, 1 + S^2); z_i | x_i ~ N(x_i / (1 + S^2), ...)
POST_SD = math.sqrt(S**2 / (1 + S**2))


def nn_truth(x) -> np.ndarray:
    scale = torch.tensor(math.sqrt(1 + S**2), dtype=torch.float64)
    return dist.Normal(0.0, scale).log_prob(x.double()).numpy()


def nn_post_mean(x):
    return x / (1 + S**2)


# ---------------------------------------------------------------- global-mean normal-normal
# mu ~ N(0, S0^2), x_i ~ N(mu, S^2): x ~ MVN(0, S^2 I + S0^2 11')
def global_truth(x) -> float:
    x = x.double().reshape(-1)
    cov = S**2 * torch.eye(x.numel(), dtype=torch.float64) + S0**2
    return float(dist.MultivariateNormal(torch.zeros_like(x), cov).log_prob(x))


def global_post(x):
    prec = 1 / S0**2 + x.numel() / S**2
    return float(x.sum()) / S**2 / prec, math.sqrt(1 / prec)


# ============================================================================ 1. point masses
def _global_model(x):
    mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), S0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(mu, S), obs=x)


def test_autodelta_is_refused():
    x = gen(6)
    guide = AutoDelta(_global_model)
    with pytest.raises(GenlabError, match=r"guide site 'mu' is a point mass .* no importance proposal"):
        estimate_log_marginal(_global_model, guide, x, num_samples=20)


def test_hand_written_delta_guide_is_refused_even_at_the_posterior_mean():
    x = gen(6)
    m, _ = global_post(x)

    def guide(x):
        pyro.sample("mu", dist.Delta(torch.tensor(m)))

    with pytest.raises(GenlabError, match=r"point mass .* for a continuous latent"):
        estimate_log_marginal(_global_model, guide, x, num_samples=20)


def test_delta_on_a_discrete_latent_is_refused():
    x = gen(5)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(logits=x.new_zeros(x.shape[0], 3)))
            pyro.sample("x", dist.Normal(c.to(x.dtype), 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Delta(torch.ones(x.shape[0])))

    with pytest.raises(GenlabError, match=r"point mass \(Delta\) on a discrete latent"):
        estimate_log_marginal(model, guide, x, num_samples=20)


def test_deterministic_sites_are_skipped():
    """pyro.deterministic in model and guide (a Delta that is observed) carries no probability."""
    x = gen(7)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            pyro.deterministic("z2", z**2)
            pyro.sample("x", dist.Normal(z, S), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.deterministic("m", nn_post_mean(x))
            pyro.sample("z", dist.Normal(nn_post_mean(x), POST_SD))

    est = estimate_log_marginal(model, guide, x, num_samples=30)
    assert est.per_datapoint and np.abs(est.log_marginal - nn_truth(x)).max() < 1e-4


# ============================================================================ 2. random subsampling plates
def _sub_pair(n: int, b: int, per_datapoint_param: bool = False, exact: bool = True):
    """A plate that draws b of n datapoints at random; the model indexes the full data."""
    sd = POST_SD if exact else 1.3 * POST_SD

    def model(x):
        with pyro.plate("data", n, subsample_size=b) as ind:
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(ind)), 1.0))
            pyro.sample("x", dist.Normal(z, S), obs=x[ind])

    def guide(x):
        if per_datapoint_param:
            # a non-amortized guide: one pyro.param row per datapoint, sliced by the plate
            loc = pyro.param("loc", lambda: nn_post_mean(x) + (0.0 if exact else 0.3))
        with pyro.plate("data", n, subsample_size=b) as ind:
            mean = loc[ind] if per_datapoint_param else nn_post_mean(x[ind]) + (0 if exact else 0.3)
            pyro.sample("z", dist.Normal(mean, sd))

    return model, guide


@pytest.mark.parametrize("per_param", [False, True])
def test_random_subsample_plate_evaluates_every_datapoint_in_order(per_param):
    """The exact guide makes each log weight that datapoint's truth: any datapoint evaluated
    twice, missed, or mixed with another across chunks shows up exactly."""
    n, b = 11, 4  # 11 = 4 + 4 + 3: the last block is moved left and its overlap dropped
    x = gen(n)
    model, guide = _sub_pair(n, b, per_param)
    # memory 1: one particle per chunk, so K chunks of particles per block of datapoints
    est = estimate_log_marginal(model, guide, x, num_samples=6, memory=1)
    assert est.per_datapoint and est.n == n and est.mode == "index"
    assert np.abs(est.log_marginal - nn_truth(x)).max() < 1e-4


def test_random_subsample_plate_with_an_inexact_guide_matches_closed_form():
    n, b = 9, 4
    x = gen(n, s=4)
    model, guide = _sub_pair(n, b, exact=False)
    est = estimate_log_marginal(model, guide, x, num_samples=2000, memory=20000)
    assert est.n == n
    close(est, nn_truth(x))


def test_random_subsample_plate_with_a_global_latent_is_refused():
    n, b = 8, 3
    x = gen(n)

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, S0))
        with pyro.plate("data", n, subsample_size=b) as ind:
            pyro.sample("x", dist.Normal(mu, S), obs=x[ind])

    def guide(x):
        pyro.sample("mu", dist.Normal(0.0, S0))

    with pytest.raises(GenlabError, match=r"random subsample of 3 of its 8 datapoints .* joint"):
        estimate_log_marginal(model, guide, x, num_samples=10)


def test_random_subsample_of_another_plate_is_refused():
    x = gen(8)

    def model(x):
        with pyro.plate("obs", 8, subsample_size=3) as ind:
            z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0))
            pyro.sample("x", dist.Normal(z, S), obs=x[ind])

    def guide(x):
        with pyro.plate("obs", 8, subsample_size=3):
            pyro.sample("z", dist.Normal(torch.zeros(3), 1.0))

    with pytest.raises(GenlabError, match=r"plate 'obs' draws a random subsample"):
        estimate_log_marginal(model, guide, x, num_samples=10)
    est = estimate_log_marginal(model, guide, x, num_samples=2000, data_plate="obs")
    assert est.n == 8
    close(est, nn_truth(x))


# ============================================================================ 3. broadcasting without plates
def _plateless_model(x):
    mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), S0))
    pyro.sample("x", dist.Normal(mu, S), obs=x)  # batch shape (), log-prob (N,) by broadcasting


def _plateless_guide(x, widen: float = 1.4):
    m, sd = global_post(x)
    pyro.sample("mu", dist.Normal(x.new_tensor(m), widen * sd))


def test_model_without_plates_relying_on_broadcasting_k_equals_n():
    """N = 6 datapoints and K = 6 particles used to pair particles with datapoints silently;
    with the exact posterior as guide every log weight is the truth."""
    x = gen(6, dtype=torch.float64)
    est = estimate_log_marginal(_plateless_model, lambda x: _plateless_guide(x, 1.0), x,
                                num_samples=6)
    assert est.per_datapoint is False and est.n == 1
    assert abs(float(est.log_marginal[0]) - global_truth(x)) < 1e-9


def test_model_without_plates_relying_on_broadcasting():
    x = gen(6)
    est = estimate_log_marginal(_plateless_model, _plateless_guide, x, num_samples=500)
    assert est.per_datapoint is False and est.n == 1
    close(est, [global_truth(x)])


def test_hidden_dimension_with_the_same_size_as_the_particles():
    """Per-datapoint z without a plate: the log-probabilities (N,) are summed jointly."""
    x = gen(5, dtype=torch.float64)

    def model(x):
        z = pyro.sample("z", dist.Normal(x.new_zeros(5), 1.0))  # batch (5,), no plate
        pyro.sample("x", dist.Normal(z, S), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(nn_post_mean(x), POST_SD))

    est = estimate_log_marginal(model, guide, x, num_samples=5)
    assert est.n == 1 and abs(float(est.log_marginal[0]) - nn_truth(x).sum()) < 1e-9


# ============================================================================ 4. keyword data, per-datapoint params
# z_i ~ N(0, 1), x_i ~ N(z_i, S^2), y_i ~ N(z_i, S^2): (x_i, y_i) ~ MVN(0, S^2 I + 11')
def xy_truth(x, y) -> np.ndarray:
    cov = S**2 * torch.eye(2, dtype=torch.float64) + 1.0
    return dist.MultivariateNormal(torch.zeros(2, dtype=torch.float64), cov).log_prob(
        torch.stack([x, y], -1).double()).numpy()


def _xy_model(x, y):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
        pyro.sample("x", dist.Normal(z, S), obs=x)
        pyro.sample("y", dist.Normal(z, S), obs=y)


def _xy_guide(x, y):
    prec = 1 + 2 / S**2
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal((x + y) / S**2 / prec, 1.3 / math.sqrt(prec)))


@pytest.mark.parametrize("how", ["x, y=y", "x=x, y=y"])
def test_keyword_data_is_cut_like_positional_data(how):
    x, y = gen(10, 1), gen(10, 2)
    args, kw = ((x,), {"y": y}) if how == "x, y=y" else ((), {"x": x, "y": y})
    # a small memory budget forces chunks of datapoints, so the cutting matters
    est = estimate_log_marginal(_xy_model, _xy_guide, *args, num_samples=1500, memory=100000, **kw)
    assert est.per_datapoint and est.n == 10 and est.mode == "cut"
    close(est, xy_truth(x, y))


def test_per_datapoint_param_guide_matches_closed_form():
    """A non-amortized guide: pyro.param of shape (N,), which the estimator must not cut."""
    x = gen(12)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z, S), obs=x)

    def guide(x):
        loc = pyro.param("loc", nn_post_mean(x) - 0.2)
        scale = pyro.param("scale", torch.full((12,), 1.2 * POST_SD),
                           constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale))

    est = estimate_log_marginal(model, guide, x, num_samples=2000, memory=100000)
    assert est.per_datapoint and est.n == 12 and est.mode == "whole"
    close(est, nn_truth(x))
    assert pyro.param("loc").shape == (12,)


# ============================================================================ 5. plates off the first axis
D = 3  # x is (D, N): the data plate follows the second axis


def test_data_plate_on_the_second_axis_gives_per_datapoint_values():
    x = gen(D * 5).reshape(D, 5)

    def model(x):
        with pyro.plate("data", x.shape[1], dim=-1):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[1]), 1.0))
            with pyro.plate("feat", x.shape[0], dim=-2):
                pyro.sample("x", dist.Normal(z, S), obs=x)

    def guide(x):
        prec = 1 + D / S**2
        with pyro.plate("data", x.shape[1], dim=-1):
            pyro.sample("z", dist.Normal(x.sum(0) / S**2 / prec, 1.3 / math.sqrt(prec)))

    est = estimate_log_marginal(model, guide, x, num_samples=2000)
    assert est.per_datapoint and est.n == 5
    cov = S**2 * torch.eye(D, dtype=torch.float64) + 1.0
    truth = dist.MultivariateNormal(torch.zeros(D, dtype=torch.float64), cov).log_prob(
        x.T.double()).numpy()
    close(est, truth)


def test_data_plate_on_the_second_axis_with_a_global_latent_is_joint():
    x = gen(D * 4).reshape(D, 4)

    def model(x):
        mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), S0))
        with pyro.plate("data", x.shape[1], dim=-1), pyro.plate("feat", D, dim=-2):
            pyro.sample("x", dist.Normal(mu, S), obs=x)

    def guide(x):
        m, sd = global_post(x)
        pyro.sample("mu", dist.Normal(x.new_tensor(m), 1.4 * sd))

    est = estimate_log_marginal(model, guide, x, num_samples=2000)
    assert est.per_datapoint is False and est.n == 1
    close(est, [global_truth(x)])


# ============================================================================ 6. discrete latents
MU_MIX = torch.tensor([-2.0, 0.5, 3.0])
PI_MIX = torch.tensor([0.2, 0.5, 0.3])


def _mix_model(x):
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Categorical(probs=PI_MIX))
        pyro.sample("x", dist.Normal(MU_MIX[c], 1.0), obs=x)


def _mix_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("c", dist.Categorical(logits=torch.zeros(x.shape[0], 3)))


def test_discrete_guide_khat_is_undefined_not_inf():
    x = gen(8)
    truth = torch.logsumexp(PI_MIX.double().log() + dist.Normal(MU_MIX.double(), 1.0)
                            .log_prob(x.double()[:, None]), -1).numpy()  # enumeration
    est = estimate_log_marginal(_mix_model, _mix_guide, x, num_samples=3000)
    close(est, truth)
    assert np.isnan(est.khat).all()
    s = est.summary()
    assert s["khat_gt_0.7"] == 0.0 and s["khat_gt_0.5"] == 0.0 and s["khat_undefined"] == 1.0
    np.testing.assert_array_equal(est.log_marginal_psis, est.log_marginal)  # nothing smoothed


# ============================================================================ 7. Pyro's autoguides
def _set(name, value):
    pyro.get_param_store()[name] = torch.as_tensor(value, dtype=torch.float32)


def _global_guide(kind, x):
    """An autoguide of the global-mean model, set to 1.3 times the posterior's width."""
    m, sd = global_post(x)
    g = kind(_global_model)
    g(x)
    if kind is AutoNormal:
        _set("AutoNormal.locs.mu", m)
        _set("AutoNormal.scales.mu", 1.3 * sd)
    elif kind is AutoDiagonalNormal:
        _set("AutoDiagonalNormal.loc", [m])
        _set("AutoDiagonalNormal.scale", [1.3 * sd])
    else:
        _set("AutoMultivariateNormal.loc", [m])
        _set("AutoMultivariateNormal.scale", [1.3 * sd])
    return g


@pytest.mark.parametrize("kind", [AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal])
def test_autoguides_on_a_global_latent_match_closed_form(kind):
    x = gen(6)
    est = estimate_log_marginal(_global_model, _global_guide(kind, x), x, num_samples=3000)
    assert est.n == 1
    close(est, [global_truth(x)])


# tau ~ Gamma(A, B), x_i ~ N(0, 1 / tau): a positive latent, so the guide's log-Jacobian counts
GA, GB = 2.0, 1.5


def _gamma_model(x):
    tau = pyro.sample("tau", dist.Gamma(x.new_tensor(GA), x.new_tensor(GB)))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(0.0, tau.rsqrt()), obs=x)


def gamma_truth(x) -> float:
    n, ss = x.numel(), float((x.double() ** 2).sum())
    a, b = GA + n / 2, GB + ss / 2
    return (GA * math.log(GB) - math.lgamma(GA) - n / 2 * math.log(2 * math.pi)
            + math.lgamma(a) - a * math.log(b))


@pytest.mark.parametrize("kind", [AutoNormal, AutoDiagonalNormal])
def test_autoguides_on_a_positive_latent_count_the_jacobian(kind):
    x = gen(10, 5)
    a, b = GA + 5, GB + float((x.double() ** 2).sum()) / 2
    # log tau | x is about N(digamma(a) - log b, trigamma(a)): widen it
    loc = float(torch.digamma(torch.tensor(a, dtype=torch.float64))) - math.log(b)
    sd = 1.3 * math.sqrt(float(torch.polygamma(1, torch.tensor(a, dtype=torch.float64))))
    g = kind(_gamma_model)
    g(x)
    if kind is AutoNormal:
        _set("AutoNormal.locs.tau", loc)
        _set("AutoNormal.scales.tau", sd)
    else:
        _set("AutoDiagonalNormal.loc", [loc])
        _set("AutoDiagonalNormal.scale", [sd])
    est = estimate_log_marginal(_gamma_model, g, x, num_samples=3000)
    close(est, [gamma_truth(x)])


def _local_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
        pyro.sample("x", dist.Normal(z, S), obs=x)


def test_autonormal_with_per_datapoint_latents_is_per_datapoint():
    x = gen(9)
    g = AutoNormal(_local_model)
    g(x)
    _set("AutoNormal.locs.z", nn_post_mean(x) + 0.2)
    _set("AutoNormal.scales.z", torch.full((9,), 1.3 * POST_SD))
    est = estimate_log_marginal(_local_model, g, x, num_samples=2000)
    assert est.per_datapoint and est.n == 9
    close(est, nn_truth(x))


def test_untrained_autonormal_is_set_up_on_the_full_data():
    x = gen(9)
    est = estimate_log_marginal(_local_model, AutoNormal(_local_model, init_scale=1.0), x,
                                num_samples=3000)
    assert est.n == 9
    close(est, nn_truth(x))


def test_autoguides_with_global_and_per_datapoint_latents():
    """mu ~ N(0, S0^2), z_i ~ N(mu, 1), x_i ~ N(z_i, S^2): x ~ MVN(0, (1 + S^2) I + S0^2 11').

    AutoMultivariateNormal's one auxiliary vector ties all sites: one joint value, which its
    full covariance can make nearly exact; AutoNormal is mean field, still a valid proposal.
    """
    n = 4
    x = gen(n, 6)

    def model(x):
        mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), S0))
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, S), obs=x)

    cov = (1 + S**2) * torch.eye(n, dtype=torch.float64) + S0**2
    truth = float(dist.MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov)
                  .log_prob(x.double()))
    # the exact joint posterior of (mu, z) from the joint Gaussian
    J = torch.zeros(n + 1, n + 1, dtype=torch.float64)  # precision of (mu, z)
    J[0, 0] = 1 / S0**2 + n
    J[0, 1:] = J[1:, 0] = -1.0
    J[1:, 1:] = (1 + 1 / S**2) * torch.eye(n, dtype=torch.float64)
    pc = torch.linalg.inv(J)
    pm = pc @ torch.cat([torch.zeros(1, dtype=torch.float64), x.double() / S**2])
    g = AutoMultivariateNormal(model)
    g(x)
    _set("AutoMultivariateNormal.loc", pm)
    _set("AutoMultivariateNormal.scale", torch.ones(n + 1))
    _set("AutoMultivariateNormal.scale_tril", 1.2 * torch.linalg.cholesky(pc))
    est = estimate_log_marginal(model, g, x, num_samples=2000)
    assert est.per_datapoint is False and est.n == 1
    close(est, [truth])

    pyro.clear_param_store()
    g = AutoNormal(model)
    g(x)
    sd = pc.diagonal().sqrt()
    _set("AutoNormal.locs.mu", pm[0])
    _set("AutoNormal.scales.mu", 1.5 * sd[0])
    _set("AutoNormal.locs.z", pm[1:])
    _set("AutoNormal.scales.z", 1.5 * sd[1:])
    est = estimate_log_marginal(model, g, x, num_samples=4000)
    close(est, [truth])


# ============================================================================ 8. the trust rule, PSIS
def test_psis_estimate_and_summary_keys(tmp_path):
    x = gen(20)

    def guide(x):  # narrower than the posterior: heavy-tailed weights, k-hat near 0.5 and above
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(nn_post_mean(x) + 0.3, 0.6 * POST_SD))

    est = estimate_log_marginal(_local_model, guide, x, num_samples=4000)
    assert est.log_marginal_psis.shape == (20,) and np.isfinite(est.log_marginal_psis).all()
    assert np.isfinite(est.khat).all() and (est.khat > 0.5).any()
    # smoothing replaces the tail's weights by Pareto quantiles truncated at the largest weight
    assert not np.array_equal(est.log_marginal_psis, est.log_marginal)
    s = est.summary()
    assert s["khat_gt_0.5"] == float(np.mean(est.khat > 0.5))
    assert s["khat_gt_0.7"] == float(np.mean(est.khat > 0.7))
    assert s["psis"]["mean"] == pytest.approx(float(est.log_marginal_psis.mean()))
    for key in ("n", "num_samples", "elbo", "iwae", "gap", "ess_mean", "per_datapoint", "summed"):
        assert key in s
    est.save(tmp_path / "e.npz")
    saved = np.load(tmp_path / "e.npz")
    np.testing.assert_array_equal(saved["log_marginal_psis"], est.log_marginal_psis)
    # where k-hat < 0.7 the smoothed estimate is trustworthy: within its error of the truth
    ok = est.khat < 0.7
    se = delta_se(est)
    err = np.abs(est.log_marginal_psis - nn_truth(x))
    assert ok.any() and (err[ok] < Z * se[ok] + se[ok] ** 2 + 1e-4).all()


def test_exact_guide_gives_psis_equal_to_raw():
    x = gen(5)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(nn_post_mean(x), POST_SD))

    est = estimate_log_marginal(_local_model, guide, x, num_samples=100)
    np.testing.assert_array_equal(est.log_marginal_psis, est.log_marginal)
    assert (est.khat == -1).all()


# ============================================================================ 11. absurd work
def test_absurd_number_of_samples_is_refused_at_once():
    x = gen(5)
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(nn_post_mean(x), POST_SD))

    with pytest.raises(GenlabError, match=r"100000000 importance samples need about 3\.0 GiB"):
        estimate_log_marginal(_local_model, guide, x, num_samples=10**8)


def test_projected_time_above_max_seconds_is_refused():
    x = gen(50)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(nn_post_mean(x), POST_SD))

    with pytest.raises(GenlabError, match=r"would take about .* above max_seconds=1e-06"):
        estimate_log_marginal(_local_model, guide, x, num_samples=200, memory=1000,
                              max_seconds=1e-6)
    est = estimate_log_marginal(_local_model, guide, x, num_samples=20, memory=1000,
                                max_seconds=None)
    assert np.abs(est.log_marginal - nn_truth(x)).max() < 1e-4


# ============================================================================ beyond: more pairs
def test_nested_plates_masks_and_float64():
    """Data plate at dim -2 over an inner plate at dim -1, float64, half the entries masked."""
    n, m = 6, 3
    x = gen(n * m, 7, torch.float64).reshape(n, m)
    mask = torch.rand(n, m, generator=torch.Generator().manual_seed(1)) < 0.5

    def model(x):
        with pyro.plate("data", n, dim=-2):
            z = pyro.sample("z", dist.Normal(x.new_zeros(n, 1), 1.0))
            with pyro.plate("feat", m, dim=-1), poutine.mask(mask=mask):
                pyro.sample("x", dist.Normal(z, S), obs=x)

    def guide(x):
        k = mask.sum(-1, keepdim=True).double()
        prec = 1 + k / S**2
        with pyro.plate("data", n, dim=-2):
            pyro.sample("z", dist.Normal((x * mask).sum(-1, keepdim=True) / S**2 / prec,
                                         prec.rsqrt()))

    est = estimate_log_marginal(model, guide, x, num_samples=50)
    assert est.per_datapoint and est.n == n
    truth = []
    for i in range(n):
        xi = x[i][mask[i]]
        cov = S**2 * torch.eye(xi.numel(), dtype=torch.float64) + 1.0
        truth.append(float(dist.MultivariateNormal(torch.zeros_like(xi), cov).log_prob(xi))
                     if xi.numel() else 0.0)
    assert np.abs(est.log_marginal - np.array(truth)).max() < 1e-9  # float64 round-off


def _grid_truth(loglik, half=7.0, g=281):
    """log p(x) = log ∫ N(z; 0, I_2) p(x | z) dz by the trapezoid rule on a 2-D grid."""
    t = torch.linspace(-half, half, g, dtype=torch.float64)
    zz = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    lj = dist.Normal(0.0, 1.0).log_prob(zz).sum(-1)[:, None] + loglik(zz)  # (G^2, N)
    mx = lj.max(0).values
    dens = torch.exp(lj - mx).reshape(g, g, -1)
    dz = float(t[1] - t[0])
    area = torch.trapezoid(torch.trapezoid(dens, dx=dz, dim=0), dx=dz, dim=0)
    return (mx + area.log()).numpy()


def test_vae_with_2d_latent_matches_grid_quadrature():
    from models.vae import VAE

    torch.manual_seed(0)
    vae = VAE(x_dim=12, latent_dim=2, hidden=(8,)).double()
    x = torch.bernoulli(torch.full((5, 12), 0.4, dtype=torch.float64),
                        generator=torch.Generator().manual_seed(3))

    def loglik(z):
        with torch.no_grad():
            return dist.Bernoulli(logits=vae.decode(z)[:, None, :]).log_prob(x).sum(-1)

    # a keyword data_size (an int, never cut) and a subsampling plate's scale must not matter
    est = estimate_log_marginal(vae.model, vae.guide, x, num_samples=3000, memory=200000)
    close(est, _grid_truth(loglik))


def test_cvae_with_2d_latent_matches_grid_quadrature():
    from models.cvae import CVAE

    torch.manual_seed(1)
    cvae = CVAE(x_dim=12, latent_dim=2, hidden=(8,)).double()
    x = torch.bernoulli(torch.full((5, 12), 0.4, dtype=torch.float64),
                        generator=torch.Generator().manual_seed(4))
    y = torch.tensor([0, 3, 3, 7, 9])

    def loglik(z):
        with torch.no_grad():
            out = [dist.Bernoulli(logits=cvae.decode(z, y[i].expand(z.shape[0])))
                   .log_prob(x[i]).sum(-1) for i in range(5)]
        return torch.stack(out, -1)

    est = estimate_log_marginal(cvae.model, cvae.guide, x, y=y, num_samples=3000, memory=200000)
    assert est.mode == "cut"
    close(est, _grid_truth(loglik))
