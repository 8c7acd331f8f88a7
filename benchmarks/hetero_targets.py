"""Issue 7's targets and remedies table, measured: heteroscedastic vs homoscedastic regression.

    OMP_NUM_THREADS=1 python benchmarks/hetero_targets.py [--runs runs/hetero-study]
                                                          [--epochs 1500] [--only NAME,...]

Trains (through the one runner, only where a run directory does not hold a run yet) the study's
runs (``evaluation.reports.hetero.STUDY``) on the default wiggles set (500 / 500 / 1000 points, data seed 0), all full-batch
(batch 500 = one step per epoch, so ``steps.csv`` holds the full training log-likelihood at every
step), MLPs 1-50-50-1 tanh, training seed 0:

* ``homo``, ``hetero``: Adam lr 1e-2 (the setting that provokes the dips);
* remedies, each changing one thing from ``hetero``: ``floor`` (σ floor 0.05), ``beta05``
  (β-NLL β = 0.5), ``beta1`` (β = 1), ``lr1e-3`` (Adam lr 1e-3), ``clip`` (ClippedAdam,
  elementwise gradient clip 1.0), ``bayes`` (Bayesian heteroscedastic, TraceMeanField_ELBO);

then evaluates every run at its best validation epoch (``best.pt``) on the test split
(evaluation.reports.hetero.compare: held-out log-likelihood, RMSE, coverage, dips) and prints

* the targets: test log-lik of hetero minus homo with the paired standard error, the RMSE ratio
  hetero / homo (target ≤ 1.05), hetero's coverage of central 50 / 90 / 95 % intervals
  (target: within 5 points of nominal);
* the remedies table (also written to RUNS/figures/hetero_compare.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default=str(ROOT / "runs" / "hetero-study"))
    p.add_argument("--epochs", type=int, default=1500)
    p.add_argument("--only", help="comma-separated subset of homo,hetero,floor,beta05,beta1,"
                   "lr1e-3,clip,bayes (evaluation.reports.hetero.STUDY)")
    ns = p.parse_args(argv)
    torch.set_num_threads(1)
    from evaluation.api import load_run
    from evaluation.reports import hetero as rep
    from inference.runner import train_if_missing

    names = ns.only.split(",") if ns.only else list(rep.STUDY)
    root = Path(ns.runs)
    for name in names:
        out = root / name
        train_if_missing(rep.study_config(name, ns.epochs), out)
    dirs = [str(root / n) for n in names]
    opts = rep.CompareOptions(out=str(root), split="test", seed=0)
    rep.compare(dirs, opts)
    if "homo" in names and "hetero" in names:
        ho = {}
        for n in ("homo", "hetero"):
            _, system, data = load_run(root / n, device="cpu")
            ho[n] = rep.held_out(system, data.test, seed=0)
        diff = ho["hetero"]["loglik_points"] - ho["homo"]["loglik_points"]
        se = diff.std(ddof=1) / np.sqrt(diff.size)
        ratio = ho["hetero"]["rmse"] / ho["homo"]["rmse"]
        cov = ho["hetero"]["coverage"]
        gaps = {k: 100 * (v - float(k)) for k, v in cov.items()}
        print(f"target 1: test log-lik hetero - homo = {diff.mean():.3f} ± {se:.3f} nats/pt "
              f"(paired se, n = {diff.size}): {'PASS' if diff.mean() > 5 * se else 'FAIL'} "
              "(clear margin = more than 5 paired standard errors)")
        print(f"target 2: RMSE hetero / homo = {ho['hetero']['rmse']:.4f} / {ho['homo']['rmse']:.4f}"
              f" = {ratio:.3f}: {'PASS' if ratio <= 1.05 else 'FAIL'} (≤ 1.05)")
        print("target 3: hetero coverage " + ", ".join(
            f"{100 * float(k):g} % -> {100 * v:.1f} % ({gaps[k]:+.1f} pts)" for k, v in cov.items())
            + f": {'PASS' if all(abs(g) <= 5 for g in gaps.values()) else 'FAIL'} (within 5 points)")
        # over-confidence from fitting: the same model's coverage on the points it was fitted to
        for n in ("homo", "hetero", "beta05"):
            if n not in names:
                continue
            _, system, data = load_run(root / n, device="cpu")
            tr = rep.held_out(system, data.train, seed=0)["coverage"]
            te = rep.held_out(system, data.test, seed=0)["coverage"]
            print(f"coverage {n:7s} train " + ", ".join(f"{100 * v:.1f}" for v in tr.values())
                  + " | test " + ", ".join(f"{100 * v:.1f}" for v in te.values())
                  + " (% at 50, 90, 95)")
        from inference.data import make_wiggles, wiggles_noise_scale

        big = make_wiggles(200000, 1, 1, seed=123).train.x[:, 0]
        best = torch.sqrt(torch.mean(wiggles_noise_scale(big) ** 2))
        ll_true = torch.distributions.Normal(0.0, wiggles_noise_scale(big)).entropy().mean()
        print(f"reference: RMSE of the true mean {float(best):.4f}, expected test log-lik of the "
              f"true model {-float(ll_true):.3f} nats/pt (Monte Carlo over 200,000 x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
