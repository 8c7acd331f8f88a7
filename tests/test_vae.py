import json

import numpy as np
import pytest
import torch

from evaluation.api import load_run
from evaluation.cli import main as eval_main
from evaluation.reports import vae as R
from inference.cli import main as train_main
from inference.data import first_principal_component, load_images, pca_holdout
from models.common import Bernoulli, GenlabError, bernoulli_log_prob
from models.vae import PRESETS, VAE, build_vae

TINY = ["--latent-dim", "2", "--hidden", "16", "--limit", "128", "--batch-size", "64", "--quiet",
        "--epochs", "1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("vae") / "run"
    assert train_main(["vae", *TINY, "--out", str(out), "--data-dir", data_dir]) == 0
    return out


def test_presets_build_the_stated_architectures():
    v = build_vae(preset="iwae-1layer")
    sizes = [m.out_features for m in v.decoder if isinstance(m, torch.nn.Linear)]
    assert sizes == [200, 200, 784] and v.latent_dim == 50
    assert isinstance(v.decoder[1], torch.nn.Tanh)
    assert build_vae(preset="study-d4").latent_dim == 4 == PRESETS["study-d4"]["latent_dim"]
    assert build_vae(preset="study-d4", latent_dim=7).latent_dim == 7  # explicit wins


def test_model_refuses_non_binary_and_misshaped_images():
    v = VAE(latent_dim=2, hidden=(8,))
    with pytest.raises(GenlabError, match="images must be 0/1 for a Bernoulli likelihood; found the value 0.5"):
        v.model(torch.full((3, 784), 0.5))
    with pytest.raises(GenlabError, match=r"images must be a \(N, 784\) batch, got shape \(3, 28, 28\)"):
        v.model(torch.zeros(3, 28, 28))


def test_bernoulli_log_prob_is_torch_bernoulli_in_value_gradient_and_accuracy():
    """genlab's x l - softplus(l) against torch's Bernoulli (BCE-with-logits): the same value
    and gradient, and in float32 no further from the float64 truth, per image."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 784, generator=g) * 8).requires_grad_()
    x = torch.bernoulli(torch.full((784,), 0.2), generator=g)
    ours = Bernoulli(logits=logits, validate_args=False).to_event(1).log_prob(x)
    theirs = torch.distributions.Bernoulli(logits=logits).log_prob(x.expand(64, 784)).sum(-1)
    assert ours.shape == theirs.shape == (64,)
    truth = bernoulli_log_prob(logits.detach().double(), x.double()).sum(-1)
    err_ours = (ours.detach().double() - truth).abs().max()
    err_theirs = (theirs.detach().double() - truth).abs().max()
    assert err_ours <= 1.05 * err_theirs and err_ours < 1e-3
    g_ours, = torch.autograd.grad(ours.sum(), logits)
    torch.testing.assert_close(g_ours, x - torch.sigmoid(logits.detach()), rtol=0, atol=1e-6)
    # masked and expanded, as in-painting and the particle plates use it
    m = Bernoulli(logits=logits[0], validate_args=False).expand([3, 784]).mask(x > 0)
    lp = bernoulli_log_prob(logits[0].detach(), x)
    torch.testing.assert_close(m.log_prob(x).detach(), torch.where(x > 0, lp, 0.0).expand(3, 784),
                               rtol=0, atol=0)


def test_active_units_counts_units_the_encoder_uses():
    v = VAE(latent_dim=5, hidden=(16,))
    last = v.encoder[-1]
    with torch.no_grad():  # units 1 and 3: the posterior mean ignores x entirely
        for u in (1, 3):
            last.weight[u].zero_()
    x = torch.bernoulli(torch.full((200, 784), 0.3))
    var, n = R.active_units(v, x, threshold=1e-12)
    assert n == 3 and var[1] == 0 and var[3] == 0


def test_corruptions():
    x = torch.bernoulli(torch.full((4, 784), 0.5))
    assert torch.equal(R.corrupt(x, "flip", 0.0), x)
    assert torch.equal(R.corrupt(x, "flip", 1.0), 1 - x)
    blocked = R.corrupt(torch.ones(1, 784), "block", 8).reshape(28, 28)
    assert blocked.sum() == 784 - 64 and blocked[10:18, 10:18].sum() == 0


def test_pca_holdout_takes_the_extremes(data_dir):
    d = load_images("mnist", "fixed", data_dir, download=False)
    mean, v = first_principal_component(d.train.x)
    for which in ("pca-top", "pca-bottom"):
        h = pca_holdout(d, which, 0.05)
        hold, kept = h.split("holdout"), h.train
        assert len(hold) == 2500 and len(kept) == 47500
        s_hold, s_kept = (hold.x - mean) @ v, (kept.x - mean) @ v
        if which == "pca-top":
            assert s_hold.min() >= s_kept.max()
        else:
            assert s_hold.max() <= s_kept.min()
    with pytest.raises(GenlabError, match="unknown split 'holdut'; this data set has train, valid, test, holdout"):
        h.split("holdut")


def test_report_and_compare_write_every_figure(tiny_run, tmp_path, capsys):
    assert eval_main([str(tiny_run), "--k", "1,5", "--limit", "40", "--report", "--digit", "3"]) == 0
    out = capsys.readouterr().out
    assert "active units (Cov_x E_q[z_u] > 0.01):" in out
    names = {p.name for p in (tiny_run / "figures").iterdir()}
    assert names == {"reconstruction.png", "generation.png", "corruption.png", "interpolation.png",
                     "loglik_by_digit.png", "likely_unlikely_digit3.png", "elbo_vs_iwae.png",
                     "active_units.png"}
    capsys.readouterr()
    assert eval_main(["compare", str(tiny_run), str(tiny_run), "--k", "3", "--limit", "20",
                      "--out", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"compare_loglik.png", "compare_winners.png",
                                                    "compare_generation.png"}
    # the headline numbers are printed (a run against itself: exactly no difference)
    out = capsys.readouterr().out
    assert ("B - A = 0.00 ± 0.00 nats/image (mean ± standard error, IWAE K=3, test n=20); "
            "B better on 0% of images") in out
    # a second report and a second compare keep the first figures in figures/old/
    assert eval_main([str(tiny_run), "--k", "1,5", "--limit", "40", "--report", "--digit", "3"]) == 0
    assert "8 earlier figure(s) of the same name moved to " in capsys.readouterr().out
    assert len(list((tiny_run / "figures" / "old").glob("*.png"))) == 8
    assert eval_main(["compare", str(tiny_run), str(tiny_run), "--k", "3", "--limit", "20",
                      "--out", str(tmp_path)]) == 0
    assert {p.name.split(".")[0] for p in (tmp_path / "old").iterdir()} == {
        "compare_loglik", "compare_winners", "compare_generation"}


def test_evaluate_takes_options_or_arguments(tiny_run):
    from evaluation.api import EvalOptions, evaluate

    a = evaluate(tiny_run, R.Options(k=[1, 5], limit=10, spread=True))
    b = evaluate(tiny_run, [1, 5], "test", 10, spread=True)
    assert np.array_equal(a.estimate.log_marginal, b.estimate.log_marginal)
    assert a.summary == b.summary
    with pytest.raises(GenlabError, match="--limit must be a positive integer, got 0"):
        EvalOptions(limit=0)


def test_bad_digit_and_wrong_checkpoint(tiny_run, capsys, tmp_path):
    assert eval_main([str(tiny_run), "--k", "2", "--limit", "4", "--report", "--digit", "12"]) == 2
    assert capsys.readouterr().err.strip() == "genlab-eval: error: --digit must be a digit class 0-9, got 12"
    # a checkpoint of another latent size
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["system_args"]["latent_dim"] = 4
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GenlabError, match="the checkpoint does not fit this model"):
        load_run(other)


def test_report_figures_are_seeded(tiny_run):
    cfg, vae, data = load_run(tiny_run)
    x = data.test.x[:4]
    torch.manual_seed(0)
    a = R.posterior_draws(vae, x, 2)[2]
    torch.manual_seed(0)
    b = R.posterior_draws(vae, x, 2)[2]
    assert torch.equal(a, b)
    assert R.Options().digit == 6
    assert np.isfinite(a.numpy()).all()


def test_first_principal_component_matches_eigh():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 30, generator=g) * torch.linspace(3, 0.5, 30)  # distinct variances
    mean, v = first_principal_component(x)
    xc = (x - mean).double()
    _, vecs = torch.linalg.eigh(xc.T @ xc)
    assert abs(float(vecs[:, -1] @ v.double())) == pytest.approx(1.0, abs=1e-6)
    assert v[v.abs().argmax()] > 0  # the sign convention


def test_binary_check_runs_under_validation_and_once_per_data_set():
    import pyro

    v = VAE(latent_dim=2, hidden=(8,))
    grey = torch.full((3, 784), 0.5)
    with pytest.raises(GenlabError, match="found the value 0.5"):
        v.check_data(grey)
    with pyro.validation_enabled(False):  # the runner's later steps: no per-batch check
        v.model(grey)
    with pytest.raises(GenlabError, match="found the value 0.5"):
        v.model(grey)  # validation is on by default
