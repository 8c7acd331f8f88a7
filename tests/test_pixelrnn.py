"""The pixel GRU (models/pixelrnn.py) and in-painting (evaluation/inpainting.py).

Closed-form truths: the autoregressive model is normalized (its probabilities of all 2^T images
sum to one), its teacher-forced log-likelihood equals the product of its step-by-step
conditionals, the estimator on the empty guide returns it exactly, and marginalizing a missing
suffix gives the likelihood of the prefix.  Samplers are checked against exact enumeration.
"""

import itertools
import json

import numpy as np
import pytest
import torch

from evaluation import inpainting as IP
from inference.importance import estimate_log_marginal
from models.common import GenlabError
from models.pixelrnn import PixelGRU, check_horizon, completion_scores
from models.vae import VAE


def _images(n, T, p=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, T, generator=g) < p).float()


def _gru(T=784, hidden=4, seed=0):
    torch.manual_seed(seed)
    g = PixelGRU(x_dim=T, hidden=hidden, head=(8,)).eval()
    with torch.no_grad():  # sharper conditionals than at initialization, so posteriors are skewed
        for p in g.parameters():
            p.mul_(3.0)
    return g


def _all_images(T):
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=T)))


# ----------------------------------------------------------------------------- the model
def test_the_model_is_normalized():
    g = _gru(T=6)
    with torch.no_grad():
        total = torch.logsumexp(g.log_prob(_all_images(6)).double(), 0)
    assert abs(float(total)) < 1e-5


def test_teacher_forcing_equals_stepwise_conditionals():
    g = _gru(T=30, hidden=5)
    x = _images(4, 30)
    with torch.no_grad():
        lp = g.log_prob(x)
        logits, h = g.read(x[:, :0])
        logit, steps = logits[:, -1], []
        for t in range(30):
            steps.append(-torch.nn.functional.binary_cross_entropy_with_logits(
                logit, x[:, t], reduction="none"))
            logit, h = g.step(x[:, t], h)
    torch.testing.assert_close(lp, torch.stack(steps, -1).sum(-1), atol=1e-4, rtol=0)


def test_estimator_on_the_empty_guide_is_the_exact_likelihood():
    g = _gru()
    x = _images(5, 784)
    est = estimate_log_marginal(g.model, g.guide, x, num_samples=7, ks=(1, 7))
    with torch.no_grad():
        exact = g.log_prob(x).double().numpy()
    np.testing.assert_allclose(est.log_marginal, exact, atol=1e-4)
    np.testing.assert_allclose(est.elbo, exact, atol=1e-4)
    np.testing.assert_allclose(est.iwae[1], exact, atol=1e-4)
    assert est.per_datapoint and np.all(est.ess == 7)


def test_non_binary_and_misshapen_images_are_refused():
    g = _gru(T=10)
    with pytest.raises(GenlabError, match="must be 0/1 for a Bernoulli likelihood; found the value 0.5"):
        g.log_prob(torch.full((2, 10), 0.5))
    with pytest.raises(GenlabError, match=r"images must be a \(N, 10\) batch, got shape \(2, 9\)"):
        g.log_prob(torch.zeros(2, 9))


# ----------------------------------------------------------------------------- completion
def test_greedy_completion_is_the_argmax_path_and_its_logits_are_the_models():
    g = _gru(T=40)
    x = _images(3, 40)
    pix, logits = g.complete(x, 25, 15, "greedy")
    assert pix.shape == (1, 3, 15)
    assert torch.equal(pix[0], (logits[0] >= 0).float())
    path = x.clone()
    path[:, 25:] = pix[0]
    with torch.no_grad():
        torch.testing.assert_close(g(path)[:, 25:], logits[0], atol=1e-5, rtol=0)
    sc = completion_scores(x, 25, pix, logits, (1, 15))
    acc1 = float((pix[0, :, 0] == x[:, 25]).float().mean())
    assert sc[1]["acc"] == pytest.approx(acc1)


def test_sampled_completion_is_reproducible_under_a_seed():
    g = _gru(T=40)
    x = _images(3, 40)
    a = g.complete(x, 20, 20, "sample", 4, generator=torch.Generator().manual_seed(3))[0]
    b = g.complete(x, 20, 20, "sample", 4, generator=torch.Generator().manual_seed(3))[0]
    assert a.shape == (4, 3, 20) and torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # independent samples differ


