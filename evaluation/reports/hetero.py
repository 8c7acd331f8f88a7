r"""Figures and tables of the heteroscedastic-regression study (issue 7).

``python -m evaluation RUN_DIR --report`` draws one run; ``python -m evaluation compare RUN_A
RUN_B ...`` superimposes several (e.g. homo, hetero and the remedies) on shared axes and writes
the remedies table ``hetero_compare.md`` / ``.json``.  Conventions, stated once:

* Held-out log-likelihood is :math:`\frac1N \sum_i \log p(y_i \mid x_i)` on the test split, in
  nats per point: exact for the maximum-likelihood variants (it equals the estimator's
  per-datapoint value there), and for ``bayes`` the Monte Carlo posterior predictive
  :math:`\log \frac1S \sum_s \mathcal N(y_i; f_{w_s}(x_i), \sigma_{w_s}(x_i)^2)`, ``w_s ~ q``,
  S = ``PREDICTIVE_SAMPLES``, drawn with the evaluation seed.
* RMSE is of the predictive mean (for ``bayes`` the mixture mean :math:`\frac1S\sum_s f_{w_s}`).
* Bands are ±2 predictive standard deviations (for ``bayes``
  :math:`\sqrt{\overline{\sigma_s^2} + \mathrm{Var}_s f_{w_s}}`, weight uncertainty included).
* Calibration: PIT values :math:`F_i(y_i)` of the predictive CDF; central-interval coverage from
  them (:func:`evaluation.metrics.central_coverage`).
* A *dip* is a training step after which the training log-likelihood (``loglik`` in
  ``steps.csv``, the true log-likelihood of the step's batch, whatever the training objective)
  is more than ``DIP_THRESHOLD`` nats per point below its value one step before.

Options: :class:`Options` (the evaluation's own, nothing more) and :class:`CompareOptions`
(``--out``).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import matplotlib.pyplot as plt
import numpy as np
import torch

from evaluation.api import EvalOptions, load_run
from evaluation.metrics import central_coverage, pit_histogram
from evaluation.plotting import run_title, save
from inference.data import wiggles_mean, wiggles_noise_scale
from inference.runner import RunConfig
from models.common import GenlabError, option
from models.hetero import hetero_args

LEVELS = (0.5, 0.9, 0.95)
PREDICTIVE_SAMPLES = 200
DIP_THRESHOLD = 0.5
COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown",
          "tab:pink", "tab:olive", "tab:cyan", "tab:gray")


@dataclass
class Options(EvalOptions):
    """``python -m evaluation RUN_DIR --report`` of a ``hetero`` run: held-out metrics on
    ``--split`` (seeded by ``--seed``); the dips come from the run's ``steps.csv``."""


@dataclass
class CompareOptions(Options):
    """``python -m evaluation compare RUN ...`` of ``hetero`` runs trained on the same data."""

    out: Optional[str] = option(None, "folder whose figures/ receives the comparison figures "
                                "and the remedies table (default the first run's)")


# ----------------------------------------------------------------------------- the study's runs
#: Shared by benchmarks/hetero_targets.py and the notebook: full-batch training (one step per
#: epoch, so ``steps.csv`` holds the full training log-likelihood at every step) on the default
#: wiggles set, MLPs 1-50-50-1 tanh, Adam lr 1e-2 (the setting that provokes the dips); each
#: remedy changes one thing from ``hetero``.
STUDY_DATA = dict(dataset="wiggles", n_train=500, n_valid=500, n_test=1000, data_seed=0)
SMOKE_DATA = dict(dataset="wiggles", n_train=60, n_valid=30, n_test=40, data_seed=0)
_NET = dict(variant="hetero", hidden=[50, 50], activation="tanh")
STUDY = {
    "homo": dict(system_args=dict(_NET, variant="homo")),
    "hetero": dict(system_args=_NET),
    "floor": dict(system_args=dict(_NET, sigma_floor=0.05)),
    "beta05": dict(system_args=dict(_NET, beta=0.5)),
    "beta1": dict(system_args=dict(_NET, beta=1.0)),
    "lr1e-3": dict(system_args=_NET, lr=1e-3),
    "clip": dict(system_args=_NET, optimizer="clipped_adam", clip_norm=1.0),
    "bayes": dict(system_args=dict(_NET, variant="bayes"), loss="TraceMeanField_ELBO"),
}


