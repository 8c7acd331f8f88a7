import numpy as np
import pyro
import pytest
import torch
from pyro import poutine

from evaluation.cli import main as eval_main
from evaluation.reports import cvae as R
from inference.cli import main as train_main
from models.common import GenlabError
from models.cvae import CVAE

TINY = ["--latent-dim", "2", "--hidden", "16", "--limit", "128", "--batch-size", "64", "--quiet",
        "--epochs", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("cvae")
    assert train_main(["cvae", *TINY, "--out", str(root / "cvae"), "--data-dir", data_dir]) == 0
    assert train_main(["vae", *TINY, "--out", str(root / "vae"), "--data-dir", data_dir]) == 0
    return root


def test_label_is_a_covariate_not_a_sample_site():
    m = CVAE(latent_dim=2, hidden=(8,))
    x = torch.bernoulli(torch.full((5, 784), 0.2))
    y = torch.arange(5)
    tr = poutine.trace(m.model).get_trace(x, y)
    sites = {n for n, s in tr.nodes.items() if s["type"] == "sample" and n != "data"}
    assert sites == {"z", "x"}
    # the decoder really uses y: two labels give different Bernoulli probabilities
    z = torch.zeros(2, 2)
    assert not torch.allclose(m.decode(z, torch.tensor([0, 1]))[0], m.decode(z, torch.tensor([0, 1]))[1])


@pytest.mark.parametrize("y,msg", [
    (torch.tensor([0, 1, 10]), "labels must be digit classes 0-9, got 10"),
    (torch.tensor([0, -1, 3]), "labels must be digit classes 0-9, got -1"),
    (torch.tensor([0, 1]), r"got \(2,\) labels for 3 images; give one label per image"),
    (torch.tensor([0.0, 1.0, 2.0]), "labels must be integers 0-9, got dtype torch.float32"),
    (None, "the conditional VAE needs a label for every image"),
])
def test_bad_labels(y, msg):
    m = CVAE(latent_dim=2, hidden=(8,))
    with pytest.raises(GenlabError, match=msg):
        m.model(torch.zeros(3, 784), y)


def test_classifier_obeys_bayes_rule():
    rng = np.random.default_rng(0)
    ll = rng.normal(-100, 5, size=(20, 10))
    prior = R.label_prior(rng.integers(0, 10, size=500))
    log_post, log_px = R.classify(ll, prior)
    assert np.allclose(np.exp(log_post).sum(1), 1.0)
    y = rng.integers(0, 10, size=20)
    lhs = ll[np.arange(20), y] - log_px
    rhs = log_post[np.arange(20), y] - np.log(prior[y])
    assert np.allclose(lhs, rhs)


def test_per_label_loglik_is_the_estimator_per_label():
    m = CVAE(latent_dim=2, hidden=(8,))
    x = torch.bernoulli(torch.full((4, 784), 0.2))
    from inference.importance import estimate_log_marginal

    pyro.set_rng_seed(0)
    ll = R.per_label_loglik(m, x, num_samples=3)
    pyro.set_rng_seed(0)
    first = estimate_log_marginal(m.model, m.guide, x, torch.zeros(4, dtype=torch.long),
                                  num_samples=3).log_marginal
    assert ll.shape == (4, 10) and np.allclose(ll[:, 0], first)


def test_report_with_vae_baseline(runs, capsys):
    code = eval_main([str(runs / "cvae"), "--k", "4", "--limit", "30", "--report",
                      "--classifier-k", "3", "--baseline", str(runs / "vae")])
    out = capsys.readouterr().out
    assert code == 0
    assert "generative classifier p(y|x) ∝ p(x|y) p(y)" in out and R.CLASSIFIER_NOTE in out
    assert "left,  CVAE log p(x|y) - VAE log p(x)" in out
    names = {p.name for p in (runs / "cvae" / "figures").iterdir()}
    assert names == {"styles.png", "style_transfer.png", "loglik_given_label_by_digit.png",
                     "classifier_confusion.png", "classifier_confidently_wrong.png"}


def test_cvae_checkpoint_as_vae_baseline_is_refused(runs, capsys):
    code = eval_main([str(runs / "cvae"), "--k", "2", "--limit", "5", "--report",
                      "--classifier-k", "2", "--baseline", str(runs / "cvae")])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"genlab-eval: error: {runs / 'cvae'} holds a 'cvae' run, not 'vae'")


def test_cvae_needs_labelled_data(capsys, tmp_path, data_dir):
    code = train_main(["cvae", *TINY, "--dataset", "binarized-mnist", "--out", str(tmp_path / "r"),
                       "--data-dir", data_dir])
    assert code == 2
    assert "the conditional VAE needs labels" in capsys.readouterr().err
