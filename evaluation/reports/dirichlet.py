r"""Report of a ``dirichlet`` run: the conjugate checks against the closed forms.

``python -m evaluation RUN_DIR --report`` prints and draws, for the run's training data:

* the learned concentration :math:`\beta_s` beside the exact :math:`\alpha + c_s` and
  :math:`\mathrm{KL}(q \,\|\, \text{posterior})` in closed form (the tolerance is stated on this
  KL, not on :math:`\beta`: the ELBO is flat along the total concentration, a relative error
  :math:`\epsilon` of it costs only about :math:`(J - 1)\epsilon^2 / 2` nats, so SVI's gradient
  noise leaves :math:`\beta` loose where the KL is already small);
* the ELBO gap: :math:`\log p(x) - \mathrm{ELBO}` in closed form equals that KL, and the
  Monte Carlo ELBO of the estimator agrees within its standard error;
* IWAE at each k of ``--k`` against the exact evidence (``figures/conjugate.png``);
* SBC ranks of the true p among exact-posterior and SVI-posterior draws, with the chi-square
  uniformity p-values (``figures/sbc.png``); the SVI fits are one runner run, ``RUN_DIR/sbc``;
* NUTS through ``pyro.infer.MCMC``, summarised with arviz, against the exact Beta marginals
  (``figures/nuts.png``).

The functions :func:`conjugate_checks`, :func:`sbc` and :func:`nuts_check` are what the
benchmark and the notebook call; :class:`Options` (``--sbc-replications``) sizes the report.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS

from evaluation.api import EvalOptions, load_run
from evaluation.metrics import rank_uniformity, sbc_ranks
from evaluation.plotting import plt, run_title, save
from inference.importance import _import_arviz, estimate_log_marginal
from inference.runner import CHECKPOINT, RunConfig, load_checkpoint, restore_params, train
from models import dirichlet
from models.common import GenlabError, option

#: SVI settings of the SBC fits and the documented ``dirichlet`` runs (see
#: docs/dirichlet_categorical.md): mini-batches of a tenth of the symbols, so 2,000 steps
SVI_SETTINGS = dict(loss="Trace_ELBO", k=32, lr=0.3, lr_decay=0.97, epochs=200)
SMOKE = os.environ.get("GENLAB_SMOKE") == "1"


@dataclass
class Options(EvalOptions):
    """``python -m evaluation RUN_DIR --report`` of a ``dirichlet`` run (``--k`` sets the IWAE
    curve of the conjugate check; GENLAB_SMOKE=1 shrinks SBC and NUTS to a smoke size)."""

    sbc_replications: int = option(200, "SBC replications R, one sequence and one p ~ "
                                   "Dirichlet(alpha) each, fitted by one SVI run; fewer is faster")

    def check(self) -> None:
        super().check()
        if self.sbc_replications < 2:
            raise GenlabError(f"--sbc-replications must be at least 2, got {self.sbc_replications}")


# ----------------------------------------------------------------------------- checks
def use_final_state(run_dir, system) -> None:
    """Load the run's last SVI state (``checkpoint.pt``) into ``system``.

    ``load_run`` prefers ``best.pt``, the state at the best validation ELBO; for global latents a
    held-out ELBO charges q's concentration as KL to the prior and is no criterion for the
    posterior of the training data, so every conjugate check uses the final state instead.
    """
    restore_params(system, load_checkpoint(Path(run_dir) / CHECKPOINT))


def conjugate_checks(system, split, ks=(1, 10, 100, 1000), seed: int = 0) -> dict:
    """Learned vs exact posterior, the ELBO gap identity and IWAE vs the exact evidence."""
    x, seq = split.tensors()
    beta = system.concentration().double()
    post = system.exact_posterior(x, seq).double()
    alpha = system.alpha.double()
    c = post - alpha
    evidence = dirichlet.log_evidence_from_counts(alpha, c)  # (S,)
    kl = torch.distributions.kl_divergence(dist.Dirichlet(beta), dist.Dirichlet(post))
    elbo_closed = dirichlet.elbo(alpha, beta, c)
    pyro.set_rng_seed(seed)
    K = max(ks)
    est = estimate_log_marginal(system.model, system.guide, x, seq, num_samples=K, ks=ks)
    return dict(
        alpha=alpha.tolist(), learned=beta.tolist(), exact=post.tolist(),
        max_rel_error=float(((beta - post).abs() / post).max()),
        total_rel_error=(beta.sum(-1) / post.sum(-1) - 1).tolist(),
        kl_q_post=kl.tolist(), kl_total=float(kl.sum()),
        log_evidence=float(evidence.sum()), elbo_closed=float(elbo_closed.sum()),
        gap_closed=float(evidence.sum() - elbo_closed.sum()),
        elbo_mc=float(est.elbo[0]), iwae={int(k): float(v[0]) for k, v in est.iwae.items()},
        ess=float(est.ess[0]), num_samples=K, sequences=int(beta.shape[0]),
    )


def _svi_config(alpha, replications: int, symbols: int, seed: int, **svi):
    s = SVI_SETTINGS | svi
    return RunConfig(system="dirichlet", data_args=dict(
        alpha=list(alpha), symbols=int(symbols), sequences=int(replications), p=None,
        test_symbols=1, data_seed=int(seed)), epochs=int(s["epochs"]),
        batch_size=int(s.get("batch_size", max(1, replications * symbols // 10))), lr=float(s["lr"]),
        lr_decay=float(s["lr_decay"]), loss=s["loss"], k=int(s["k"]), seed=int(seed))


def sbc(alpha, replications: int = 200, symbols: int = 20, draws: int = 99, bins: int = 10,
        seed: int = 0, out=None, **svi) -> dict:
    """SBC of the exact and the SVI posterior of the conjugate model.

    ``replications`` R sequences, each with its own p ~ Dirichlet(alpha) and ``symbols`` draws,
    fitted at once by one runner run of the batched system (``out``, default a temporary
    folder; reused when it already holds the run).  ``draws`` posterior draws per replication.
    """
    alpha = dirichlet.check_alpha(alpha)
    cfg = _svi_config(alpha.tolist(), replications, symbols, seed, **svi)
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="genlab-sbc-"))
    out = Path(out)
    if not (out / "config.json").exists():
        print(f"SBC: fitting {replications} replications by SVI into {out}", file=sys.stderr)
        train(cfg, out, progress=None)  # a bar on a terminal, lines with an ETA in a log
    cfg, system, data = load_run(out, expect_system="dirichlet")
    use_final_state(out, system)
    truth = np.asarray(data.source["p_true"])
    pyro.set_rng_seed(seed + 1)
    result = dict(replications=int(replications), symbols=int(symbols), draws=int(draws),
                  run=str(out), svi={k: getattr(cfg, k) for k in ("loss", "k", "lr", "lr_decay",
                                                                    "epochs", "batch_size")})
    for name, conc in (("exact", system.exact_posterior(*data.train.tensors())),
                       ("svi", system.concentration())):
        samples = dist.Dirichlet(conc.double()).sample((int(draws),)).transpose(0, 1)  # (R, L, J)
        ranks = sbc_ranks(truth, samples.numpy())
        result[name] = rank_uniformity(ranks, draws, bins) | {"ranks": ranks}
    conc, post = system.concentration().double(), system.exact_posterior(*data.train.tensors()).double()
    kl = torch.distributions.kl_divergence(dist.Dirichlet(conc), dist.Dirichlet(post))
    result["kl_mean"], result["kl_max"] = float(kl.mean()), float(kl.max())
    return result


@contextmanager
def _quiet_logs():
    """Library log records below ERROR are dropped inside, and Pyro's and arviz's loggers are
    left as they were found (MCMC configures Pyro's at INFO with a handler of its own)."""
    names = ("pyro", "pyro.infer", "pyro.infer.mcmc", "arviz")
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers)) for n in names}
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        for n, (level, handlers) in saved.items():
            log = logging.getLogger(n)
            log.setLevel(level)
            log.handlers[:] = handlers


