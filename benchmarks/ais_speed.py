"""AIS's evaluations of the annealed log joint and its gradient per second, against the same
VAE log joint written in plain PyTorch, interleaved in one run.

AIS's path is exactly what the integrator calls (``pyro.ops.integrator.potential_grad`` on
``evaluation.ais._Annealer.potential``): the Pyro model run under a light handler that
substitutes z and sums unscaled log-probabilities, plus the guide's log-density from its
distribution traced once per chunk.  The plain version computes
``-((1-b) log q(z|x) + b (log p(z) + log p(x|z)))`` with the decoder, ``models.common.bernoulli_log_prob`` (the models' own) and ``Normal.log_prob`` directly, and ``torch.autograd.grad``.

    GENLAB_DATA=/work/shared/data nice python benchmarks/ais_speed.py [--run runs/vae-d20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch
from pyro.ops.integrator import potential_grad

from evaluation.ais import _Annealer
from inference.importance import probe
from models.common import bernoulli_log_prob


def plain_energy(system, x, loc, scale, beta):
    def f(z):
        logits = system.decode(z)
        lik = bernoulli_log_prob(logits, x).sum(-1)
        prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        q = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
        e = -((1.0 - beta) * q + beta * (prior + lik))
        return e

    return f


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="a trained VAE run directory (default: an untrained d=20 VAE)")
    p.add_argument("--sizes", default="1x1,16x10,100x10,100x100",
                   help="chains x datapoints, comma-separated")
    p.add_argument("--seconds", type=float, default=1.0, help="per block")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    pyro.set_rng_seed(0)
    if ns.run:
        from evaluation.api import load_run
        from inference.systems import get_system

        cfg, system, data = load_run(ns.run)
        xs = get_system(cfg.system).model_inputs(data.split("test"))[0]
        name = ns.run
    else:
        from models.vae import VAE

        system = VAE(latent_dim=20)
        xs = torch.bernoulli(torch.full((100, 784), 0.2))
        name = "untrained VAE d=20 (784-400-20)"
    system.eval()
    print(f"{name}; {torch.get_num_threads()} thread(s); beta = 0.5; "
          f"blocks of {ns.seconds:.1f} s interleaved, {ns.rounds} rounds, median")
    print(f"{'chains x data':>14} {'AIS path /s':>12} {'plain /s':>10} {'ratio':>7}")
    for size in ns.sizes.split(","):
        C, N = (int(v) for v in size.split("x"))
        x = xs[:N]
        st = probe(system.model, system.guide, (x[:2],), {}, "data", 2)
        ann = _Annealer(system.model, system.guide, (x,), {}, C, st, "data", "guide")
        ann.beta = 0.5
        u = ann.u0.clone()
        with torch.no_grad():
            loc, scale = system.encode(x)
        plain = plain_energy(system, x, loc, scale, 0.5)
        # same numbers first
        with torch.no_grad():
            e_ais = -((0.5) * sum(ann.terms(u)[:2]) + ann.terms(u)[2])
            e_plain = plain(u)
        assert torch.allclose(e_ais, e_plain, rtol=1e-4, atol=1e-3), (e_ais - e_plain).abs().max()

        def run_ais(ann=ann, u=u):
            potential_grad(ann.potential, {"u": u})
            ann._calls.clear()

        def run_plain(u=u, plain=plain):
            z = u.clone().requires_grad_(True)
            torch.autograd.grad(plain(z).sum(), z)

        rates = {"ais": [], "plain": []}
        for f in (run_ais, run_plain):  # warm-up
            for _ in range(3):
                f()
        for _ in range(ns.rounds):
            for key, f in (("ais", run_ais), ("plain", run_plain)):
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < ns.seconds:
                    f()
                    n += 1
                rates[key].append(n / (time.perf_counter() - t0))
        a, b = statistics.median(rates["ais"]), statistics.median(rates["plain"])
        print(f"{f'{C} x {N}':>14} {a:12.1f} {b:10.1f} {b / a:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