def test_a_horizon_past_the_image_is_refused():
    with pytest.raises(GenlabError, match="a horizon of 301 pixels after pixel 484 runs past the "
                                          r"image's 784 pixels \(at most 300\)"):
        check_horizon(484, 301)
    g = _gru(T=40)
    with pytest.raises(GenlabError, match="unknown completion mode 'beam'"):
        g.complete(_images(1, 40), 10, 5, "beam")


# ----------------------------------------------------------------------------- exact in-painting
def _brute(g, x, mask):
    pos = mask.nonzero().squeeze(-1)
    vals = _all_images(len(pos))
    lj = []
    with torch.no_grad():
        for v in vals:
            xc = x.clone()
            xc[:, pos] = v
            lj.append(g.log_prob(xc).double())
    lj = torch.stack(lj, -1)
    return lj, vals, pos


def test_exact_inpainting_matches_brute_force_enumeration():
    T = 40
    g = _gru(T=T)
    x = _images(4, T)
    mask = torch.zeros(T, dtype=torch.bool)
    mask[[12, 13, 20, 21]] = True  # a "2x2 patch" on an 8-wide image
    r = IP.exact_inpaint(g, x, mask)
    lj, vals, pos = _brute(g, x, mask)
    np.testing.assert_allclose(r.log_marginal, torch.logsumexp(lj, -1).numpy(), atol=1e-4)
    post = torch.softmax(lj, -1)
    torch.testing.assert_close(r.pixel_prob[:, pos], post @ vals.double(), atol=1e-4, rtol=0)
    assert torch.equal(r.pixel_prob[:, ~mask], x[:, ~mask].double())
    best = vals[post.argmax(-1)]
    assert torch.equal(r.mode[:, pos], best)
    assert torch.equal(r.samples[:, :, ~mask], x[:, ~mask].expand(r.samples.shape[0], 4, -1))


def test_marginalizing_a_missing_suffix_gives_the_prefix_likelihood():
    T = 30
    g = _gru(T=T)
    x = _images(3, T)
    mask = torch.zeros(T, dtype=torch.bool)
    mask[-3:] = True
    with torch.no_grad():
        logits = g(x)
        prefix = -torch.nn.functional.binary_cross_entropy_with_logits(
            logits[:, :-3], x[:, :-3], reduction="none").sum(-1)
    ex = IP.exact_inpaint(g, x, mask)
    np.testing.assert_allclose(ex.log_marginal, prefix.double().numpy(), atol=1e-4)
    # the first missing pixel's posterior is its forward conditional
    torch.testing.assert_close(ex.pixel_prob[:, T - 3], torch.sigmoid(logits[:, T - 3]).double(),
                               atol=1e-5, rtol=0)
    # importance sampling: every weight is the same, so ESS = K and the estimate is exact
    r = IP.importance_inpaint(g, x, mask, num_particles=50)
    np.testing.assert_allclose(r.ess, 50.0, rtol=1e-9)
    np.testing.assert_allclose(r.log_marginal, prefix.double().numpy(), atol=1e-4)


@pytest.mark.parametrize("smc", [False, True])
def test_importance_sampling_agrees_with_exact_enumeration(smc):
    T = 40
    g = _gru(T=T)
    x = _images(3, T)
    mask = torch.zeros(T, dtype=torch.bool)
    mask[[5, 9, 14, 15, 22]] = True
    ex = IP.exact_inpaint(g, x, mask)
    r = IP.importance_inpaint(g, x, mask, num_particles=4000, smc=smc, ess_threshold=0.9,
                              generator=torch.Generator().manual_seed(1))
    assert r.method == ("SMC" if smc else "IS")
    np.testing.assert_allclose(r.log_marginal, ex.log_marginal, atol=0.05)
    assert float((r.pixel_prob - ex.pixel_prob)[:, mask].abs().max()) < 0.05
    assert np.all(r.ess <= 4000 + 1e-6) and np.all(r.ess > 1)
    if smc:
        assert r.resamplings is not None and r.resamplings.shape == (3,)


def test_smc_resamples_when_the_weights_degenerate():
    T = 60
    g = _gru(T=T)
    x = _images(2, T)
    mask = torch.zeros(T, dtype=torch.bool)
    mask[[2, 3, 4, 30, 31]] = True
    r = IP.importance_inpaint(g, x, mask, num_particles=2000, smc=True, ess_threshold=1.0,
                              generator=torch.Generator().manual_seed(2))
    ex = IP.exact_inpaint(g, x, mask)
    assert np.all(r.resamplings >= 1)
    np.testing.assert_allclose(r.log_marginal, ex.log_marginal, atol=0.1)


