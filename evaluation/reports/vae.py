r"""The VAE study's figures (study 2, parts c-e): ``python -m evaluation RUN_DIR --report``.

Every figure is a function of a trained :class:`models.vae.VAE` and test images, so the
notebook calls the same functions.  Conventions, stated once:

* Two sources of randomness: z ~ q(z | x) (or the prior N(0, I_d)), then pixels
  x_j ~ Bernoulli(sigmoid(f(z)_j)).  "Probabilities" panels show sigmoid(f(z)) in grey levels;
  "samples" panels show Bernoulli draws from them.
* Log-likelihoods are importance-weighted estimates of log p(x) (IWAE at the run's K),
  in nats per image; the ELBO is shown beside them where it matters.

Options: :class:`Options` (``--digit``) for the report, :class:`CompareOptions` (``--out``) for
``python -m evaluation compare RUN_A RUN_B``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import matplotlib.pyplot as plt
import numpy as np
import torch

from evaluation.api import EvalOptions, evaluate
from evaluation.plotting import image_rows, run_title, save
from inference.importance import KHAT_PSIS, KHAT_RAW
from models.common import GenlabError, option
from models.iwae import active_units as unit_activity

FLIP_RATES = (0.0, 0.05, 0.1, 0.2, 0.3)
BLOCKS = (8, 14)


@dataclass
class Options(EvalOptions):
    """``python -m evaluation RUN_DIR --report`` of a ``vae`` run."""

    digit: int = option(6, "the digit class whose most and least likely test images are shown")

    def check(self) -> None:
        super().check()
        if not 0 <= self.digit <= 9:
            raise GenlabError(f"--digit must be a digit class 0-9, got {self.digit}")


@dataclass
class CompareOptions(EvalOptions):
    """``python -m evaluation compare RUN_A RUN_B`` of two ``vae`` runs."""

    out: Optional[str] = option(None, "folder for the comparison figures (default "
                                "RUN_A/figures)")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


@torch.no_grad()
def posterior_draws(vae, x: torch.Tensor, n: int):
    """(loc, scale, z) with z of shape (n, N, d): n draws from q(z | x) per image."""
    loc, scale = vae.encode(x)
    return loc, scale, loc + scale * torch.randn((n, *loc.shape))


@torch.no_grad()
def reconstruction_figure(vae, x: torch.Tensor, cfg, n_draws: int = 3):
    """Input; n_draws draws of z ~ q(z|x) shown as Bernoulli probabilities; pixel samples."""
    _, _, z = posterior_draws(vae, x, n_draws)
    probs = torch.sigmoid(vae.decode(z))
    rows = [_np(x)] + [_np(p) for p in probs] + [_np(torch.bernoulli(probs[0]))]
    labels = (["input x"] + [f"p(x|z{i + 1}), z{i + 1}~q(z|x)" for i in range(n_draws)]
              + ["x' ~ Bern(p(x|z1))"])
    return image_rows(rows, labels, run_title(cfg, "reconstruction: z ~ q(z|x), then Bernoulli pixels"))


@torch.no_grad()
def generation_figure(vae, cfg, n: int = 10, rows: int = 2):
    """New images: z ~ N(0, I_d); probabilities and Bernoulli samples, row by row."""
    out, labels = [], []
    for r in range(rows):
        p = torch.sigmoid(vae.decode(torch.randn(n, vae.latent_dim)))
        out += [_np(p), _np(torch.bernoulli(p))]
        labels += [f"p(x|z), z~N(0,I) [{r + 1}]", f"x ~ Bern(p) [{r + 1}]"]
    return image_rows(out, labels, run_title(cfg, "generation from the prior"))


def corrupt(x: torch.Tensor, kind: str, level) -> torch.Tensor:
    """Pixel flips at rate ``level`` or a ``level`` x ``level`` occluded (zeroed) central block."""
    if kind == "flip":
        return torch.where(torch.rand_like(x) < level, 1 - x, x)
    img = x.clone().reshape(-1, 28, 28)
    a = (28 - level) // 2
    img[:, a : a + level, a : a + level] = 0
    return img.reshape(x.shape)


@torch.no_grad()
def corruption_figure(vae, x: torch.Tensor, cfg, flip_rates=FLIP_RATES, blocks=BLOCKS):
    """Rows = noise level; columns = (corrupted input, reconstruction at the posterior mean)."""
    rows, labels = [], []
    levels = [("flip", r) for r in flip_rates] + [("block", b) for b in blocks]
    for kind, level in levels:
        xc = corrupt(x, kind, level)
        rec = torch.sigmoid(vae.decode(vae.encode(xc)[0]))
        pair = np.empty((2 * len(x), x.shape[1]))
        pair[0::2], pair[1::2] = _np(xc), _np(rec)
        rows.append(pair)
        labels.append(f"flip {level:.0%}" if kind == "flip" else f"{level}x{level} block")
    cols = ["input", "recon."] * len(x)
    return image_rows(rows, labels, run_title(cfg, "reconstruction p(x|z=E_q[z]) of corrupted inputs"),
                      col_labels=cols)


@torch.no_grad()
def interpolation_figure(vae, x1: torch.Tensor, x2: torch.Tensor, cfg, steps: int = 10):
    """Three interpolations from x1 to x2, one row each (see the caption)."""
    loc, scale = vae.encode(torch.stack([x1, x2]))
    t = torch.linspace(0, 1, steps)[:, None]
    means = (1 - t) * loc[0] + t * loc[1]
    z = loc + scale * torch.randn_like(loc)
    samples = (1 - t) * z[0] + t * z[1]
    mix_scale = (1 - t) * scale[0] + t * scale[1]
    mixed = means + mix_scale * torch.randn_like(means)
    rows = [_np(torch.sigmoid(vae.decode(v))) for v in (means, samples, mixed)]
    rows = [np.concatenate([_np(x1)[None], r, _np(x2)[None]]) for r in rows]
    labels = ["(a) between means", "(b) between samples", "(c) interpolated q"]
    cols = ["x1"] + [f"t={v:.2f}" for v in t[:, 0].tolist()] + ["x2"]
    fig = image_rows(rows, labels, run_title(cfg, "interpolation in latent space"), col_labels=cols)
    fig.text(0.01, -0.08,
             "Each panel shows p(x|z) as grey levels. (a) z_t = (1-t)mu1 + t mu2: the path of the "
             "posterior means, deterministic.\n(b) z1~q(z|x1), z2~q(z|x2) drawn once, z_t = (1-t)z1 + "
             "t z2: one random path. (c) z_t ~ N((1-t)mu1 + t mu2, ((1-t)sigma1 + t sigma2)^2),\n"
             "a fresh draw at each t from the interpolated posterior. None is 'the' answer: (a) "
             "shows the decoder's mean path, (b) and (c) show the uncertainty q carries.",
             fontsize=7, va="top")
    return fig


def loglik_by_digit_figure(loglik: np.ndarray, labels, cfg, k: int, quantity: str = "log p(x)"):
    """Per-image log-likelihood by digit class: small multiples, one panel per digit on a shared
    x axis (the histogram of all images in grey behind each), the class mean marked."""
    bins = np.linspace(np.percentile(loglik, 0.5), loglik.max(), 60)
    xlabel = f"{quantity}, IWAE K={k} (nats per image)"
    title = run_title(cfg, f"test {quantity} by digit, n={loglik.size}")
    if labels is None:
        fig, ax = plt.subplots(figsize=(8, 3.6))
        ax.hist(loglik, bins=bins, color="0.4")
        ax.axvline(loglik.mean(), color="k", lw=1, label=f"mean {loglik.mean():.1f}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("images")
        ax.legend(fontsize=8)
        ax.set_title(title + " (no labels: all images)", fontsize=9)
        return fig
    fig, axes = plt.subplots(5, 2, figsize=(9, 8.5), sharex=True, squeeze=False)
    cmap = plt.get_cmap("tab10")
    for d, ax in enumerate(axes.T.ravel()):  # digits 0-4 down the left column, 5-9 the right
        sel = loglik[labels == d]
        ax.hist(loglik, bins=bins, color="0.88", density=True)
        if sel.size:
            ax.hist(sel, bins=bins, color=cmap(d), alpha=0.85, density=True)
            ax.axvline(sel.mean(), color="k", lw=1)
        mean = f"mean {sel.mean():.1f}" if sel.size else "no images"
        ax.text(0.01, 0.93, f"digit {d}: {mean}, n={sel.size}", transform=ax.transAxes,
                fontsize=8, va="top")
        ax.set_yticks([])
    for ax in axes[-1]:
        ax.set_xlabel(xlabel, fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("density", fontsize=7)
    fig.suptitle(title + "\ncolour: the digit's images; grey: all images; black line: the "
                 "digit's mean", fontsize=9)
    fig.tight_layout()
    return fig


def likely_images_figure(loglik, x, labels, digit: int, cfg, k: int, n: int = 8):
    """The most and the least likely test images of one digit, with their log p(x)."""
    if labels is None:
        idx = np.arange(len(loglik))
        what = "all images (no labels)"
    else:
        idx = np.flatnonzero(labels == digit)
        what = f"digit {digit}"
        if idx.size == 0:
            raise GenlabError(f"no test images of digit {digit} among those evaluated")
    order = idx[np.argsort(loglik[idx])]
    top, bottom = order[::-1][:n], order[:n]
    fig = image_rows([x[top], x[bottom]], ["most likely", "least likely"],
                     run_title(cfg, f"{what}: most and least likely (IWAE K={k})"),
                     col_labels=[f"{loglik[i]:.1f}" for i in top])
    for j, i in enumerate(bottom):
        fig.axes[len(top) + j].set_xlabel(f"{loglik[i]:.1f}", fontsize=8)
    return fig


def bounds_figure(est, cfg):
    """ELBO and IWAE_k for every k on one plot, with the gap; k-hat distribution beside it.

    Error bars are standard errors of the paired per-image gap IWAE_k - ELBO: the spread of
    log p(x) across images is common to both and says nothing about their difference.
    """
    ks = sorted(est.iwae)
    means = np.array([est.iwae[k].mean() for k in ks])
    gaps = [est.iwae[k] - est.elbo for k in ks]
    ses = np.array([g.std(ddof=1) / np.sqrt(est.n) if est.n > 1 else 0.0 for g in gaps])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    ax.errorbar(ks, means, yerr=ses, marker="o", capsize=3,
                label="IWAE_k (bars: s.e. of IWAE_k - ELBO)")
    ax.axhline(est.elbo.mean(), color="C3", ls="--", label=f"ELBO {est.elbo.mean():.2f}")
    for k, m in zip(ks, means):
        ax.annotate(f"{m:.2f}", (k, m), textcoords="offset points", xytext=(4, -12), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("k (importance samples)")
    ax.set_ylabel("mean over images, nats per image")
    gap = est.log_marginal.mean() - est.elbo.mean()
    ax.set_title(f"IWAE_K - ELBO = {gap:.2f} nats at K={est.num_samples}", fontsize=9)
    ax.margins(y=0.15)  # room for the value labels below the points
    # below the axes, so that it can cover neither a point nor its value
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    finite = est.khat[np.isfinite(est.khat)]  # psislw gives inf when K is too small to fit a tail
    bx.hist(finite if finite.size else [0.0], bins=40, color="0.4", label="images")
    for v, c, what in ((KHAT_RAW, "C2", f"{KHAT_RAW}: raw IWAE unreliable above"),
                       (KHAT_PSIS, "C3", f"{KHAT_PSIS}: PSIS unreliable above")):
        bx.axvline(v, color=c, ls=":", lw=1.5, label=f"k-hat = {what}")
    n_inf = int((~np.isfinite(est.khat)).sum())
    bx.set_xlabel("Pareto k-hat per image (K draws)" + (f"; {n_inf} not estimable" if n_inf else ""))
    bx.set_ylabel("images")
    bx.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    bx.set_title(f"k-hat > {KHAT_RAW}: {np.mean(est.khat > KHAT_RAW):.1%}, > {KHAT_PSIS}: "
                 f"{np.mean(est.khat > KHAT_PSIS):.1%} of images", fontsize=9)
    fig.suptitle(run_title(cfg, f"ELBO vs IWAE, n={est.n}"), fontsize=9)
    fig.tight_layout()
    return fig


def active_units(vae, x: torch.Tensor, threshold: float = 0.01):
    """Burda et al.'s activity A_u = Cov_x(E_q[z_u]) per latent unit, and the active count
    (:func:`models.iwae.active_units`, the one implementation, for the single layer ``z``)."""
    count, var = unit_activity(vae, x, threshold)["z"]
    return var, count


def active_units_figure(var: np.ndarray, cfg, threshold: float = 0.01):
    order = np.argsort(var)[::-1]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(np.arange(var.size), var[order], color=np.where(var[order] > threshold, "C0", "0.7"))
    ax.axhline(threshold, color="C3", ls="--", label=f"threshold {threshold}")
    ax.set_yscale("log")
    ax.set_xlabel("latent unit (sorted)")
    ax.set_ylabel("Cov_x(E_q[z_u])")
    ax.legend(fontsize=8)
    ax.set_title(run_title(cfg, f"active units: {int((var > threshold).sum())} of {var.size}"),
                 fontsize=9)
    return fig


def report(run_dir, cfg, system, data, est, options: Options) -> list:
    """All the single-run figures into RUN_DIR/figures/."""
    options.check()
    digit = options.digit
    part = data.split(options.split)
    part = part.subset(options.limit, options.spread)
    x = part.x.cpu()
    labels = None if part.y is None else part.y.cpu().numpy()
    k = est.num_samples
    vae = system.cpu()
    paths = []
    torch.manual_seed(options.seed)
    pick = x[:8]
    paths.append(save(reconstruction_figure(vae, pick, cfg), run_dir, "reconstruction"))
    paths.append(save(generation_figure(vae, cfg), run_dir, "generation"))
    paths.append(save(corruption_figure(vae, x[:6], cfg), run_dir, "corruption"))
    j = 1 if len(x) > 1 else 0
    if labels is not None:  # two different digits, when labels say which
        diff = np.flatnonzero(labels != labels[0])
        j = int(diff[0]) if diff.size else j
    paths.append(save(interpolation_figure(vae, x[0], x[j], cfg), run_dir, "interpolation"))
    ll = est.log_marginal
    paths.append(save(loglik_by_digit_figure(ll, labels, cfg, k), run_dir, "loglik_by_digit"))
    paths.append(save(likely_images_figure(ll, _np(x), labels, digit, cfg, k), run_dir,
                      f"likely_unlikely_digit{digit}"))
    paths.append(save(bounds_figure(est, cfg), run_dir, "elbo_vs_iwae"))
    var, n_active = active_units(vae, x)
    paths.append(save(active_units_figure(var, cfg), run_dir, "active_units"))
    print(f"active units (Cov_x E_q[z_u] > 0.01): {n_active} of {var.size}")
    return paths


def compare_headline(la: np.ndarray, lb: np.ndarray) -> dict:
    """B - A per image: mean, its standard error, and the share of images where B is better."""
    diff = lb - la
    se = float(np.std(diff, ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else float("nan")
    return dict(mean=float(np.mean(diff)), se=se, b_better=float(np.mean(lb > la)), n=int(diff.size))


def compare(run_dirs, options: CompareOptions) -> list:
    """Per-image log-likelihood of run A against run B on the same images, where each wins
    most, and both runs' generated images on one figure; prints the headline numbers."""
    if len(run_dirs) != 2:
        raise GenlabError("the VAE comparison takes exactly two runs")
    runs = []
    for d in run_dirs:
        ev = evaluate(d, options.k, options.split, options.limit, options.seed,
                      options.memory_gb, options.data_dir, "cpu", None, options.spread)
        runs.append((d, ev.config, ev.system, ev.data, ev.estimate))
    (da, ca, va, data, ea), (db, cb, vb, _, eb) = runs
    if ea.n != eb.n:
        raise GenlabError("the two runs were evaluated on different numbers of images")
    part = data.split(options.split)
    part = part.subset(options.limit, options.spread)
    x, labels = _np(part.x.cpu()), None if part.y is None else part.y.cpu().numpy()
    out, sub = (Path(options.out), "") if options.out else (Path(da), "figures")
    name_a = f"A: {Path(da).name}"
    name_b = f"B: {Path(db).name}"
    k = ea.num_samples
    la, lb = ea.log_marginal, eb.log_marginal
    h = compare_headline(la, lb)
    print(f"A: {da}\nB: {db}\n"
          f"B - A = {h['mean']:.2f} ± {h['se']:.2f} nats/image (mean ± standard error, IWAE "
          f"K={k}, {options.split} n={h['n']}); B better on {h['b_better']:.0%} of images")
    fig, ax = plt.subplots(figsize=(5.6, 5.4))
    c = labels if labels is not None else "0.3"
    sc = ax.scatter(la, lb, c=c, cmap="tab10", s=4, alpha=0.6, vmin=-0.5, vmax=9.5)
    lo, hi = min(la.min(), lb.min()), max(la.max(), lb.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="equal")
    ax.set_xlabel(f"{name_a}  log p(x)")
    ax.set_ylabel(f"{name_b}  log p(x)")
    if labels is not None:
        fig.colorbar(sc, ax=ax, ticks=range(10), label="digit")
    ax.set_title(f"B - A = {h['mean']:.2f} ± {h['se']:.2f} nats/image; B better on "
                 f"{h['b_better']:.0%}", fontsize=9)
    ax.legend(fontsize=8)
    fig.suptitle(f"{run_title(ca)}\nvs {run_title(cb)} · IWAE K={k}, {options.split} n={la.size}",
                 fontsize=8)
    paths = [save(fig, out, "compare_loglik", sub)]
    diff = lb - la
    b_wins, a_wins = np.argsort(diff)[::-1][:8], np.argsort(diff)[:8]
    fig = image_rows([x[b_wins], x[a_wins]], ["B wins most", "A wins most"],
                     f"where each model wins, B - A in nats (IWAE K={k})\nA: {run_title(ca)}"
                     f"\nB: {run_title(cb)}",
                     col_labels=[f"{diff[i]:+.1f}" for i in b_wins])
    for j, i in enumerate(a_wins):
        fig.axes[len(b_wins) + j].set_xlabel(f"{diff[i]:+.1f}", fontsize=8)
    paths.append(save(fig, out, "compare_winners", sub))
    torch.manual_seed(options.seed)
    rows, row_labels = [], []
    with torch.no_grad():
        for name, vae in ((name_a, va), (name_b, vb)):
            for r in range(2):
                rows.append(_np(torch.sigmoid(vae.decode(torch.randn(10, vae.latent_dim)))))
                row_labels.append(f"{name} d={vae.latent_dim} [{r + 1}]")
    title = f"generated p(x|z), z ~ N(0, I_d)\nA: {run_title(ca)}\nB: {run_title(cb)}"
    paths.append(save(image_rows(rows, row_labels, title),
                      out, "compare_generation", sub))
    return paths
