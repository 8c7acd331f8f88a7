"""Heteroscedastic regression (issue 7): closed forms, β-NLL, floor, Bayesian pair, data, errors."""

import math

import numpy as np
import pyro
import pytest
import torch

from evaluation.metrics import central_coverage, pit_histogram
from inference.data import load_xy_csv, make_wiggles, wiggles_mean, wiggles_noise_scale
from inference.importance import estimate_log_marginal
from models.common import GenlabError
from models.hetero import STEP_COLUMNS, HeteroRegression, build_hetero


def small_data(n=40):
    x = torch.linspace(-3, 3, n).unsqueeze(1)
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(n)
    return x, y


def hand_loglik(m, s, y):
    return -0.5 * torch.log(2 * math.pi * s ** 2) - (y - m) ** 2 / (2 * s ** 2)


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize("variant", ["homo", "hetero"])
def test_estimator_gives_the_exact_gaussian_loglik(variant):
    x, y = small_data()
    sysm = build_hetero(variant=variant, hidden=[8])
    est = estimate_log_marginal(sysm.model, sysm.guide, x, y, num_samples=3)
    m, s = sysm.predict(x)
    assert m.shape == s.shape == (40,)
    assert est.per_datapoint and est.log_marginal.shape == (40,)
    np.testing.assert_allclose(est.log_marginal, hand_loglik(m, s, y).detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(sysm.log_predictive(x, y).detach().numpy(), est.log_marginal,
                               rtol=1e-5)
    if variant == "homo":
        assert torch.allclose(s, s[0].expand(40))  # one σ for every x


def test_beta_nll_scales_training_but_not_evaluation():
    x, y = small_data()
    a = build_hetero(variant="hetero", hidden=[8], beta=1.0)
    b = build_hetero(variant="hetero", hidden=[8], beta=0.0)
    b.load_state_dict(a.state_dict())
    ea = estimate_log_marginal(a.model, a.guide, x, y, num_samples=2)
    eb = estimate_log_marginal(b.model, b.guide, x, y, num_samples=2)
    np.testing.assert_allclose(ea.log_marginal, eb.log_marginal)
    assert ea.scaled_sites == ["y"]
    # β = 1: the gradient of the loss with respect to the mean is -(y - f(x)), squared error's
    elbo = pyro.infer.Trace_ELBO()
    loss = elbo.differentiable_loss(a.model, a.guide, x, y)
    bias = a.f[-1].bias
    (grad,) = torch.autograd.grad(loss, bias)
    m, s = a.predict(x)
    assert torch.allclose(grad, -(y - m).sum().reshape(1), rtol=1e-4, atol=1e-5)
    # and the loss itself is Σ sg(σ²) · (−log N(y; m, σ²))
    assert torch.allclose(loss, (s.detach() ** 2 * -hand_loglik(m, s, y)).sum(), rtol=1e-5)


def test_sigma_floor_bounds_sigma():
    x, y = small_data()
    sysm = build_hetero(variant="hetero", hidden=[8], sigma_floor=0.05)
    with torch.no_grad():
        sysm.g[-1].bias.fill_(-200.0)
    _, s = sysm.predict(x)
    assert torch.all(s >= 0.05) and torch.allclose(s, torch.full_like(s, 0.05))


def test_bayes_pair_is_joint_and_vectorizes_over_particles():
    x, y = small_data(30)
    sysm = build_hetero(variant="bayes", hidden=[6])
    est = estimate_log_marginal(sysm.model, sysm.guide, x, y, num_samples=64, ks=[1, 8])
    assert not est.per_datapoint and est.log_marginal.shape == (1,)
    assert np.isfinite(est.log_marginal).all()
    assert est.iwae[64][0] >= est.elbo[0]  # log-mean-exp ≥ mean for the same draws
    m, s = sysm.predictive_samples(x, 5, torch.Generator().manual_seed(0))
    assert m.shape == s.shape == (5, 30)
    # when q puts all its mass on its mean, the predictive is the network at the guide mean
    with torch.no_grad():
        for p in sysm.q_rho.values():
            p.fill_(-30.0)
    m0, s0 = sysm.predict(x)
    assert torch.allclose(sysm.log_predictive(x, y, 7), hand_loglik(m0, s0, y), atol=1e-4)


def test_step_metrics_decompose_the_change():
    x, y = small_data()
    sysm = build_hetero(variant="hetero", hidden=[8])
    with torch.no_grad():
        first = sysm.step_metrics(x, y)
        assert set(first) == set(STEP_COLUMNS) and math.isnan(first["drop"])
        ll0 = hand_loglik(*sysm.predict(x), y)
        sysm.f[-1].bias += 3.0  # shift f far: every point loses
        perm = torch.randperm(40)  # the same points in another order still count as the batch
        second = sysm.step_metrics(x[perm], y[perm])
        ll1 = hand_loglik(*sysm.predict(x), y)
    assert second["drop"] == pytest.approx(float((ll1 - ll0).mean()), abs=1e-5)
    assert 0 < second["drop_top10_share"] <= 1 and 0 <= second["drop_small_sigma_share"] <= 1
    j = int(torch.argmin(ll1 - ll0))
    assert second["drop_x"] == pytest.approx(float(x[j, 0]))
    assert second["min_sigma"] == pytest.approx(float(sysm.predict(x)[1].detach().min()))


# ----------------------------------------------------------------------------- data
def test_wiggles_is_seeded_and_splits_are_independent():
    a, b = make_wiggles(50, 20, 30, seed=1), make_wiggles(80, 20, 30, seed=1)
    assert a.train.x.shape == (50, 1) and a.train.y.shape == (50,)
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.valid.y, b.valid.y)
    assert torch.equal(a.train.x, make_wiggles(50, 20, 30, seed=1).train.x)
    assert not torch.equal(a.test.y, make_wiggles(50, 20, 30, seed=2).test.y)
    big = make_wiggles(20000, 1, 1, seed=0).train
    x, y = big.x[:, 0], big.y
    z = (y - wiggles_mean(x)) / wiggles_noise_scale(x)  # standard normal by construction
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1) < 0.03
    tight = x < -3
    assert float((y - wiggles_mean(x))[tight].std()) < 0.015  # the near-noise-free region


