r"""Report of a ``meta`` run: the GRU meta-learner held against the Bayes-optimal predictor.

For test sequences of the training law (the run's test split) and for fixed-p sequences
(``p = (1, 0, 0)`` by default, the study's; same length and reset period), per position
:math:`t`:

* :math:`\mathrm{KL}(\text{Bayes}_t \,\|\, \text{GRU}_t)` (``evaluation.metrics.categorical_kl``),
  averaged over sequences; its mean over positions is the target figure (nats per step);
* the cross-entropy of each predictor against the true next symbol.

Figures (``RUN_DIR/figures``): ``predictions`` (each symbol's predicted probability through time,
GRU and Bayes superimposed, in-distribution and fixed-p), ``kl_per_step``, ``learning``
(train cross-entropy per mini-batch, validation per epoch, the Bayes floor, and KL against
mini-batches from the kept epoch checkpoints).  ``python -m evaluation compare M1 M2 M3 M4``
puts several runs side by side.  Options: :class:`Options` (``--fixed-p``) and
:class:`CompareOptions` (``--out``).
"""

from __future__ import annotations

import copy
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from evaluation.api import EvalOptions, load_run
from evaluation.metrics import categorical_kl, cross_entropy
from evaluation.plotting import plt, run_title, save
from inference.data import symbol_sequences
from inference.runner import load_checkpoint, param_state, restore_params
from inference.systems import float_list
from models.common import GenlabError, option
from models.meta import bayes_predictive

KL_TARGET = 0.01  # nats per step, the target
SYMBOL_NAMES = None  # symbols are named 0..J-1 and "reset"


@dataclass
class Options(EvalOptions):
    """``python -m evaluation RUN_DIR --report`` of a ``meta`` run."""

    fixed_p: Optional[list[float]] = option(None, "the p of the out-of-distribution fixed-p "
                                            "sequences, e.g. 0.5,0.5,0 (default 1,0,...,0)",
                                            parse=float_list)

    def check(self) -> None:
        super().check()
        p = self.fixed_p
        if p is not None and (any(v < 0 for v in p) or abs(sum(p) - 1) > 1e-6):
            raise GenlabError(f"--fixed-p must be probabilities summing to 1, got {p}")


@dataclass
class CompareOptions(Options):
    """``python -m evaluation compare RUN ...`` of ``meta`` runs."""

    out: Optional[str] = option(None, "folder whose figures/ receives the comparison figures "
                                "(default the first run's)")


def task(cfg) -> dict:
    """The run's law: alpha, period T, length L (from its data options)."""
    d = cfg.data_args
    if d.get("alpha") is None:
        raise GenlabError("this meta run has no alpha, so there is no Bayes-optimal predictor")
    return dict(alpha=list(d["alpha"]), period=int(d["period"]), length=int(d["length"]))


def fixed_p_sequences(cfg, n: int = 1000, p=None, seed: int = 12345) -> torch.Tensor:
    """``n`` fixed-p sequences with the run's T and L; p defaults to (1, 0, .., 0)."""
    t = task(cfg)
    J = len(t["alpha"])
    p = [1.0] + [0.0] * (J - 1) if p is None else list(p)
    return symbol_sequences(n, t["length"], t["period"], p=p, seed=seed)[0]


def compare_predictors(system, x, alpha, period) -> dict:
    """Per-position KL(Bayes || GRU) and cross-entropies (means over the sequences of ``x``)."""
    with torch.no_grad():
        log_gru = system.log_predictive(x).double()
    bayes = bayes_predictive(x, alpha, period)
    y = x[:, 1:]
    kl = categorical_kl(bayes, log_gru)  # (S, L - 1)
    ce_gru = cross_entropy(log_gru, y)
    ce_bayes = cross_entropy(torch.log(bayes), y)
    return dict(kl=kl.mean(0).numpy(), ce_gru=ce_gru.mean(0).numpy(),
                ce_bayes=ce_bayes.mean(0).numpy(), kl_mean=float(kl.mean()),
                kl_se=float(kl.mean(1).std() / np.sqrt(kl.shape[0])),
                ce_gru_mean=float(ce_gru.mean()), ce_bayes_mean=float(ce_bayes.mean()),
                prob_gru=log_gru.exp()[0].numpy(), prob_bayes=bayes[0].numpy(),
                x=x[0].numpy(), n=int(x.shape[0]))