def test_bad_masks_get_one_clear_message():
    g = _gru(T=20)
    x = _images(2, 20)
    with pytest.raises(GenlabError, match="the mask hides no pixel of image 0; there is nothing to in-paint"):
        IP.exact_inpaint(g, x, torch.zeros(20, dtype=torch.bool))
    with pytest.raises(GenlabError, match="the mask hides every pixel of image 0"):
        IP.importance_inpaint(g, x, torch.ones(20, dtype=torch.bool))
    with pytest.raises(GenlabError, match=r"the mask must have shape \(20,\) or \(2, 20\) like the "
                                          r"images, got \(784,\)"):
        IP.exact_inpaint(g, x, IP.pixel_mask(3, 3))
    with pytest.raises(GenlabError, match="exact enumeration is limited to 16 missing pixels"):
        IP.exact_inpaint(g, x, torch.arange(20) < 17)
    with pytest.raises(GenlabError, match="must be 0/1 for a Bernoulli likelihood"):
        IP.exact_inpaint(g, x * 0.5 + 0.25, torch.arange(20) == 3)
    with pytest.raises(GenlabError, match="does not fit in a 28x28 image"):
        IP.block_mask(25, 25, 8, 8)


def test_masks_have_the_stated_shapes():
    assert int(IP.patch_mask(13, 13).sum()) == 4 and int(IP.row_mask(14).sum()) == 28
    m = IP.patch_mask(13, 13).reshape(28, 28)
    assert m[13:15, 13:15].all()


# ----------------------------------------------------------------------------- the VAE in-painter
def test_vae_inpainter_marginal_matches_the_sum_over_completions():
    torch.manual_seed(0)
    vae = VAE(x_dim=6, latent_dim=1, hidden=(8,)).eval()
    x = _images(2, 6, p=0.5, seed=3)
    mask = torch.tensor([False, True, False, False, True, False])
    r = IP.vae_inpaint(vae, x, mask, num_particles=20000, generator=torch.Generator().manual_seed(0))
    pos = mask.nonzero().squeeze(-1)
    lj = []
    for v in _all_images(2):
        xc = x.clone()
        xc[:, pos] = v
        lj.append(torch.from_numpy(estimate_log_marginal(vae.model, vae.guide, xc,
                                                         num_samples=20000).log_marginal))
    np.testing.assert_allclose(r.log_marginal, torch.logsumexp(torch.stack(lj, -1), -1).numpy(),
                               atol=0.02)
    assert torch.equal(r.pixel_prob[:, ~mask], x[:, ~mask].double())
    assert bool(((r.pixel_prob >= 0) & (r.pixel_prob <= 1)).all())


# ----------------------------------------------------------------------------- through the runner
def test_training_through_the_runner_records_pixel_metrics(tmp_path, data_dir):
    from inference.runner import RunConfig, train

    cfg = RunConfig(system="pixelrnn", system_args={"hidden": 3, "head": [4]},
                    data_args={"dataset": "binarized-mnist", "binarization": "larochelle"},
                    epochs=1, batch_size=16, limit=32, keep_epochs=[0, 1], data_dir=data_dir)
    res = train(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "epoch_0.pt").exists() and (tmp_path / "run" / "epoch_1.pt").exists()
    header = (tmp_path / "run" / "steps.csv").read_text().splitlines()[0].split(",")
    assert header == ["step", "epoch", "train_elbo", "pixel_acc", "pixel_ce"]
    for row in res.steps:  # the objective is the exact log-likelihood per image
        assert row.train_elbo == pytest.approx(-784 * row.extra["pixel_ce"], rel=1e-4)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["system"] == "pixelrnn"


def test_a_result_can_be_cut_to_some_images():
    T = 20
    g = _gru(T=T)
    x = _images(5, T)
    r = IP.importance_inpaint(g, x, torch.arange(T) == 7, num_particles=10, smc=True)
    sub = r.take(torch.tensor([1, 3]))
    assert torch.equal(sub.x, x[[1, 3]]) and sub.samples.shape[1] == 2
    np.testing.assert_array_equal(sub.log_marginal, r.log_marginal[[1, 3]])
    np.testing.assert_array_equal(sub.resamplings, r.resamplings[[1, 3]])
