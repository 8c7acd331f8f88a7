"""AIS and BDMC (evaluation/ais.py) are right where the truth is known.

Tolerances come from the estimators' own Monte Carlo errors, never from typed-in constants:

* AIS per datapoint: its delta-method standard error across chains, ``se``; the bias of a
  log-mean-exp is about ``se**2 / 2``, so a value is accepted within ``Z * se + se**2``;
* averages over datapoints: the standard error of the mean across datapoints (which holds
  both the estimator's randomness and, for BDMC, that of the simulated data);
* an exact guide makes every log weight equal log p(x): the only slack is float32 round-off,
  bounded by the float32 machine epsilon times the magnitude of the summed log-densities.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from evaluation.ais import ais_log_marginal, bdmc, schedule, simulate
from inference.importance import estimate_log_marginal
from models.common import GenlabError

Z = 5.0  # standard errors allowed (two-sided)
Z_RISE = 4.0  # standard errors by which a one-sided change must be clear
EPS32 = torch.finfo(torch.float32).eps

# ----------------------------------------------------------------------------- PPCA
LAT, D, S = 3, 8, 0.5
_g = torch.Generator().manual_seed(11)
W = torch.randn(D, LAT, generator=_g)
B = torch.randn(D, generator=_g)


def posterior(x):
    cov = torch.linalg.inv(torch.eye(LAT) + W.T @ W / S**2)
    return (x - B) @ W @ cov.T / S**2, cov


def truth(x) -> np.ndarray:
    cov = (W @ W.T + S**2 * torch.eye(D)).double()
    return dist.MultivariateNormal(B.double(), cov).log_prob(x.double()).numpy()


def model(x, plate="data"):
    n = x.shape[0]
    with pyro.plate(plate, n):
        z = pyro.sample("z", dist.Normal(x.new_zeros(n, LAT), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ W.T + B, S).to_event(1), obs=x)


def make_guide(mean_factor=0.5, scale_factor=0.5, shift=0.3):
    """Exact with (1, 1, 0); the default is narrow and off-centre: IWAE is badly biased."""

    def guide(x, plate="data"):
        mean, cov = posterior(x)
        tril = scale_factor * torch.linalg.cholesky(cov)
        with pyro.plate(plate, x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(mean_factor * mean + shift, scale_tril=tril))

    return guide


POOR = make_guide()
EXACT = make_guide(1.0, 1.0, 0.0)


def data(n: int, s: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(s)
    z = torch.randn(n, LAT, generator=g)
    return z @ W.T + B + S * torch.randn(n, D, generator=g)


def mean_se(a) -> tuple:
    a = np.asarray(a, dtype=float)
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(a.size))


def test_schedules_run_from_zero_to_one_increasing():
    for kind in ("sigmoid", "linear", "geometric"):
        for T in (1, 2, 10, 1000):
            b = schedule(kind, T)
            assert b.shape == (T + 1,) and b[0] == 0.0 and b[-1] == 1.0
            assert (np.diff(b) > 0).all(), (kind, T)
    with pytest.raises(GenlabError, match="unknown schedule 'cosine'"):
        schedule("cosine", 10)


def test_ais_reaches_exact_value_where_iwae_5000_is_biased():
    x = data(24)
    exact = truth(x)
    iw = estimate_log_marginal(model, POOR, x, num_samples=5000)
    est = ais_log_marginal(model, POOR, x, num_chains=32, num_steps=150)
    assert est.log_marginal.shape == est.se.shape == est.accept_rate.shape == (24,)
    assert est.step_size.shape == (24,) and est.log_weights.shape == (32, 24)
    assert est.per_datapoint and (est.se > 0).all()
    err = est.log_marginal - exact
    assert (np.abs(err) < Z * est.se + est.se**2).all(), np.abs(err / est.se).max()
    # IWAE-5000 is visibly biased: below the truth on average by many standard errors of
    # that average across datapoints, and by many of AIS's own
    bias = exact - iw.log_marginal
    b, b_se = mean_se(bias)
    assert b > Z_RISE * b_se
    assert b > Z * float(np.sqrt((est.se**2).sum()) / est.se.size) + np.abs(err).mean()
    # the step-size rule holds the acceptance rate near its target along the schedule
    late = est.accept_trace[est.pilot_steps + (est.num_steps - 1) // 2:]
    m, se = mean_se(late)
    assert abs(m - est.target_accept) < Z * late.std(ddof=1)


def test_adaptation_reaches_its_working_value_in_the_first_few_percent():
    x = data(6, s=5)
    est = ais_log_marginal(model, POOR, x, num_chains=32, num_steps=200, leapfrog_steps=3)
    acc = est.accept_trace[est.pilot_steps:]  # the schedule's transitions
    first = acc[: max(2, len(acc) // 20)]  # its first 5 %
    late = acc[len(acc) // 2:]
    # the first 5 % accept as the settled second half does, within their spread
    assert abs(first.mean() - late.mean()) < Z * late.std(ddof=1) / math.sqrt(first.size)


def test_exact_guide_gives_the_exact_value_for_every_T():
    x = data(5, s=7)
    exact = truth(x)
    # log p(x, z) and log q(z | x) are sums of D and LAT float32 terms of about this size
    scale = float(np.abs(exact).max()) + D + LAT
    tol = (D + LAT) * EPS32 * scale
    for T in (1, 2, 10, 40):
        est = ais_log_marginal(model, EXACT, x, num_chains=8, num_steps=T, leapfrog_steps=2)
        assert np.abs(est.log_weights - exact).max() < tol, T
        assert np.abs(est.log_marginal - exact).max() < tol and (est.se < tol).all()


def test_estimate_rises_with_T_and_prior_init_also_converges():
    x = data(16, s=9)
    exact = truth(x)
    short = ais_log_marginal(model, POOR, x, num_chains=16, num_steps=3)
    long = ais_log_marginal(model, POOR, x, num_chains=16, num_steps=100)
    d, d_se = mean_se(long.log_marginal - short.log_marginal)
    assert d > Z_RISE * d_se
    # annealing from the prior: f_b = p(z) p(x | z)^b
    pri = ais_log_marginal(model, POOR, x[:4], num_chains=32, num_steps=150, init="prior")
    err = pri.log_marginal - exact[:4]
    assert pri.init == "prior" and (np.abs(err) < Z * pri.se + pri.se**2).all()


def test_bdmc_brackets_the_truth_and_its_gap_shrinks_with_T():
    x = data(2)  # only the shape matters
    res = {}
    for T in (5, 60):
        pyro.set_rng_seed(1)  # the same simulated data for both
        res[T] = bdmc(model, POOR, x, num_chains=8, num_steps=T, n=100)
    r = res[60]
    assert r.lower.shape == r.upper.shape == r.gap.shape == (100,)
    sim = r.data[0]
    assert sim.shape == (100, D) and torch.equal(sim, res[5].data[0])
    exact = truth(sim)
    lo, lo_se = mean_se(r.lower - exact)
    hi, hi_se = mean_se(r.upper - exact)
    assert lo < Z * lo_se and hi > -Z * hi_se, (lo, lo_se, hi, hi_se)
    g, g_se = mean_se(r.gap)
    assert g > -Z * g_se  # a sandwich on average
    shrink, shrink_se = mean_se(res[5].gap - res[60].gap)
    assert shrink > Z_RISE * shrink_se
    s = r.summary()
    assert s["n"] == 100 and s["gap"]["mean"] == pytest.approx(g)


def test_simulate_draws_x_from_the_model_and_keeps_its_latent():
    x = data(3)
    pyro.set_rng_seed(4)
    args, latent = simulate(model, x, n=7)
    assert args[0].shape == (7, D) and not torch.equal(args[0][:3], x)
    z, pos = latent["z"]
    assert z.shape == (7, LAT) and pos == 0
    # x - (W z + b) is the likelihood's noise: its spread is S
    resid = (args[0] - z @ W.T - B).flatten()
    assert abs(float(resid.std()) - S) < Z * S / math.sqrt(2 * resid.numel())


def test_discrete_latents_are_refused():
    def dmodel(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(x.new_full((x.shape[0],), 0.5)))
            pyro.sample("x", dist.Normal(c, 1.0), obs=x)

    def dguide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(x.new_full((x.shape[0],), 0.3)))

    msg = ("AIS moves latents by Hamiltonian Monte Carlo, which needs continuous latents, but "
           "site 'c' is discrete")
    with pytest.raises(GenlabError, match=msg):
        ais_log_marginal(dmodel, dguide, torch.randn(4), num_chains=2, num_steps=2)


# ----------------------------------------------------------------------------- constrained
M = 4  # observations per datapoint


def scale_model(x):
    n = x.shape[0]
    with pyro.plate("data", n):
        loc = pyro.sample("loc", dist.Normal(x.new_zeros(n), 1.0))
        scale = pyro.sample("scale", dist.Gamma(x.new_full((n,), 3.0), 2.0))
        pyro.sample("x", dist.Normal(loc.unsqueeze(-1), scale.unsqueeze(-1)).to_event(1), obs=x)


def scale_guide(x):
    """Two sites (so the guide is re-run at every evaluation), both deliberately off."""
    n = x.shape[0]
    with pyro.plate("data", n):
        pyro.sample("loc", dist.Normal(0.5 * x.mean(-1), 0.3))
        pyro.sample("scale", dist.LogNormal(x.new_zeros(n), 0.3))


def scale_truth(x, n_grid: int) -> np.ndarray:
    """log p(x) by the trapezoid rule over (loc, log scale), float64."""
    xs = x.double().numpy()
    loc = np.linspace(-7.0, 7.0, n_grid)
    v = np.linspace(-6.0, 4.0, n_grid)  # v = log scale
    L, V = np.meshgrid(loc, v, indexing="ij")
    s = np.exp(V)
    lp = -0.5 * L**2 - 0.5 * math.log(2 * math.pi)
    lp = lp + 3.0 * math.log(2.0) - math.lgamma(3.0) + 2.0 * V - 2.0 * s + V  # Gamma, + Jacobian
    out = []
    for row in xs:
        ll = (-0.5 * ((row[None, None, :] - L[..., None]) / s[..., None]) ** 2
              - V[..., None] - 0.5 * math.log(2 * math.pi)).sum(-1)
        f = lp + ll
        m = f.max()
        out.append(m + math.log(np.trapezoid(np.trapezoid(np.exp(f - m), v, axis=1), loc)))
    return np.array(out)


def test_constrained_latent_through_biject_to_matches_quadrature():
    g = torch.Generator().manual_seed(2)
    x = (0.7 * torch.randn(6, 1, generator=g) + torch.tensor([0.3, 0.5, 1.0, 1.5, 2.0, 3.0])
         .unsqueeze(-1) * torch.randn(6, M, generator=g))
    exact = scale_truth(x, 800)
    quad_err = np.abs(exact - scale_truth(x, 400))  # the coarser grid's error bounds the finer's
    est = ais_log_marginal(scale_model, scale_guide, x, num_chains=32, num_steps=150)
    err = est.log_marginal - exact
    assert (np.abs(err) < Z * est.se + est.se**2 + quad_err).all(), np.abs(err / est.se).max()
    # per-datapoint step sizes: the posteriors differ in width, so do the steps
    assert est.step_size.max() > est.step_size.min()


def test_joint_value_when_sites_lie_outside_the_data_plate():
    x = data(3, s=4)
    est = ais_log_marginal(model, POOR, x, num_chains=32, num_steps=100, plate="obs")
    assert not est.per_datapoint and est.log_marginal.shape == (1,)
    err = float(est.log_marginal[0] - truth(x).sum())
    assert abs(err) < Z * float(est.se[0]) + float(est.se[0]) ** 2


def test_chunked_datapoints_and_chain_groups_do_not_mix(tmp_path):
    """With the exact guide every chain of datapoint n must return log p(x_n) exactly, so a
    value from the wrong datapoint, chunk or chain group would show."""
    x = data(5, s=6)
    exact = truth(x)
    # a budget of a few chains x one datapoint: 5 chunks, several chain groups each
    est = ais_log_marginal(model, EXACT, x, num_chains=24, num_steps=4, leapfrog_steps=1,
                           memory=8 * 1024)
    assert est.log_weights.shape == (24, 5)
    tol = (D + LAT) * EPS32 * (float(np.abs(exact).max()) + D + LAT)
    assert np.abs(est.log_weights - exact).max() < tol
    assert (est.accept_rate > 0).all() and est.step_size.shape == (5,)
    path = tmp_path / "ais.npz"
    est.save(path, extra=np.arange(3))
    z = np.load(path)
    assert np.array_equal(z["log_marginal"], est.log_marginal) and z["extra"].shape == (3,)
    assert int(z["num_steps"]) == 4 and z["accept_trace"].size == est.pilot_steps + 3
    assert not list(tmp_path.glob("*.tmp*"))
    json.dumps(est.summary())


# ----------------------------------------------------------------------------- command line
@pytest.mark.slow  # trains a tiny run and loads MNIST: about 10-30 s on the shared 2 cores
def test_command_line_hook_on_a_tiny_vae_run(tmp_path, data_dir, capsys):
    from evaluation.cli import main as eval_main
    from inference.cli import main as train_main

    out = tmp_path / "run"
    assert train_main(["vae", "--latent-dim", "2", "--hidden", "16", "--limit", "128",
                       "--batch-size", "64", "--quiet", "--epochs", "1", "--out", str(out),
                       "--data-dir", data_dir]) == 0
    capsys.readouterr()
    common = ["--limit", "3", "--chains", "4", "--steps", "3", "--leapfrog", "1",
              "--data-dir", data_dir]
    assert eval_main([str(out), "--estimator", "ais", "--k", "1,10", *common]) == 0
    text = capsys.readouterr().out
    assert "AIS - IWAE-10" in text and "ELBO" in text and "figure: " in text
    with np.load(out / "ais_test.npz") as npz:
        z = dict(npz)
    assert z["log_marginal"].shape == z["iwae_log_marginal"].shape == z["elbo"].shape == (3,)
    assert "iwae_1" in z and int(z["num_chains"]) == 4
    s = json.loads((out / "ais_test.json").read_text())
    assert s["ais"]["n"] == 3 and s["iwae"]["10"]["mean"] == pytest.approx(
        float(z["iwae_10"].mean()))
    assert eval_main([str(out), "--bdmc", "--n", "5", *common]) == 0
    assert "gap upper - lower" in capsys.readouterr().out
    assert (out / "figures" / "ais_test.png").exists() and (out / "figures" / "bdmc.png").exists()
    with np.load(out / "bdmc.npz") as npz:
        b = dict(npz)
    assert b["lower"].shape == b["upper"].shape == b["gap"].shape == (5,)
    assert json.loads((out / "bdmc.json").read_text())["n"] == 5


def test_per_run_figures_show_the_per_image_comparison_and_the_sandwich(tmp_path):
    from types import SimpleNamespace

    from evaluation.ais import ais_figure, bdmc_figure

    x = data(12)
    est = ais_log_marginal(model, POOR, x, num_chains=4, num_steps=10)
    iw = estimate_log_marginal(model, POOR, x, num_samples=50)
    cfg = SimpleNamespace(system="ppca", system_args={}, data_args={}, loss="Trace_ELBO", k=1)
    fig = ais_figure(est, iw, cfg)
    assert "AIS vs IWAE-50 on the same images" in fig._suptitle.get_text()
    left = fig.axes[0]
    assert left.get_xlabel().startswith("IWAE-50") and left.get_ylabel().startswith("AIS (T = 10")
    assert len(left.collections[0].get_offsets()) == 12  # one point per image
    res = bdmc(model, POOR, x, n=12, num_chains=2, num_steps=5)
    fig2 = bdmc_figure(res, cfg, 5, 2)
    assert "BDMC, T = 5, 2 chains, n = 12 simulated" in fig2._suptitle.get_text()