def nuts_check(x, alpha, num_samples: int = 1000, warmup: int = 500, seed: int = 0) -> dict:
    """NUTS on the single-sequence model; arviz summary beside the exact Beta marginals."""
    alpha = dirichlet.check_alpha(alpha)
    x = torch.as_tensor(x)
    post = dirichlet.posterior_concentration(alpha, dirichlet.counts(x, alpha.shape[0]))
    pyro.set_rng_seed(seed)
    with _quiet_logs():  # MCMC sets Pyro's loggers to INFO (later ELBOs would print guesses)
        mcmc = MCMC(NUTS(dirichlet.model), num_samples=int(num_samples), warmup_steps=int(warmup),
                    num_chains=1, disable_progbar=not sys.stderr.isatty())
        mcmc.run(x, alpha)
        az = _import_arviz()
        # one chain: arviz warns (log and RuntimeWarning) that it cannot compute r-hat
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            idata = az.from_pyro(mcmc, log_likelihood=False)
            summary = az.summary(idata, var_names=["p"])
    A = float(post.sum())
    exact_mean = (post / A).tolist()
    exact_sd = [math.sqrt(b * (A - b) / (A * A * (A + 1))) for b in post.tolist()]
    return dict(idata=idata, summary=summary, posterior=post.tolist(), exact_mean=exact_mean,
                exact_sd=exact_sd, nuts_mean=summary["mean"].tolist(),
                nuts_sd=summary["sd"].tolist(), ess_bulk=summary["ess_bulk"].tolist())


