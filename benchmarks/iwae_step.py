"""Per-step cost of the runner's SVI step against plain PyTorch on the IWAE paper's two
architectures, at the paper's batch 20 and at 128; and what DReG costs over IWAE.

    python benchmarks/iwae_step.py [--seconds 60] [--k 5] [--threads 1]

On a busy 2-core machine use ``--threads 1`` (or OMP_NUM_THREADS=1): with torch's two threads
competing with other jobs, steps of a few milliseconds measured 100-400 ms, in no stable ratio.

Contenders, per (architecture, batch), all interleaved in one run (A B C ... then reversed,
blocks of steps; the figure is the median over blocks of block time / steps):

* ``runner ELBO``: the body of inference/runner.py's step (``Objective("Trace_ELBO", 1)``,
  ``loss.item()``, ``zero_grad``, ``backward``, ``step``) on ``vae --preset iwae-1layer`` or
  ``models.iwae.TwoLayerVAE``;
* ``plain ELBO``: the same networks, weights, draws and single-sample loss written in plain
  PyTorch (manual reparameterization, the models' Bernoulli log density, Gaussian log densities, N/B scale);
* ``runner IWAE k`` and ``runner DReG k``: the runner's step with those losses (no plain twin;
  their ratio is DReG's cost).

Both sides use the burda schedule's Adam settings (betas 0.9/0.999, eps 1e-4, lr 1e-3).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyro  # noqa: E402
import torch  # noqa: E402
from runner_overhead import take_step  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)
from torch.nn import functional as F  # noqa: E402

from inference.data import load_images  # noqa: E402
from inference.runner import Objective  # noqa: E402
from inference.schedules import get_schedule  # noqa: E402
from models.common import bernoulli_log_prob  # noqa: E402
from models.iwae import TwoLayerVAE  # noqa: E402
from models.vae import build_vae  # noqa: E402

DATA = os.environ.get("GENLAB_DATA", str(ROOT.parent / "shared" / "data"))
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
ADAM = dict(lr=1e-3, **get_schedule("burda").adam)


def normal_lp(v, loc, scale):
    return (-0.5 * ((v - loc) / scale).pow(2) - scale.log() - HALF_LOG_2PI).sum()


def plain_loss_1l(m, x, n):
    h = m.encoder(x)
    d = m.latent_dim
    loc, scale = h[:, :d], F.softplus(h[:, d:]) + 1e-4
    z = loc + torch.empty_like(loc).normal_() * scale
    log_px = bernoulli_log_prob(m.decoder(z), x).sum()
    log_pz = (-0.5 * z.pow(2) - HALF_LOG_2PI).sum()
    return -(log_px + log_pz - normal_lp(z, loc, scale)) * (n / x.shape[0])


def plain_loss_2l(m, x, n):
    loc1, sc1 = m.q_z1(x)
    z1 = loc1 + torch.empty_like(loc1).normal_() * sc1
    loc2, sc2 = m.q_z2(z1)
    z2 = loc2 + torch.empty_like(loc2).normal_() * sc2
    ploc, psc = m.p_z1(z2)
    log_px = bernoulli_log_prob(m.p_x(z1), x).sum()
    log_p = log_px + normal_lp(z1, ploc, psc) + (-0.5 * z2.pow(2) - HALF_LOG_2PI).sum()
    return -(log_p - normal_lp(z1, loc1, sc1) - normal_lp(z2, loc2, sc2)) * (n / x.shape[0])


def runner_contender(system, loss, k, probe, n):
    pyro.clear_param_store()
    obj = Objective(loss, k)
    obj(system.model, system.guide, probe, n)  # parameter discovery, as train() does
    params = [p for _, p in sorted(pyro.get_param_store().named_parameters())]
    opt = torch.optim.Adam(params, **ADAM)

    def step(args):
        pyro.util.get_rng_state()  # as the runner does (it keeps the state for Diverged)
        return take_step(obj(system.model, system.guide, args, n), opt)

    return step


def plain_contender(module, loss_fn, n):
    opt = torch.optim.Adam(module.parameters(), **ADAM)

    def step(args):
        return take_step(loss_fn(module, args[0], n), opt)

    return step


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="timed seconds in all")
    ap.add_argument("--k", type=int, default=5, help="particles of the IWAE/DReG rows")
    ap.add_argument("--per-block", type=int, default=5)
    ap.add_argument("--threads", type=int, help="torch threads (default torch's)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, pyro {pyro.__version__}; torch threads "
          f"{torch.get_num_threads()}, machine cores {os.cpu_count()}, load "
          f"{os.getloadavg()[0]:.2f}")
    train = load_images("mnist", "fixed", DATA, download=False).train
    n = len(train)
    probe = train.batch(torch.arange(2), None, ("x",))
    builds = {"1 layer (784-200-200-50)": (lambda: build_vae(preset="iwae-1layer"), plain_loss_1l),
              "2 layers (784-200-200-100-100-100-50)": (TwoLayerVAE, plain_loss_2l)}
    contenders, check = {}, []
    for arch, (build, plain_fn) in builds.items():
        torch.manual_seed(0)
        base = build()
        for batch in (20, 128):
            x = train.batch(torch.arange(batch), None, ("x",))
            # the runner's and the plain loss agree at equal weights and seed
            sys_ = copy.deepcopy(base)
            pyro.clear_param_store()
            torch.manual_seed(7)
            with torch.no_grad():
                r = Objective("Trace_ELBO", 1)(sys_.model, sys_.guide, x, n).item()
            torch.manual_seed(7)
            with torch.no_grad():
                p = plain_fn(copy.deepcopy(base), x[0], n).item()
            check.append(f"{arch}, batch {batch}: runner {r:.6g}, plain {p:.6g} "
                         f"(relative difference {abs(r - p) / abs(p):.1e})")
            contenders[(arch, batch, "runner ELBO")] = runner_contender(
                copy.deepcopy(base), "Trace_ELBO", 1, probe, n)
            contenders[(arch, batch, "plain ELBO")] = plain_contender(copy.deepcopy(base), plain_fn, n)
            for loss in ("IWAE", "DReG"):
                contenders[(arch, batch, f"runner {loss} k={a.k}")] = runner_contender(
                    copy.deepcopy(base), loss, a.k, probe, n)
    print("\n".join(check))
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(n, generator=g)
    names = list(contenders)
    times = {name: [] for name in names}
    for name in names:  # warm-up
        for _ in range(3):
            contenders[name](train.batch(perm[: name[1]], None, ("x",)))
    t0, b = time.perf_counter(), 0
    while time.perf_counter() - t0 < a.seconds or b < 2:
        order = names if b % 2 == 0 else names[::-1]
        for name in order:
            batches = [train.batch(perm[(b * a.per_block + i) * name[1] % (n - name[1]):][: name[1]],
                                   None, ("x",)) for i in range(a.per_block)]
            t = time.perf_counter()
            for args in batches:
                contenders[name](args)
            times[name].append((time.perf_counter() - t) / a.per_block * 1e3)
        b += 1
    print(f"\n{b} interleaved blocks x {a.per_block} steps per contender; Adam({ADAM})")
    print(f"{'architecture':<40} {'batch':>5} {'contender':<18} {'ms/step':>9} {'ratio':>22}")
    for arch in builds:
        for batch in (20, 128):
            med = {c: statistics.median(times[(arch, batch, c)]) for (ar, bt, c) in names
                   if ar == arch and bt == batch}
            for c, v in med.items():
                if c == "runner ELBO":
                    ratio = f"{v / med['plain ELBO']:.2f}x plain"
                elif c.startswith("runner DReG"):
                    ratio = f"{v / med[c.replace('DReG', 'IWAE')]:.2f}x IWAE"
                else:
                    ratio = ""
                print(f"{arch:<40} {batch:>5} {c:<18} {v:>9.3f} {ratio:>22}")


if __name__ == "__main__":
    main()
