r"""The conditional VAE's figures and checks: ``python -m evaluation RUN_DIR --report``.

1. all ten digits in several styles (one prior z per row, the labels across);
2. style transfer (encode with the true label, decode the posterior mean with every label);
3. log p(x | y) per test image by the importance-weighted estimator, ELBO beside it, by digit;
4. a generative classifier p(y | x) ∝ p(x | y) p(y), from one IWAE estimate per label;
5. with ``--baseline VAE_RUN``: the identity
   log p(x | y) - log p(x) = log p(y | x) - log p(y), its left side from the CVAE and the
   unconditional VAE, its right side from the classifier.

Options: :class:`Options` (``--classifier-k``, ``--baseline``); ``--baseline`` is checked
(a ``vae`` run directory) when the options are made, before any work starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import matplotlib.pyplot as plt
import numpy as np
import torch

from evaluation.api import EvalOptions, expect_run, load_run
from evaluation.plotting import image_rows, run_title, save
from evaluation.reports.vae import loglik_by_digit_figure
from inference.importance import estimate_log_marginal
from models.common import GenlabError, option
from models.cvae import NUM_CLASSES

CLASSIFIER_NOTE = ("The generative classifier is a check that the conditional likelihoods "
                   "log p(x|y) are meaningful, not a competitive classifier.")


@dataclass
class Options(EvalOptions):
    """``python -m evaluation RUN_DIR --report`` of a ``cvae`` run."""

    classifier_k: int = option(100, "importance samples per label for the generative "
                               "classifier p(y | x)")
    baseline: Optional[str] = option(None, "a vae run of the same size: adds the check "
                                     "log p(x|y) - log p(x) = log p(y|x) - log p(y)")

    def check(self) -> None:
        super().check()
        if self.classifier_k < 1:
            raise GenlabError(f"--classifier-k must be a positive integer, got {self.classifier_k}")
        if self.baseline is not None:
            check_baseline(self.baseline)


def check_baseline(run_dir) -> None:
    """``--baseline`` names a ``vae`` run directory: one sentence otherwise."""
    expect_run(run_dir, "vae", "--baseline")


@torch.no_grad()
def styles_figure(cvae, cfg, n_styles: int = 4):
    """One z ~ N(0, I_d) per row, the ten labels across: Bernoulli probabilities p(x | z, y)."""
    rows = []
    labels = torch.arange(NUM_CLASSES)
    for _ in range(n_styles):
        z = torch.randn(1, cvae.latent_dim).expand(NUM_CLASSES, -1)
        rows.append(torch.sigmoid(cvae.decode(z, labels)).numpy())
    return image_rows(rows, [f"style z{i + 1}~N(0,I)" for i in range(n_styles)],
                      run_title(cfg, "p(x | z, y): one z per row, label y across"),
                      col_labels=[f"y={d}" for d in range(NUM_CLASSES)])


@torch.no_grad()
def style_transfer_figure(cvae, x, y, cfg):
    """Rows: test images; columns: the input, then p(x | z = E_q[z | x, y_true], y') for y'."""
    loc, _ = cvae.encode(x, y)
    rows = []
    for i in range(len(x)):
        z = loc[i : i + 1].expand(NUM_CLASSES, -1)
        probs = torch.sigmoid(cvae.decode(z, torch.arange(NUM_CLASSES))).numpy()
        rows.append(np.concatenate([x[i : i + 1].numpy(), probs]))
    return image_rows(rows, [f"x (y={int(v)})" for v in y],
                      run_title(cfg, "style transfer: encode with the true y, decode with each y'"),
                      col_labels=["input"] + [f"y'={d}" for d in range(NUM_CLASSES)])


def per_label_loglik(cvae, x, num_samples: int, memory: int = 1 << 30) -> np.ndarray:
    """``(N, 10)``: the IWAE estimate of log p(x | y') for every image and every label y'."""
    out = np.empty((x.shape[0], NUM_CLASSES))
    for d in range(NUM_CLASSES):
        y = torch.full((x.shape[0],), d, dtype=torch.long)
        est = estimate_log_marginal(cvae.model, cvae.guide, x, y, num_samples=num_samples,
                                    memory=memory)
        out[:, d] = est.log_marginal
    return out


def label_prior(train_labels) -> np.ndarray:
    """p(y) from the training label frequencies."""
    counts = np.bincount(np.asarray(train_labels), minlength=NUM_CLASSES).astype(float)
    return counts / counts.sum()


def classify(ll: np.ndarray, prior: np.ndarray):
    """log p(y | x) = log p(x | y) + log p(y) - log sum_y' p(x | y') p(y'), and log p(x)."""
    joint = ll + np.log(prior)
    log_px = np.logaddexp.reduce(joint, axis=1)
    return joint - log_px[:, None], log_px


def confusion_figure(true, pred, cfg, k: int):
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), int)
    np.add.at(cm, (true, pred), 1)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(cm, cmap="Blues")
    for i in range(NUM_CLASSES):
        for j in range(NUM_CLASSES):
            if cm[i, j]:
                ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xlabel("predicted argmax_y p(y | x)")
    ax.set_ylabel("true label")
    ax.set_xticks(range(NUM_CLASSES))
    ax.set_yticks(range(NUM_CLASSES))
    acc = float(np.mean(true == pred))
    ax.set_title(run_title(cfg, f"generative classifier, IWAE K={k}: accuracy {acc:.1%}"), fontsize=8)
    return fig