# ----------------------------------------------------------------------------- figures
def plot_conjugate(checks: dict, title: str):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ax = axes[0]
    learned, exact = np.asarray(checks["learned"]), np.asarray(checks["exact"])
    J = exact.shape[1]
    for j in range(J):
        ax.scatter(exact[:, j], learned[:, j], s=18, label=f"symbol {j}")
    lo, hi = min(exact.min(), learned.min()) * 0.8, max(exact.max(), learned.max()) * 1.25
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="learned = exact")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("exact posterior concentration alpha + c")
    ax.set_ylabel("SVI concentration beta")
    ax.set_title(f"KL(q || posterior) = {checks['kl_total']:.4f} nats "
                 f"({checks['sequences']} sequence(s))", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[1]
    ks = sorted(checks["iwae"])
    ax.plot(ks, [checks["iwae"][k] for k in ks], "o-", label="IWAE, mean over groups of k")
    ax.axhline(checks["log_evidence"], color="k", lw=1, label="exact log evidence")
    ax.axhline(checks["elbo_closed"], color="C3", ls="--", lw=1,
               label="closed-form ELBO = evidence - KL")
    ax.set_xscale("log")
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")  # whole nats, no offset
    ax.set_xlabel("k (importance samples)")
    ax.set_ylabel("nats (whole training set)")
    ax.set_title(f"gap in closed form {checks['gap_closed']:.4f}, MC ELBO {checks['elbo_mc']:.3f}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.suptitle(f"conjugate checks: the SVI posterior against the exact one (left), IWAE "
                 f"against the exact log evidence (right)\n{title}", fontsize=9)
    fig.tight_layout()
    return fig


def plot_sbc(result: dict, title: str):
    from scipy import stats  # heavy (arviz brings it), and only these two figures need it

    J = result["exact"]["counts"].shape[1]
    fig, axes = plt.subplots(2, J, figsize=(3.2 * J, 5), sharex=True, sharey=True, squeeze=False)
    R, bins = result["replications"], result["exact"]["bins"]
    lo, hi = stats.binom.ppf([0.005, 0.995], R, 1.0 / bins)
    for i, name in enumerate(("exact", "svi")):
        r = result[name]
        for j in range(J):
            ax = axes[i, j]
            ax.axhspan(lo, hi, color="0.85", label="99% band if uniform")
            ax.bar(np.arange(bins), r["counts"][:, j], width=0.9, color="C0" if i == 0 else "C1")
            ax.axhline(r["expected"], color="k", lw=1)
            ax.set_title(f"{name} posterior, p[{j}]: chi2 p = {r['pvalue'][j]:.3f}", fontsize=8)
            if j == 0:
                ax.set_ylabel("replications")
            if i == 1:
                ax.set_xlabel(f"rank bin (of {result['draws'] + 1} rank values)")
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{title}\nSBC: R = {R} replications of {result['symbols']} symbols, "
                 f"{result['draws']} posterior draws; Bonferroni p: exact "
                 f"{result['exact']['pvalue_bonferroni']:.3f}, SVI "
                 f"{result['svi']['pvalue_bonferroni']:.3f}", fontsize=9)
    fig.tight_layout()
    return fig