def test_csv_loader(tmp_path):
    p = tmp_path / "ok.csv"
    p.write_text("x,y\n" + "".join(f"{i},{2 * i}\n" for i in range(10)))
    d = load_xy_csv(p, seed=0)
    assert (len(d.train), len(d.valid), len(d.test)) == (6, 2, 2)
    allx = torch.cat([d.train.x, d.valid.x, d.test.x])[:, 0]
    ally = torch.cat([d.train.y, d.valid.y, d.test.y])
    assert torch.equal(ally, 2 * allx) and sorted(allx.tolist()) == list(range(10))


@pytest.mark.parametrize("text,msg", [
    ("x,y\n1,2\n3,\n5,6\n", "line 3: missing value in column y"),
    ("x,y\n1,2\n3,abc\n", "line 3: non-numeric value 'abc' in column y"),
    ("x,y\n1,2\n3,4\n5,\n", "x and y have different lengths (3 x values, 2 y values)"),
    ("x,y,z\n1,2,3\n", "must have exactly two columns (x, y)"),
])
def test_csv_errors(tmp_path, text, msg):
    p = tmp_path / "bad.csv"
    p.write_text(text)
    with pytest.raises(GenlabError) as e:
        load_xy_csv(p)
    assert msg in str(e.value)


@pytest.mark.parametrize("argv,msg", [
    (["--sigma-floor", "0"], "--sigma-floor must be a positive number, got 0.0"),
    (["--sigma-floor", "-1"], "--sigma-floor must be a positive number, got -1.0"),
    (["--beta", "1.5"], "--beta must lie in [0, 1], got 1.5"),
    (["--beta", "0.5", "--variant", "homo"], "--beta (β-NLL) applies to --variant hetero, not homo"),
    (["--n-train", "0"], "the wiggles train split needs a positive number of points, got 0"),
])
def test_cli_bad_options_one_line(capsys, tmp_path, argv, msg):
    from inference.cli import main

    code = main(["hetero", *argv, "--out", str(tmp_path / "r"), "--quiet", "--epochs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"genlab-train: error: {msg}"]


# ----------------------------------------------------------------------------- metrics
def test_coverage_and_pit_of_a_calibrated_grid():
    pit = (np.arange(1000) + 0.5) / 1000  # the PIT values of a perfectly calibrated predictive
    np.testing.assert_allclose(central_coverage(pit, (0.5, 0.9, 0.95)), [0.5, 0.9, 0.95])
    assert pit_histogram(pit, 10).tolist() == [100] * 10
    with pytest.raises(GenlabError, match="PIT values must be"):
        central_coverage([0.2, 1.5])


def test_gaussian_truth_is_calibrated():
    x = torch.rand(4000, 1) * 8 - 4
    y = wiggles_mean(x[:, 0]) + wiggles_noise_scale(x[:, 0]) * torch.randn(4000)
    pit = torch.distributions.Normal(wiggles_mean(x[:, 0]), wiggles_noise_scale(x[:, 0])).cdf(y)
    cov = central_coverage(pit.numpy(), (0.5, 0.9, 0.95))
    assert np.all(np.abs(cov - [0.5, 0.9, 0.95]) < 0.03)


# ----------------------------------------------------------------------------- runs
def _cfg(variant, **kw):
    from inference.runner import RunConfig
    from models.hetero import hetero_args

    base = dict(system="hetero", system_args=hetero_args(variant=variant, hidden=[8]),
                data_args=dict(dataset="wiggles", n_train=60, n_valid=30, n_test=40, data_seed=0),
                epochs=4, batch_size=60, lr=1e-2, seed=0)
    base.update(kw)
    return RunConfig(**base)


def test_training_is_deterministic_and_logs_the_diagnostics(tmp_path):
    from inference.runner import train

    train(_cfg("hetero"), tmp_path / "a", progress=False)
    train(_cfg("hetero"), tmp_path / "b", progress=False)
    a, b = (tmp_path / "a" / "steps.csv").read_text(), (tmp_path / "b" / "steps.csv").read_text()
    assert a == b
    header = a.splitlines()[0].split(",")
    assert set(STEP_COLUMNS) <= set(header)
    train(_cfg("hetero", seed=1), tmp_path / "c", progress=False)
    assert (tmp_path / "c" / "steps.csv").read_text() != a


def test_report_and_compare_write_figures(tmp_path, capsys):
    from evaluation.cli import main as eval_main
    from evaluation.reports import hetero as rep
    from inference.runner import train

    train(_cfg("homo"), tmp_path / "homo", progress=False)
    train(_cfg("hetero"), tmp_path / "het", progress=False)
    train(_cfg("bayes", loss="TraceMeanField_ELBO"), tmp_path / "bayes", progress=False)
    assert eval_main([str(tmp_path / "het"), "--k", "1", "--report"]) == 0
    for name in ("fit", "sigma", "training", "dips", "calibration"):
        assert (tmp_path / "het" / "figures" / f"{name}.png").exists()
    opts = rep.CompareOptions(out=str(tmp_path / "cmp"), split="test", seed=0, data_dir=None)
    paths = rep.compare([str(tmp_path / d) for d in ("homo", "het", "bayes")], opts)
    assert all(p.exists() for p in paths)
    table = (tmp_path / "cmp" / "figures" / "hetero_compare.md").read_text()
    assert table.count("\n| ") == 3 and "| homo lr=0.01 |" in table  # one row per run


def test_find_dips_on_a_known_curve():
    from evaluation.reports.hetero import find_dips

    ll = np.array([-1.0, -0.5, -0.2, -3.0, -0.4, -0.3, -0.9])
    steps = {"step": np.arange(7.0), "loglik": ll, "min_sigma": np.ones(7)}
    dips = find_dips(steps, 0.5)
    assert [d["step"] for d in dips] == [3.0, 6.0]
    assert dips[0]["fall"] == pytest.approx(-2.8)


def test_hetero_module_rejects_unknown_variant():
    with pytest.raises(GenlabError, match="unknown variant 'gauss'; choose one of homo, hetero, bayes"):
        HeteroRegression(variant="gauss")