def confident_wrong_figure(x, true, log_post, cfg, n: int = 10):
    pred = log_post.argmax(1)
    wrong = np.flatnonzero(pred != true)
    conf = log_post[wrong, pred[wrong]]
    pick = wrong[np.argsort(conf)[::-1][:n]]
    if pick.size == 0:
        pick = np.argsort(log_post[np.arange(len(true)), true])[:n]
        what = "no errors: least confident correct"
    else:
        what = "most confidently wrong"
    cols = [f"{true[i]}→{pred[i]} p={math.exp(log_post[i, pred[i]]):.2f}" for i in pick]
    return image_rows([x[pick]], [what], run_title(cfg, f"generative classifier: {what}"),
                      col_labels=cols, size=1.1)


def report(run_dir, cfg, system, data, est, options: Options) -> list:
    options.check()  # --baseline first: before any figure is drawn
    cvae = system.cpu()
    part = data.split(options.split)
    part = part.subset(options.limit, options.spread)
    if part.y is None:
        raise GenlabError("the conditional VAE report needs labelled images")
    x, y = part.x.cpu(), part.y.cpu()
    yn = y.numpy()
    torch.manual_seed(options.seed)
    paths = [save(styles_figure(cvae, cfg), run_dir, "styles"),
             save(style_transfer_figure(cvae, x[:6], y[:6], cfg), run_dir, "style_transfer")]
    k = est.num_samples
    paths.append(save(loglik_by_digit_figure(est.log_marginal, yn, cfg, k, "log p(x | y)"),
                      run_dir, "loglik_given_label_by_digit"))
    print(f"log p(x | y) by digit (IWAE K={k}) and ELBO, nats per image:")
    for d in range(NUM_CLASSES):
        sel = yn == d
        if sel.any():
            print(f"  {d}: IWAE {est.log_marginal[sel].mean():9.2f}   ELBO {est.elbo[sel].mean():9.2f}"
                  f"   n={int(sel.sum())}")
    kc = options.classifier_k
    ll = per_label_loglik(cvae, x, kc, int(options.memory_gb * (1 << 30)))
    prior = label_prior(data.train.y.cpu())
    log_post, log_px_mix = classify(ll, prior)
    pred = log_post.argmax(1)
    acc = float(np.mean(pred == yn))
    np.savez(Path(run_dir) / f"classifier_{options.split}.npz", loglik_per_label=ll, prior=prior,
             log_posterior=log_post, labels=yn)
    print(f"generative classifier p(y|x) ∝ p(x|y) p(y), IWAE K={kc} per label, p(y) = training "
          f"frequencies: test accuracy {acc:.2%} on {len(yn)} images. {CLASSIFIER_NOTE}")
    paths.append(save(confusion_figure(yn, pred, cfg, kc), run_dir, "classifier_confusion"))
    paths.append(save(confident_wrong_figure(x.numpy(), yn, log_post, cfg), run_dir,
                      "classifier_confidently_wrong"))
    if options.baseline:
        _, vae, _ = load_run(options.baseline, options.data_dir, "cpu", expect_system="vae")
        if vae.latent_dim != cvae.latent_dim:
            print(f"note: the baseline VAE has d={vae.latent_dim}, the CVAE d={cvae.latent_dim}")
        log_px = estimate_log_marginal(vae.model, vae.guide, x, num_samples=k).log_marginal
        # the classifier's own estimates of log p(x | y) (same K), so the two sides differ
        # by exactly the mixture-vs-VAE term printed below, not by Monte Carlo noise
        lhs = ll[np.arange(len(yn)), yn] - log_px
        rhs = log_post[np.arange(len(yn)), yn] - np.log(prior[yn])
        se = lambda a: a.std(ddof=1) / np.sqrt(a.size)  # noqa: E731
        print("Bayes' rule: log p(x|y) - log p(x) = log p(y|x) - log p(y) for every image.")
        print(f"  left,  CVAE log p(x|y) - VAE log p(x):          {lhs.mean():8.3f} ± {se(lhs):.3f}"
              f"   (CVAE at K={kc}, VAE at K={k})")
        print(f"  right, log p(y|x) - log p(y) (classifier):      {rhs.mean():8.3f} ± {se(rhs):.3f}")
        gap = log_px_mix - log_px
        print(f"  their difference is the CVAE's mixture log sum_y p(x|y)p(y) minus the VAE's "
              f"log p(x): {gap.mean():.3f} ± {se(gap):.3f}")
    return paths