def study_config(name: str, epochs: int = 1500, smoke: bool = False):
    """The RunConfig of one of the study's runs (``smoke``: 60 training points, small nets)."""
    if name not in STUDY:
        raise GenlabError(f"unknown study run {name!r}; choose one of {', '.join(STUDY)}")
    spec = dict(STUDY[name])
    args = dict(spec.pop("system_args"), **({"hidden": [8]} if smoke else {}))
    data = SMOKE_DATA if smoke else STUDY_DATA
    base = dict(system="hetero", system_args=hetero_args(**args), data_args=dict(data),
                epochs=epochs, batch_size=data["n_train"], lr=1e-2, seed=0, loss="Trace_ELBO")
    return RunConfig(**dict(base, **spec))


# ----------------------------------------------------------------------------- numbers
def label(cfg) -> str:
    """A short name of a run: its variant and whatever remedy it uses."""
    a = cfg.system_args
    bits = [a.get("variant", "?")]
    if a.get("sigma_floor", 0) and a["sigma_floor"] > 1e-5:
        bits.append(f"floor={a['sigma_floor']:g}")
    if a.get("beta"):
        bits.append(f"β-NLL β={a['beta']:g}")
    if cfg.optimizer == "clipped_adam":
        bits.append(f"clip={cfg.clip_norm:g}")
    bits.append(f"lr={cfg.lr:g}")
    return " ".join(bits)


def settings(cfg) -> str:
    """The run's training settings for titles: variant, options, optimizer, batch, steps."""
    a = cfg.system_args
    return (f"{label(cfg)}, floor {a.get('sigma_floor', 0):g}, {cfg.optimizer}, "
            f"batch {cfg.batch_size}, {cfg.epochs} epochs, seed {cfg.seed}")


@torch.no_grad()
def predictive(system, x: torch.Tensor, seed: int = 0, num_samples: int = PREDICTIVE_SAMPLES):
    """(mean, sd) of the predictive distribution at ``x`` ``(N, 1)``, each ``(N,)`` numpy."""
    g = torch.Generator().manual_seed(seed)
    m, s = system.predictive_samples(x, num_samples, g)
    mean = m.mean(0)
    sd = (s.pow(2).mean(0) + m.var(0, unbiased=False)).sqrt()
    return mean.numpy(), sd.numpy()


@torch.no_grad()
def held_out(system, split, seed: int = 0, num_samples: int = PREDICTIVE_SAMPLES) -> dict:
    """Log-likelihood per point (mean, se), RMSE, coverage at LEVELS and PIT values of a split."""
    x, y = split.x.cpu(), split.y.cpu()
    lp = system.log_predictive(x, y, num_samples, torch.Generator().manual_seed(seed)).numpy()
    pit = system.predictive_cdf(x, y, num_samples, torch.Generator().manual_seed(seed)).numpy()
    mean, _ = predictive(system, x, seed, num_samples)
    cov = central_coverage(pit, LEVELS)
    return dict(n=int(lp.size), loglik=float(lp.mean()),
                loglik_se=float(lp.std(ddof=1) / math.sqrt(lp.size)),
                rmse=float(np.sqrt(np.mean((y.numpy() - mean) ** 2))),
                coverage={f"{p:g}": float(c) for p, c in zip(LEVELS, cov)},
                pit=pit, loglik_points=lp)


