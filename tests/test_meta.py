"""The reset-every-T task, its Bayes-optimal predictor and the GRU meta-learner (models/meta.py)."""

from __future__ import annotations

import math

import pyro
import pytest
import torch

from evaluation.metrics import categorical_kl
from inference.data import symbol_sequences
from inference.runner import RunConfig, train
from models.common import GenlabError
from models.dirichlet import posterior_predictive
from models.meta import MetaLearner, as_sequences, bayes_predictive


def test_sequences_follow_the_reset_schedule_and_are_seeded():
    x, probs = symbol_sequences(50, 23, 5, alpha=[10.0, 1.0, 1.0], seed=4)
    y, _ = symbol_sequences(50, 23, 5, alpha=[10.0, 1.0, 1.0], seed=4)
    assert torch.equal(x, y) and x.shape == (50, 23) and probs.shape == (50, 5, 3)
    t = torch.arange(23)
    assert bool((x[:, t % 5 == 0] == 3).all()) and bool((x[:, t % 5 != 0] < 3).all())
    fixed, _ = symbol_sequences(10, 30, 7, p=[1.0, 0.0, 0.0])
    assert bool((fixed[:, torch.arange(30) % 7 != 0] == 0).all())


def test_bayes_predictive_is_the_restarted_posterior_predictive():
    alpha = torch.tensor([10.0, 1.0, 1.0])
    x, _ = symbol_sequences(3, 13, 4, alpha=alpha, seed=1)
    b = bayes_predictive(x, alpha, 4)
    assert b.shape == (3, 12, 4)
    assert torch.allclose(b.sum(-1), torch.ones(3, 12, dtype=torch.float64))
    for s in range(3):
        for t in range(12):  # predict x[t + 1] from x[0..t], brute force
            if (t + 1) % 4 == 0:
                assert b[s, t].tolist() == [0.0, 0.0, 0.0, 1.0]
                continue
            start = (t // 4) * 4
            seen = x[s, start + 1 : t + 1]
            c = torch.bincount(seen, minlength=3).double()
            want = posterior_predictive(alpha.double(), c)
            assert torch.allclose(b[s, t, :3], want) and b[s, t, 3] == 0


def test_bayes_predictor_has_the_lowest_cross_entropy():
    """Bayes is optimal for the law: its expected cross-entropy is below the prior mean's."""
    alpha = [1.3, 1.3, 1.3]
    x, _ = symbol_sequences(2000, 40, 20, alpha=alpha, seed=2)
    y = x[:, 1:]
    b = bayes_predictive(x, alpha, 20)
    ce_bayes = -torch.log(b.gather(-1, y.unsqueeze(-1))).mean()
    # a predictor that never updates: the prior mean, and the resets
    mean = torch.where(b[..., 3:] == 1, b, torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0], dtype=b.dtype))
    ce_mean = -torch.log(mean.gather(-1, y.unsqueeze(-1))).mean()
    assert float(ce_bayes) < float(ce_mean) - 0.05


def test_kl_is_zero_for_bayes_and_positive_otherwise():
    x, _ = symbol_sequences(5, 20, 5, alpha=[1.3, 1.3, 1.3], seed=0)
    b = bayes_predictive(x, [1.3, 1.3, 1.3], 5)
    assert float(categorical_kl(b, torch.log(b.clamp_min(1e-300))).abs().max()) < 1e-12
    u = torch.full_like(b, 0.25)
    kl = categorical_kl(b, torch.log(u))
    reset = b[..., 3] == 1
    assert torch.allclose(kl[reset], torch.full_like(kl[reset], math.log(4)))
    assert bool((kl > 0).all())


def test_model_shapes_and_empty_guide():
    net = MetaLearner(3, hidden=8, head=(8,))
    x, _ = symbol_sequences(6, 11, 5, alpha=[1.3, 1.3, 1.3])
    assert net(x).shape == (6, 10, 4)
    tr = pyro.poutine.trace(net.model).get_trace(x, data_size=60)
    site = tr.nodes["next"]
    assert site["fn"].batch_shape == (6,) and site["fn"].event_shape == (10,)
    assert site["scale"] == 10.0
    gtr = pyro.poutine.trace(net.guide).get_trace(x)
    assert not [n for n, s in gtr.nodes.items() if s["type"] == "sample"]


def test_training_is_deterministic_and_lowers_the_loss(tmp_path):
    def cfg():
        return RunConfig(system="meta", system_args=dict(hidden=16, head=[16], activation="relu"),
                         data_args=dict(alpha=[10.0, 1.0, 1.0], period=5, p=None, length=30,
                                        sequences=256, valid_sequences=64, test_sequences=64,
                                        data_seed=0), epochs=3, batch_size=32, lr=1e-2, seed=0)

    a = train(cfg(), tmp_path / "a", progress=False)
    b = train(cfg(), tmp_path / "b", progress=False)
    assert [r.train_elbo for r in a.steps] == [r.train_elbo for r in b.steps]
    assert a.metrics[-1]["val_elbo"] > a.metrics[0]["val_elbo"]
    assert set(a.steps[0].extra) == {"ce_per_step", "accuracy"}


@pytest.mark.parametrize("call, message", [
    (lambda: symbol_sequences(4, 10, 0, alpha=[1.0, 1.0, 1.0]), "at least 1"),
    (lambda: symbol_sequences(4, 10, 5, alpha=[1.0, 0.0, 1.0]), "positive"),
    (lambda: bayes_predictive(torch.tensor([[3, 0, 4]]), [1.0, 1.0, 1.0], 2), "out of range"),
    (lambda: as_sequences([[3, 0, 1], [3, 1]], 4), "same length"),
    (lambda: MetaLearner(3)(torch.tensor([[3, 0, 5]])), "out of range"),
])
def test_bad_input_is_one_clear_error(call, message):
    with pytest.raises(GenlabError, match=message):
        call()


def test_cli_refuses_a_zero_period(capsys, tmp_path):
    from inference.cli import main

    assert main(["meta", "--period", "0", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reset period T" in err[0]
