"""How tight is AIS on a trained VAE, and how far below it does IWAE-5000 lie?

1. BDMC on ``--n`` images simulated from the run's model, for each T in ``--steps``: the
   mean gap upper - lower with its standard error across images, and the wall-clock.
2. AIS on ``--real`` test images at each T, beside IWAE-k (k = 1 ... ``--k``) and the ELBO on
   the same images: AIS - IWAE-K per image (mean, spread, the images where IWAE is furthest).
3. A figure ``RUN_DIR/figures/ais_sandwich.png``: IWAE-k and AIS-T against log-joint
   evaluations per image, the BDMC band (on simulated images), the acceptance rate along the
   schedule, and IWAE-K against AIS per image.  Numbers go to ``RUN_DIR/ais_accuracy.json``.

    GENLAB_DATA=/work/shared/data nice python benchmarks/ais_accuracy.py runs/vae-d20 \\
        --n 100 --chains 4 --steps 100,300,1000 --real 100 --k 5000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyro
import torch

from evaluation.ais import ais_log_marginal, bdmc
from evaluation.api import load_run
from evaluation.plotting import run_title
from inference.importance import estimate_log_marginal
from inference.systems import get_system


def ms(a) -> tuple:
    a = np.asarray(a, dtype=float)
    return float(a.mean()), float(a.std(ddof=1) / np.sqrt(a.size))


def bdmc_by_steps(system, shape_args, steps, ns, out) -> dict:
    """BDMC on ``ns.n`` images simulated from the model, the same ones for every T: the
    (lower, upper) mean per T, printed and recorded in ``out["bdmc"]``."""
    print(f"BDMC on n = {ns.n} simulated images: T, gap mean ± se, lower, upper, "
          "acceptance fwd/rev, seconds", flush=True)
    band = {}
    for T in steps:
        pyro.set_rng_seed(ns.seed)
        t0 = time.perf_counter()
        r = bdmc(system.model, system.guide, shape_args, n=ns.n, num_chains=ns.chains,
                 num_steps=T, leapfrog_steps=ns.leapfrog)
        sec = time.perf_counter() - t0
        g, gse = ms(r.gap)
        s = r.summary()
        band[T] = (s["lower"]["mean"], s["upper"]["mean"])
        out["bdmc"][T] = s | {"wall_s": sec}
        print(f"  T={T:>6}  gap {g:7.3f} ± {gse:.3f}  lower {s['lower']['mean']:9.3f}  "
              f"upper {s['upper']['mean']:9.3f}  acc {s['accept_rate']['forward']:.2f}/"
              f"{s['accept_rate']['reverse']:.2f}  {sec:7.1f} s", flush=True)
    return band


def ais_on_real(system, x, steps, ns, out):
    """IWAE at k up to ``ns.k`` and AIS at every T on the real images ``x``: recorded in
    ``out``; returns (the IWAE estimate, {T: (evaluations, mean AIS)}, the last AIS estimate)."""
    fig_data = {}
    pyro.set_rng_seed(ns.seed)
    ks = sorted({1, 10, 100, 1000, ns.k} & set(range(1, ns.k + 1)))
    t0 = time.perf_counter()
    iw = estimate_log_marginal(system.model, system.guide, x, num_samples=ns.k, ks=ks)
    out["iwae_seconds"] = time.perf_counter() - t0
    out["elbo"] = ms(iw.elbo)
    out["iwae"] = {k: ms(v) for k, v in iw.iwae.items()}
    print(f"real test images n = {x.shape[0]}: ELBO {ms(iw.elbo)[0]:.3f}, "
          + ", ".join(f"IWAE-{k} {ms(v)[0]:.3f}" for k, v in iw.iwae.items())
          + f" ({out['iwae_seconds']:.1f} s)", flush=True)
    last = None
    for T in steps:
        pyro.set_rng_seed(ns.seed)
        est = ais_log_marginal(system.model, system.guide, x, num_chains=ns.chains,
                               num_steps=T, leapfrog_steps=ns.leapfrog)
        d = est.log_marginal - iw.log_marginal
        worst = np.argsort(-d)[:5]
        out["ais"][T] = {"mean": ms(est.log_marginal), "mc_se_mean":
                         float(np.sqrt((est.se ** 2).sum()) / est.n),
                         "minus_iwae": {"mean": ms(d)[0], "se": ms(d)[1],
                                        "sd": float(d.std(ddof=1)),
                                        "min": float(d.min()), "median": float(np.median(d)),
                                        "max": float(d.max())},
                         "worst": {int(i): float(d[i]) for i in worst},
                         "accept": float(est.accept_rate.mean()),
                         "evaluations": est.evaluations, "wall_s": est.seconds}
        print(f"  AIS T={T:>6}: {ms(est.log_marginal)[0]:9.3f} (MC se of mean "
              f"{out['ais'][T]['mc_se_mean']:.3f}); AIS - IWAE-{ns.k}: mean {ms(d)[0]:.3f} "
              f"± {ms(d)[1]:.3f}, sd {d.std(ddof=1):.3f}, range [{d.min():.3f}, "
              f"{d.max():.3f}]; furthest images {list(map(int, worst))} "
              f"({', '.join(f'{d[i]:.2f}' for i in worst)}); {est.seconds:.1f} s", flush=True)
        fig_data[T] = (est.evaluations, ms(est.log_marginal)[0])
        last = est
    return iw, fig_data, last


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--n", type=int, default=100, help="simulated images for BDMC")
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--steps", default="100,300,1000")
    p.add_argument("--leapfrog", type=int, default=5)
    p.add_argument("--real", type=int, default=100, help="real test images (0: skip)")
    p.add_argument("--k", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir")
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    steps = [int(v) for v in ns.steps.split(",")]
    run_dir = Path(ns.run_dir)
    cfg, system, data = load_run(run_dir, ns.data_dir)
    print(f"{run_dir}: {cfg.system} {cfg.system_args}; {torch.get_num_threads()} thread(s); "
          f"C = {ns.chains} chains, {ns.leapfrog} leapfrog steps, sigmoid schedule", flush=True)
    x_all = get_system(cfg.system).model_inputs(data.split("test"))[0]
    out = {"run": str(run_dir), "chains": ns.chains, "leapfrog": ns.leapfrog, "bdmc": {},
           "ais": {}}

    band = bdmc_by_steps(system, x_all[:1], steps, ns, out)
    if ns.real:
        iw, fig_data, last = ais_on_real(system, x_all[: ns.real], steps, ns, out)
        (run_dir / "figures").mkdir(exist_ok=True)
        _figure(run_dir / "figures" / "ais_sandwich.png", iw, fig_data, band, last, ns, cfg)
        out["figure"] = str(run_dir / "figures" / "ais_sandwich.png")
    (run_dir / "ais_accuracy.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"saved {run_dir / 'ais_accuracy.json'}", flush=True)
    return 0


def _figure(path, iw, fig_data, band, est, ns, cfg):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    ks = sorted(iw.iwae)
    ax[0].plot(ks, [iw.iwae[k].mean() for k in ks], "o-", label="IWAE-k (k evaluations)")
    Ts = sorted(fig_data)
    ax[0].plot([fig_data[T][0] for T in Ts], [fig_data[T][1] for T in Ts], "s-",
               label=f"AIS, T = {', '.join(map(str, Ts))}")
    ax[0].axhline(iw.elbo.mean(), color="grey", ls=":", label="ELBO")
    ax[0].set_xscale("log")
    ax[0].set_xlabel("log-joint evaluations per image")
    ax[0].set_ylabel("mean log p(x) estimate, nats")
    ax[0].set_title("real test images")
    ax[0].legend(fontsize=8)
    lo = [band[T][0] for T in sorted(band)]
    hi = [band[T][1] for T in sorted(band)]
    ax[1].fill_between(sorted(band), lo, hi, alpha=0.3, label="BDMC sandwich")
    ax[1].plot(sorted(band), lo, "o-", label="lower (forward AIS)")
    ax[1].plot(sorted(band), hi, "o-", label="upper (reverse AIS)")
    ax[1].set_xscale("log")
    ax[1].set_xlabel("annealing steps T")
    ax[1].set_title(f"simulated images (n = {ns.n})")
    ax[1].legend(fontsize=8)
    d = est.log_marginal
    ax[2].scatter(iw.log_marginal, d, s=8)
    lim = [min(d.min(), iw.log_marginal.min()), max(d.max(), iw.log_marginal.max())]
    ax[2].plot(lim, lim, "k:", lw=1)
    ax[2].set_xlabel(f"IWAE-{ns.k}")
    ax[2].set_ylabel(f"AIS, T = {est.num_steps}")
    ax[2].set_title("per image")
    inset = ax[1].inset_axes([0.55, 0.1, 0.4, 0.3])
    inset.plot(est.accept_trace, lw=0.5)
    inset.axhline(est.target_accept, color="k", lw=0.5)
    inset.set_title("acceptance along schedule", fontsize=7)
    inset.tick_params(labelsize=6)
    fig.suptitle(run_title(cfg, f"IWAE-k and AIS on {iw.n} test images; BDMC on {ns.n} "
                                f"simulated; {ns.chains} chains (benchmarks/ais_accuracy.py)"),
                 fontsize=9)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    Path(tmp).replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