def read_steps(run_dir) -> dict:
    """``steps.csv`` as a dict of float arrays (columns by name)."""
    path = Path(run_dir) / "steps.csv"
    if not path.exists():
        raise GenlabError(f"{run_dir} has no steps.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows or "loglik" not in rows[0]:
        raise GenlabError(f"{path} has no 'loglik' column: it was not written by the hetero system")
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def find_dips(steps: dict, threshold: float = DIP_THRESHOLD) -> list:
    """The dips (module docstring): one dict per step, with the step's diagnostics."""
    ll = steps["loglik"]
    fall = np.diff(ll)
    out = []
    for i in np.nonzero(fall < -threshold)[0] + 1:
        row = {k: float(v[i]) for k, v in steps.items()}
        row["before"] = float(ll[i - 1])
        row["fall"] = float(fall[i - 1])
        out.append(row)
    return out


def dip_summary(steps: dict, threshold: float = DIP_THRESHOLD) -> dict:
    """Counts and medians of the dips: how many, the largest fall, who carries them."""
    dips = find_dips(steps, threshold)

    def med(k):  # median over the dips where the column is defined (NaN if none)
        v = [d[k] for d in dips if k in d and np.isfinite(d[k])]
        return float(np.median(v)) if v else float("nan")

    return dict(threshold=threshold, count=len(dips),
                largest_fall=float(min((d["fall"] for d in dips), default=0.0)),
                median_min_sigma=med("min_sigma"),
                median_small_sigma_share=med("drop_small_sigma_share"),
                median_top10_share=med("drop_top10_share"),
                median_loser_abs_z=med("loser_abs_z"),
                final_loglik=float(steps["loglik"][-1]),
                best_loglik=float(np.max(steps["loglik"])),
                min_sigma_overall=float(np.min(steps["min_sigma"])))


def _add_z(steps: dict) -> dict:
    steps = dict(steps)
    steps["loser_z"] = steps["drop_resid"] / steps["drop_sigma"]
    steps["loser_abs_z"] = np.abs(steps["loser_z"])
    return steps


# ----------------------------------------------------------------------------- figures
def _truth(cfg):
    if cfg.data_args.get("dataset") != "wiggles":
        return None
    return wiggles_mean, wiggles_noise_scale


def _grid(data, n: int = 400) -> torch.Tensor:
    xs = torch.cat([data.train.x, data.test.x])[:, 0]
    return torch.linspace(float(xs.min()), float(xs.max()), n).unsqueeze(1)


def fit_figure(runs, data, title: str, zoom=(-4.0, -2.0)):
    """Data with each run's mean ±2 sd band, superimposed; right: the near-noise-free region."""
    truth = _truth(runs[0][1])
    grid = _grid(data)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw=dict(width_ratios=(2, 1)))
    for ax, lim in zip(axes, (None, zoom if truth else None)):
        ax.scatter(data.train.x[:, 0], data.train.y, s=4, c="0.55", label="training data", zorder=1)
        if truth:
            ax.plot(grid[:, 0], truth[0](grid[:, 0]), "k--", lw=1, label="true mean", zorder=3)
        for (name, _cfg, system), color in zip(runs, COLORS):
            m, sd = predictive(system, grid)
            ax.plot(grid[:, 0], m, color=color, lw=1.3, label=f"{name}: mean", zorder=4)
            ax.fill_between(grid[:, 0], m - 2 * sd, m + 2 * sd, color=color, alpha=0.18,
                            label=f"{name}: ±2 sd", zorder=2)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        if lim is not None:
            sel = (grid[:, 0] >= lim[0]) & (grid[:, 0] <= lim[1])
            t = truth[0](grid[sel, 0])
            ax.set_xlim(*lim)
            ax.set_ylim(float(t.min()) - 0.3, float(t.max()) + 0.3)
            ax.set_title(f"zoom on x in [{lim[0]:g}, {lim[1]:g}] (true noise sd ≈ 0.01)", fontsize=9)
            ax.xaxis.set_major_locator(plt.MaxNLocator(5))
    axes[0].legend(fontsize=7, ncol=2, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def fit_grid(runs, data, title: str, zoom=(-4.0, -2.0)):
    """One column per run (shared axes): top the whole range, bottom the near-noise-free zoom."""
    truth = _truth(runs[0][1])
    grid = _grid(data)
    n = len(runs)
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n + 0.6, 5.6), sharey="row", sharex="row",
                             squeeze=False)
    for j, ((name, _cfg, system), color) in enumerate(zip(runs, COLORS)):
        m, sd = predictive(system, grid)
        for i, ax in enumerate(axes[:, j]):
            ax.scatter(data.train.x[:, 0], data.train.y, s=2, c="0.6")
            if truth:
                ax.plot(grid[:, 0], truth[0](grid[:, 0]), "k--", lw=0.8)
            ax.plot(grid[:, 0], m, color=color, lw=1.2)
            ax.fill_between(grid[:, 0], m - 2 * sd, m + 2 * sd, color=color, alpha=0.25)
            if i == 1 and truth:
                sel = (grid[:, 0] >= zoom[0]) & (grid[:, 0] <= zoom[1])
                t = truth[0](grid[sel, 0])
                ax.set_xlim(*zoom)
                ax.set_ylim(float(t.min()) - 0.25, float(t.max()) + 0.25)
            ax.set_xlabel("x", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[0, j].set_title(name, fontsize=8, color=color)
    axes[0, 0].set_ylabel("y: mean ±2 sd")
    axes[1, 0].set_ylabel(f"zoom x in [{zoom[0]:g}, {zoom[1]:g}]")
    fig.suptitle(title + "  (dashed: true mean)", fontsize=9)
    fig.tight_layout()
    return fig


def sigma_figure(runs, data, title: str):
    """σ(x) of each run (predictive sd for bayes) against the true noise scale, log scale."""
    truth = _truth(runs[0][1])
    grid = _grid(data)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    if truth:
        ax.plot(grid[:, 0], truth[1](grid[:, 0]), "k--", lw=1.2, label="true noise sd s(x)")
    for (name, _cfg, system), color in zip(runs, COLORS):
        _, sd = predictive(system, grid)
        ax.plot(grid[:, 0], sd, color=color, lw=1.3, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("x")
    ax.set_ylabel("σ(x) (bayes: predictive sd)")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return fig


def training_figure(runs_steps, title: str, threshold: float = DIP_THRESHOLD):
    """Training log-likelihood per step superimposed (dips marked), and min σ(x_i) per step."""
    fig, axes = plt.subplots(2, 1, figsize=(10, 6.2), sharex=True,
                             gridspec_kw=dict(height_ratios=(2, 1)))
    lows = []
    for (name, steps), color in zip(runs_steps, COLORS):
        ll = steps["loglik"]
        axes[0].plot(steps["step"], ll, color=color, lw=0.9, label=name)
        dips = find_dips(steps, threshold)
        if dips:
            axes[0].scatter([d["step"] for d in dips], [d["loglik"] for d in dips], s=14,
                            color=color, marker="v", zorder=5)
        axes[1].plot(steps["step"], steps["min_sigma"], color=color, lw=0.9)
        lows.append(np.min(ll[len(ll) // 20:]))  # the deepest dip after the first 5 % of steps
    hi = max(np.max(s["loglik"]) for _, s in runs_steps)
    axes[0].set_ylim(min(min(lows), hi - 1) - 0.3, hi + 0.3)
    axes[0].set_ylabel("training log-lik (nats / point)")
    axes[0].legend(fontsize=7, loc="lower right")
    axes[0].set_title(f"▼ dips: log-lik falls by > {threshold:g} nats/pt in one step", fontsize=8)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("min_i σ(x_i)")
    axes[1].set_xlabel("training step")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def training_grid(runs_steps, title: str, threshold: float = DIP_THRESHOLD):
    """One row per run, shared axes: training log-lik per step (▼ dips) and min σ (right axis)."""
    n = len(runs_steps)
    fig, axes = plt.subplots(n, 1, figsize=(10, 1.35 * n + 1.0), sharex=True, sharey=True,
                             squeeze=False)
    hi = max(np.max(s["loglik"]) for _, s in runs_steps)
    lo = min(np.min(s["loglik"][len(s["loglik"]) // 20:]) for _, s in runs_steps)
    for ax, ((name, steps), color) in zip(axes[:, 0], zip(runs_steps, COLORS)):
        ax.plot(steps["step"], steps["loglik"], color=color, lw=0.8)
        dips = find_dips(steps, threshold)
        if dips:
            ax.scatter([d["step"] for d in dips], [d["loglik"] for d in dips],
                       s=12, color="k", marker="v", zorder=5)
        ax.set_ylim(min(lo, hi - 1) - 0.3, hi + 0.3)
        ax.text(0.01, 0.08, f"{name}: {len(dips)} dips", transform=ax.transAxes, fontsize=8,
                color=color)
        ax2 = ax.twinx()
        ax2.plot(steps["step"], steps["min_sigma"], color="0.5", lw=0.7, ls=":")
        ax2.set_yscale("log")
        ax2.set_ylim(1e-3, 2)
        ax2.tick_params(labelsize=6)
        ax.tick_params(labelsize=7)
    axes[n // 2, 0].set_ylabel("training log-lik (nats / point)")
    axes[-1, 0].set_xlabel("training step")
    fig.suptitle(title + f"\n▼ dip (fall > {threshold:g} nats/pt); "
                 "dotted grey, right axis: min_i σ(x_i)", fontsize=9)
    fig.tight_layout()
    return fig


def dips_figure(name: str, steps: dict, cfg, title: str, threshold: float = DIP_THRESHOLD):
    """The evidence at each dip of one run: where the biggest loser sits, its σ and residual."""
    steps = _add_z(steps)
    dips = find_dips(steps, threshold)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.0))
    what = (f"{name}: the {len(dips)} training step(s) where the training log-likelihood fell by "
            f"more than {threshold:g} nats/point (dips), and the point that lost most in each")
    if not dips:
        for ax in axes:
            ax.text(0.5, 0.5, f"no dips (> {threshold:g} nats/pt) in {name}", ha="center",
                    transform=ax.transAxes)
        fig.suptitle(f"{what}\n{title}", fontsize=9)
        return fig
    d = {k: np.array([r[k] for r in dips]) for k in dips[0]}
    truth = _truth(cfg)
    ax = axes[0]
    sc = ax.scatter(d["drop_x"], d["drop_sigma"], c=d["fall"], cmap="viridis_r", s=18, zorder=3)
    if truth:
        grid = torch.linspace(-4, 4, 200)
        ax.plot(grid, truth[1](grid), "k--", lw=1, label="true noise sd s(x)")
        ax.legend(fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("x of the point that lost most")
    ax.set_ylabel("its σ(x) after the step")
    fig.colorbar(sc, ax=ax, label="fall of mean log-lik (nats/pt)")
    ax = axes[1]
    z = np.linspace(0, np.nanmax(np.abs(d["loser_z"])) * 1.05, 100)
    ax.scatter(np.abs(d["loser_z"]), -d["drop_delta"], s=18, color="tab:red", zorder=3,
               label="point that lost most, per dip")
    ax.plot(z, z ** 2 / 2, "k--", lw=1, label="z²/2")
    ax.set_xlabel("|residual| / σ of that point after the step  (z)")
    ax.set_ylabel("its loss of log-lik in the step (nats)")
    ax.legend(fontsize=7)
    ax = axes[2]
    order = np.argsort(d["fall"])[:20]
    pos = np.arange(len(order))
    ax.bar(pos - 0.2, d["drop_small_sigma_share"][order], 0.4, color="tab:blue",
           label="share of the fall: 10 % of points with smallest σ")
    ax.bar(pos + 0.2, d["drop_top10_share"][order], 0.4, color="tab:orange",
           label="share of the fall: 10 % of points that lost most")
    ax.axhline(0.1, color="k", lw=0.8, ls=":", label="share if spread evenly")
    ax.set_xticks(pos)
    ax.set_xticklabels([f"{int(s)}" for s in d["step"][order]], rotation=90, fontsize=6)
    ax.set_xlabel("dip (training step), largest first")
    ax.set_ylim(0, 1.6)
    ax.set_ylabel("share of the dip's fall")
    ax.legend(fontsize=6, loc="upper left", ncol=1)
    axes[0].set_title("where it sits: its x and σ(x)", fontsize=8)
    axes[1].set_title("its loss against its z = residual/σ", fontsize=8)
    axes[2].set_title("who carries the fall (20 largest dips)", fontsize=8)
    fig.suptitle(f"{what}\n{title}", fontsize=9)
    fig.tight_layout()
    return fig


def calibration_figure(runs_ho, title: str):
    """Coverage of central intervals against nominal (superimposed), and PIT histograms
    (superimposed for up to two runs, else one small panel per run on shared axes)."""
    n = len(runs_ho)
    bins, levels = 20, np.linspace(0.05, 0.99, 40)
    edges = np.linspace(0, 1, bins + 1)
    if n <= 2:
        fig, (cax, pax) = plt.subplots(1, 2, figsize=(11, 4.2))
        pit_axes = [pax] * n
    else:
        cols = (n + 1) // 2
        fig = plt.figure(figsize=(5.5 + 2.3 * cols, 4.8))
        gs = fig.add_gridspec(2, 2 + cols)
        cax = fig.add_subplot(gs[:, :2])
        pit_axes = []
        for i in range(n):
            ax = fig.add_subplot(gs[i % 2, 2 + i // 2], sharey=pit_axes[0] if pit_axes else None)
            pit_axes.append(ax)
    cax.plot([0, 1], [0, 1], "k--", lw=0.8, label="nominal")
    for (name, ho), color, pax in zip(runs_ho, COLORS, pit_axes):
        cax.plot(levels, central_coverage(ho["pit"], levels), color=color, lw=1.3, label=name)
        counts = pit_histogram(ho["pit"], bins) / len(ho["pit"]) * bins
        pax.stairs(counts, edges, color=color, lw=1.3, label=name, fill=n > 2, alpha=0.8 if n > 2 else 1)
        pax.axhline(1.0, color="k", lw=0.8, ls="--")
        if n > 2:
            pax.set_title(name, fontsize=7, color=color)
            pax.tick_params(labelsize=6)
    cax.set_xlabel("nominal level of the central interval")
    cax.set_ylabel(f"empirical coverage ({runs_ho[0][1]['n']} test points)")
    cax.legend(fontsize=7)
    if n <= 2:
        pit_axes[0].set_xlabel("PIT  F(y | x)")
        pit_axes[0].set_ylabel("density (dashed: uniform)")
        pit_axes[0].legend(fontsize=7)
    else:
        pit_axes[0].set_ylabel("PIT density")
        fig.text(0.75, 0.01, "PIT  F(y | x), 20 bins; dashed: uniform", ha="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- tables
def table_markdown(rows: list, split: str) -> str:
    head = ("| run | test log-lik (nats/pt) | RMSE | RMSE / homo | cover 50 % | 90 % | 95 % "
            "| dips | largest fall | min σ in training |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        c = r["coverage"]
        ratio = f"{r['rmse_ratio']:.3f}" if r.get("rmse_ratio") is not None else "–"
        lines.append(
            f"| {r['label']} | {r['loglik']:.3f} ± {r['loglik_se']:.3f} | {r['rmse']:.4f} | {ratio} "
            f"| {100 * c['0.5']:.1f} | {100 * c['0.9']:.1f} | {100 * c['0.95']:.1f} "
            f"| {r['dips']['count']} | {r['dips']['largest_fall']:.2f} "
            f"| {r['dips']['min_sigma_overall']:.4f} |")
    return "\n".join(lines) + f"\n\n({split} split; coverage in %; dips: falls > {DIP_THRESHOLD} nats/pt)\n"


def _row(name, cfg, ho, steps, run_dir):
    return dict(label=name, run=str(run_dir), loglik=ho["loglik"], loglik_se=ho["loglik_se"],
                rmse=ho["rmse"], coverage=ho["coverage"], n=ho["n"],
                dips=dip_summary(_add_z(steps)))


# ----------------------------------------------------------------------------- entry points
def report(run_dir, cfg, system, data, estimate, options: Options) -> list:
    """One run's figures and ``hetero_report.json`` (held-out metrics, dips)."""
    run_dir = Path(run_dir)
    system = system.cpu().eval()
    data = data.to("cpu")
    split_name = options.split
    split = data.split(split_name)
    seed = options.seed
    name = label(cfg)
    title = run_title(cfg, settings(cfg))
    ho = held_out(system, split, seed)
    steps = read_steps(run_dir)
    paths = [save(fit_figure([(name, cfg, system)], data, title), run_dir, "fit"),
             save(sigma_figure([(name, cfg, system)], data, title), run_dir, "sigma"),
             save(training_figure([(name, steps)], title), run_dir, "training"),
             save(dips_figure(name, steps, cfg, title), run_dir, "dips"),
             save(calibration_figure([(name, ho)], title), run_dir, "calibration")]
    row = _row(name, cfg, ho, steps, run_dir)
    n_est = len(split.subset(options.limit, options.spread))
    total = float(np.sum(estimate.log_marginal))
    row["estimator"] = dict(split=split_name, log_marginal_per_point=total / n_est,
                            per_datapoint=estimate.per_datapoint,
                            num_samples=estimate.num_samples, summed=estimate.summed)
    row["dip_list"] = find_dips(_add_z(steps))
    (run_dir / "hetero_report.json").write_text(json.dumps(row, indent=2) + "\n")
    return paths


def compare(run_dirs, options: CompareOptions) -> list:
    """All runs superimposed on shared axes, and the remedies table (.md, .json)."""
    runs, runs_steps, runs_ho, rows = [], [], [], []
    split = options.split
    data0 = None
    for d in run_dirs:
        cfg, system, data = load_run(d, options.data_dir, "cpu", "hetero")
        if data0 is None:
            data0, cfg0 = data, cfg
        elif cfg.data_args != cfg0.data_args:
            raise GenlabError(f"{d} was trained on other data ({cfg.data_args}) than "
                              f"{run_dirs[0]} ({cfg0.data_args})")
        name = label(cfg)
        ho = held_out(system, data.split(split), options.seed)
        steps = read_steps(d)
        runs.append((name, cfg, system))
        runs_steps.append((name, steps))
        runs_ho.append((name, ho))
        rows.append(_row(name, cfg, ho, steps, d))
    homo = next((r for r, (_, c, _) in zip(rows, runs) if c.system_args["variant"] == "homo"), None)
    for r in rows:
        r["rmse_ratio"] = r["rmse"] / homo["rmse"] if homo else None
    base = Path(options.out) if options.out else Path(run_dirs[0])
    out = base / "figures"
    out.mkdir(parents=True, exist_ok=True)
    title = run_title(cfg0, f"{len(runs)} runs compared on {split}")
    # the study's pair (the first two runs) superimposed; every run juxtaposed when there are more
    pair = run_title(cfg0, " vs ".join(r[0] for r in runs[:2]) + f" on {split}")
    paths = [save(fit_figure(runs[:2], data0, pair), base, "compare_fit"),
             save(sigma_figure(runs, data0, title), base, "compare_sigma"),
             save(training_figure(runs_steps[:2], pair), base, "compare_training"),
             save(calibration_figure(runs_ho, title), base, "compare_calibration")]
    if len(runs) > 2:
        paths += [save(fit_grid(runs, data0, title), base, "compare_fit_all"),
                  save(training_grid(runs_steps, title), base, "compare_training_all")]
    md = table_markdown(rows, split)
    (out / "hetero_compare.md").write_text(md)
    (out / "hetero_compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(md)
    return paths + [out / "hetero_compare.md", out / "hetero_compare.json"]