def plot_nuts(nuts: dict, title: str):
    from scipy import stats  # heavy (arviz brings it), and only these two figures need it

    az = _import_arviz()
    post = np.asarray(nuts["posterior"])
    A = post.sum()
    J = post.size
    fig, axes = plt.subplots(1, J, figsize=(3.4 * J, 3.2), squeeze=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        az.plot_posterior(nuts["idata"], var_names=["p"], ax=axes[0], hdi_prob=0.94,
                          textsize=8)
    for j, ax in enumerate(axes[0]):
        top = max((ln.get_ydata().max() for ln in ax.lines if len(ln.get_ydata())), default=1.0)
        lo, hi = ax.get_xlim()
        grid = np.linspace(max(lo, 1e-6), min(hi, 1 - 1e-6), 400)
        ax.plot(grid, stats.beta.pdf(grid, post[j], A - post[j]), "k--", lw=1.2,
                label=f"exact Beta({post[j]:.1f}, {A - post[j]:.1f})")
        ax.set_ylim(0, 1.3 * top)
        ax.legend(fontsize=7, loc="upper left")
        ax.set_title(f"p[{j}]: NUTS {nuts['nuts_mean'][j]:.3f}±{nuts['nuts_sd'][j]:.3f}, "
                     f"exact {nuts['exact_mean'][j]:.3f}±{nuts['exact_sd'][j]:.3f}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- the report
def _json_ready(d):
    if isinstance(d, dict):
        return {str(k): _json_ready(v) for k, v in d.items() if k not in ("idata", "summary", "ranks")}
    if isinstance(d, np.ndarray):
        return d.tolist()
    if isinstance(d, (np.floating, np.integer)):
        return d.item()
    return d


def report(run_dir, cfg, system, data, estimate, options: Options) -> list:
    options.check()
    run_dir = Path(run_dir)
    use_final_state(run_dir, system)
    ks = sorted(set(options.k))
    seed = options.seed
    checks = conjugate_checks(system, data.train, ks, seed)
    split = options.split
    x_s, seq_s = data.split(split).tensors()
    post_s = system.exact_posterior(x_s, seq_s).double()
    checks["eval_split"] = split
    checks["eval_exact_log_evidence"] = float(dirichlet.log_evidence_from_counts(
        system.alpha.double(), post_s - system.alpha.double()).sum())
    pyro.set_rng_seed(seed)
    checks["eval_iwae"] = float(estimate_log_marginal(system.model, system.guide, x_s, seq_s,
                                                      num_samples=max(ks)).log_marginal[0])
    print(f"conjugate checks on the training data ({checks['sequences']} sequence(s)):")
    print(f"  KL(q || exact posterior) = {checks['kl_total']:.5f} nats; largest relative "
          f"error of beta {checks['max_rel_error']:.3f}")
    print(f"  log evidence {checks['log_evidence']:.4f}; closed-form ELBO {checks['elbo_closed']:.4f};"
          f" gap {checks['gap_closed']:.5f} = KL {checks['kl_total']:.5f}")
    print(f"  MC ELBO (K = {checks['num_samples']}) {checks['elbo_mc']:.4f}; IWAE "
          + ", ".join(f"k={k}: {v:.4f}" for k, v in checks["iwae"].items()))
    print(f"  {split} split: IWAE {checks['eval_iwae']:.4f} vs exact log evidence "
          f"{checks['eval_exact_log_evidence']:.4f}")
    title = run_title(cfg, f"{checks['sequences']} seq x {cfg.data_args.get('symbols')} symbols")
    paths = [save(plot_conjugate(checks, title), run_dir, "conjugate")]

    R = 20 if SMOKE else options.sbc_replications
    res = sbc(system.alpha.tolist(), replications=R, symbols=int(cfg.data_args.get("symbols", 20)),
              draws=19 if SMOKE else 99, bins=5 if SMOKE else 10, seed=seed, out=run_dir / "sbc",
              **({"epochs": 5} if SMOKE else {}))
    print(f"  SBC, R = {R}: uniformity p (Bonferroni over {len(system.alpha)} components) exact "
          f"{res['exact']['pvalue_bonferroni']:.3f}, SVI {res['svi']['pvalue_bonferroni']:.3f}")
    paths.append(save(plot_sbc(res, run_title(cfg, "simulation-based calibration")), run_dir, "sbc"))

    x0 = data.train.x[data.train.y == 0] if data.train.y is not None else data.train.x
    nuts = nuts_check(x0, system.alpha, num_samples=50 if SMOKE else 1000,
                      warmup=50 if SMOKE else 500, seed=seed)
    print("  NUTS vs exact posterior (sequence 0): " + "; ".join(
        f"p[{j}] {m:.3f}±{s:.3f} vs {e:.3f}±{es:.3f}" for j, (m, s, e, es) in enumerate(
            zip(nuts["nuts_mean"], nuts["nuts_sd"], nuts["exact_mean"], nuts["exact_sd"]))))
    paths.append(save(plot_nuts(nuts, run_title(cfg, f"NUTS on sequence 0, {len(x0)} symbols")),
                      run_dir, "nuts"))
    out = dict(checks=checks, sbc=res, nuts={k: v for k, v in nuts.items() if k != "idata"})
    (run_dir / "conjugate_checks.json").write_text(json.dumps(_json_ready(out), indent=2) + "\n")
    return paths