def _read_csv(path: Path) -> list:
    if not path.exists():
        return []
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def learning_curves(run_dir, cfg, system, x_test) -> dict:
    """Train CE per mini-batch, valid CE per epoch, and KL(Bayes || GRU) at kept epochs."""
    run_dir = Path(run_dir)
    t = task(cfg)
    steps = _read_csv(run_dir / "steps.csv")
    metrics = _read_csv(run_dir / "metrics.csv")
    per_epoch = max(1, -(-int(cfg.data_args["sequences"]) // int(cfg.batch_size)))
    kept = sorted(int(p.stem.split("_")[1]) for p in run_dir.glob("epoch_*.pt"))
    saved = param_state(system)
    kl_at = []
    for e in kept:
        restore_params(system, load_checkpoint(run_dir / f"epoch_{e}.pt"))
        kl_at.append((e * per_epoch, compare_predictors(system, x_test, t["alpha"], t["period"])["kl_mean"]))
    restore_params(system, saved)
    steps_per_seq = t["length"] - 1
    return dict(
        step=np.array([r["step"] + 1 for r in steps]),
        train_ce=np.array([-r["train_elbo"] / steps_per_seq for r in steps]),
        epoch_batches=np.array([r["epoch"] * per_epoch for r in metrics]),
        valid_ce=np.array([-r["val_elbo"] / steps_per_seq for r in metrics]),
        kl_batches=np.array([b for b, _ in kl_at]), kl=np.array([k for _, k in kl_at]),
        batches_per_epoch=per_epoch,
    )


def evaluate_run(run_dir, cfg, system, data, fixed_p=None, n: int = 1000, curves: bool = True) -> dict:
    """Everything the figures show, for one run."""
    t = task(cfg)
    x_test = data.test.x[:n]
    out = dict(task=t, cfg=cfg,
               test=compare_predictors(system, x_test, t["alpha"], t["period"]),
               fixed=compare_predictors(system, fixed_p_sequences(cfg, min(n, len(data.test)), fixed_p),
                                        t["alpha"], t["period"]))
    out["fixed_p"] = fixed_p or [1.0] + [0.0] * (len(t["alpha"]) - 1)
    if curves:
        out["curves"] = learning_curves(run_dir, cfg, system, x_test)
    return out


def label(ev) -> str:
    t = ev["task"]
    return f"T={t['period']} α=({','.join(f'{a:g}' for a in t['alpha'])})"


# ----------------------------------------------------------------------------- figures
def _prob_panel(ax, r, j, period, show_legend=False):
    steps = np.arange(1, len(r["x"]))
    ax.plot(steps, r["prob_gru"][:, j], color="C1", lw=1.4, label="GRU")
    ax.plot(steps, r["prob_bayes"][:, j], color="C0", lw=1.2, ls="--", label="Bayes")
    hit = r["x"][1:] == j
    ax.plot(steps[hit], np.full(hit.sum(), 1.04), "|", color="k", ms=5, label="true symbol")
    for s in range(0, len(r["x"]), period):
        ax.axvline(s, color="0.85", lw=0.6, zorder=0)
    ax.set_ylim(-0.03, 1.08)
    if show_legend:
        ax.legend(fontsize=7, loc="center right", ncol=3)


def plot_predictions(ev: dict, title: str):
    J1 = ev["test"]["prob_gru"].shape[1]
    names = [f"symbol {j}" for j in range(J1 - 1)] + ["reset"]
    fig, axes = plt.subplots(J1, 2, figsize=(13, 1.7 * J1 + 1), sharex=True, sharey=True)
    for c, (key, name) in enumerate((("test", "in-distribution test sequence"),
                                     ("fixed", f"fixed p = {tuple(ev['fixed_p'])}"))):
        for j in range(J1):
            ax = axes[j, c]
            _prob_panel(ax, ev[key], j, ev["task"]["period"], show_legend=(j == 0 and c == 0))
            if c == 0:
                ax.set_ylabel(f"P({names[j]})")
            if j == 0:
                ax.set_title(f"{name}: mean KL(Bayes||GRU) {ev[key]['kl_mean']:.4f} nats/step",
                             fontsize=9)
        axes[-1, c].set_xlabel("time step of the predicted symbol (grey: resets)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_kl(evs: list, title: str):
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for i, ev in enumerate(evs):
        steps = np.arange(1, len(ev["test"]["kl"]) + 1)
        axes[0].plot(steps, ev["test"]["kl"], color=f"C{i}", lw=1, label=label(ev))
        axes[1].plot(steps, ev["fixed"]["kl"], color=f"C{i}", lw=1, label=label(ev))
        axes[2].plot(steps, ev["test"]["ce_gru"] - ev["test"]["ce_bayes"], color=f"C{i}", lw=1,
                     label=label(ev))
    axes[0].axhline(KL_TARGET, color="k", ls=":", lw=1, label=f"target {KL_TARGET}")
    axes[0].set_title("KL(Bayes || GRU), in-distribution test", fontsize=9)
    axes[1].set_title(f"KL(Bayes || GRU), fixed p = {tuple(evs[0]['fixed_p'])}", fontsize=9)
    axes[2].set_title("cross-entropy GRU − Bayes vs true symbol, in-distribution", fontsize=9)
    axes[2].axhline(0, color="k", lw=0.8)
    for ax in axes[:2]:
        ax.set_yscale("log")
        ax.set_ylabel("nats (mean over sequences)")
    axes[2].set_ylabel("nats")
    for ax in axes:
        ax.set_xlabel("time step of the predicted symbol")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_learning(evs: list, title: str):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for i, ev in enumerate(evs):
        c = ev["curves"]
        w = max(1, min(25, len(c["train_ce"]) // 20))
        smooth = np.convolve(c["train_ce"], np.ones(w) / w, mode="valid")
        axes[0].plot(c["step"][w - 1:], smooth, color=f"C{i}", lw=1, alpha=0.8,
                     label=f"{label(ev)} train (mean of {w} batches)")
        axes[0].plot(c["epoch_batches"], c["valid_ce"], "o", color=f"C{i}", ms=3,
                     label=f"{label(ev)} validation")
        axes[0].axhline(ev["test"]["ce_bayes_mean"], color=f"C{i}", ls=":", lw=1)
        if len(c["kl"]):
            axes[1].plot(c["kl_batches"], c["kl"], "o-", color=f"C{i}", ms=3, label=label(ev))
    axes[0].set_xlabel("mini-batches")
    axes[0].set_ylabel("cross-entropy, nats per step (dotted: Bayes on test)")
    axes[0].legend(fontsize=7)
    axes[1].axhline(KL_TARGET, color="k", ls=":", lw=1, label=f"target {KL_TARGET}")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("mini-batches")
    axes[1].set_ylabel("mean KL(Bayes || GRU), nats per step, test")
    axes[1].legend(fontsize=7)
    axes[1].set_title("at the kept epoch checkpoints", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _extra(cfg) -> str:
    return (f"{label({'task': task(cfg)})} L={cfg.data_args['length']} B={cfg.batch_size} "
            f"lr={cfg.lr:g}")


def summary_line(ev) -> str:
    c = ev.get("curves", {})
    nb = int(c["epoch_batches"][-1]) if c and len(c["epoch_batches"]) else "?"
    return (f"{label(ev)}: after {nb} mini-batches, mean KL(Bayes||GRU) {ev['test']['kl_mean']:.4f} "
            f"± {ev['test']['kl_se']:.4f} nats/step (test, n={ev['test']['n']}), "
            f"{ev['fixed']['kl_mean']:.4f} (fixed p); cross-entropy GRU "
            f"{ev['test']['ce_gru_mean']:.4f} vs Bayes {ev['test']['ce_bayes_mean']:.4f}")


def _json(ev) -> dict:
    return dict(task=ev["task"], fixed_p=ev["fixed_p"],
                **{f"{k}_{m}": ev[k][m] for k in ("test", "fixed")
                   for m in ("kl_mean", "kl_se", "ce_gru_mean", "ce_bayes_mean")},
                kl_curve=dict(batches=ev["curves"]["kl_batches"].tolist(),
                              kl=ev["curves"]["kl"].tolist()) if "curves" in ev else None)


def report(run_dir, cfg, system, data, estimate, options: Options) -> list:
    options.check()
    run_dir = Path(run_dir)
    ev = evaluate_run(run_dir, cfg, system, data, options.fixed_p)
    print(summary_line(ev))
    (run_dir / "meta_eval.json").write_text(json.dumps(_json(ev), indent=2) + "\n")
    title = run_title(cfg, _extra(cfg))
    return [save(plot_predictions(ev, title), run_dir, "predictions"),
            save(plot_kl([ev], title), run_dir, "kl_per_step"),
            save(plot_learning([ev], title), run_dir, "learning")]


def compare(run_dirs, options: CompareOptions) -> list:
    options.check()
    evs = []
    for d in run_dirs:
        cfg, system, data = load_run(d, options.data_dir, expect_system="meta")
        evs.append(evaluate_run(d, cfg, system, data, options.fixed_p))
        print(summary_line(evs[-1]))
    out = Path(options.out or run_dirs[0])
    cfg0 = copy.deepcopy(evs[0]["cfg"])  # the law differs between runs: keep it out of the title
    cfg0.data_args = {k: v for k, v in cfg0.data_args.items() if k not in ("alpha", "period", "p")}
    title = run_title(cfg0, f"{len(evs)} runs, L={cfg0.data_args['length']} B={cfg0.batch_size}")
    paths = [save(plot_kl(evs, title), out, "compare_kl"),
             save(plot_learning(evs, title), out, "compare_learning")]
    for key, name in (("test", "in-distribution"), ("fixed", "fixed-p")):
        paths.append(save(plot_compare_predictions(evs, key, f"{title} · {name}"), out,
                          f"compare_predictions_{key}"))
    return paths


def plot_compare_predictions(evs: list, key: str, title: str):
    J1 = evs[0][key]["prob_gru"].shape[1]
    fig, axes = plt.subplots(len(evs), J1 - 1, figsize=(4.4 * (J1 - 1), 1.9 * len(evs) + 0.8),
                             sharex=True, sharey=True, squeeze=False)
    for i, ev in enumerate(evs):
        for j in range(J1 - 1):
            ax = axes[i, j]
            _prob_panel(ax, ev[key], j, ev["task"]["period"], show_legend=(i == 0 and j == 0))
            if j == 0:
                ax.set_ylabel(f"{label(ev)}\nP(symbol)", fontsize=8)
            if i == 0:
                ax.set_title(f"symbol {j}", fontsize=9)
        axes[i, -1].text(0.99, 0.5, f"KL {ev[key]['kl_mean']:.4f}", transform=axes[i, -1].transAxes,
                         ha="right", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("time step (grey: resets)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
