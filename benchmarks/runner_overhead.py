"""Per-step cost of genlab's SVI runner path against the same VAE written in plain PyTorch.

    python benchmarks/runner_overhead.py [--quick] [--profile]

Model: the 784-400-20 Bernoulli VAE of models/vae.py (ReLU MLPs, q scale softplus(.) + 1e-4),
single-sample Trace_ELBO (no analytic KL), batch 128 out of the 50,000 fixed-binarized MNIST
training images, Adam(lr=1e-3).

* "runner" row: exactly the per-step code of inference/runner.py's training loop:
  ``pyro.util.get_rng_state()``, ``Objective("Trace_ELBO")(system.model, system.guide, args, n)``,
  ``loss.item()``, ``opt.zero_grad(set_to_none=True)``, ``loss.backward()``, ``opt.step()`` with
  ``torch.optim.Adam`` over the param store's parameters (collected as ``train`` does).
* "plain" row: an nn.Module with the same layers and initial weights, manual reparameterization,
  the models' Bernoulli log density (models.common.bernoulli_log_prob) and Gaussian log densities, the same N/B scaling, ``loss.item()``, Adam.

Both see the same batches in the same order.  Timing: warm-up steps first (not counted), then
blocks of steps alternating between the contenders (A B A B ...; extra variants take their
turn in the same rotation); the figure per contender is the median over its blocks of
(block wall time / steps).  Extra rows, clearly labelled, change one thing in the runner path
to locate its overhead.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyro  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from inference.data import load_images  # noqa: E402
from inference.runner import Objective  # noqa: E402
from models.common import bernoulli_log_prob  # noqa: E402
from models.vae import VAE  # noqa: E402

DATA = "/work/shared/data"
BATCH = 128
LR = 1e-3
TARGET = 1.25
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# ----------------------------------------------------------------------------- contenders
class PlainVAE(nn.Module):
    """The same VAE and loss without Pyro."""

    def __init__(self, x_dim=784, latent_dim=20, hidden=400):
        super().__init__()
        self.d = latent_dim
        self.encoder = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, x_dim))

    def loss(self, x: torch.Tensor, data_size: int) -> torch.Tensor:
        """-(N/B) * sum_i [log p(x_i|z_i) + log p(z_i) - log q(z_i|x_i)], z_i ~ q (one sample)."""
        h = self.encoder(x)
        loc, scale = h[:, : self.d], F.softplus(h[:, self.d:]) + 1e-4
        eps = torch.empty_like(loc).normal_()  # the same draw torch's Normal.rsample makes
        z = loc + eps * scale
        logits = self.decoder(z)
        log_px = bernoulli_log_prob(logits, x).sum()
        log_pz = (-0.5 * z.pow(2) - HALF_LOG_2PI).sum()
        log_qz = (-0.5 * ((z - loc) / scale).pow(2) - scale.log() - HALF_LOG_2PI).sum()
        return -(log_px + log_pz - log_qz) * (data_size / x.shape[0])


def make_runner(seed: int, n: int, probe_args):
    """system, objective and optimizer, set up as inference.runner.train does."""
    torch.manual_seed(seed)
    system = VAE(784, 20, (400,), "relu")
    pyro.clear_param_store()
    objective = Objective("Trace_ELBO", 1)
    objective(system.model, system.guide, probe_args, n)  # discover parameters, as train() does
    named = sorted(pyro.get_param_store().named_parameters())
    opt = torch.optim.Adam([p for _, p in named], lr=LR)
    return system, objective, opt


def make_plain(system: VAE):
    plain = PlainVAE()
    plain.encoder.load_state_dict(system.encoder.state_dict())
    plain.decoder.load_state_dict(system.decoder.state_dict())
    return plain, torch.optim.Adam(plain.parameters(), lr=LR)


def take_step(loss: torch.Tensor, opt) -> float:
    """The optimizer step every contender shares: the value, a finiteness check, backward,
    step (also used by benchmarks/iwae_step.py)."""
    value = loss.item()
    if not math.isfinite(value):
        raise RuntimeError("non-finite loss")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return value


def runner_step(system, objective, opt, args, n):
    """The body of inference/runner.py's step loop (less tqdm and bookkeeping)."""
    rng_before = pyro.util.get_rng_state()  # noqa: F841  (the runner keeps it for Diverged)
    return take_step(objective(system.model, system.guide, args, n), opt)


def plain_step(plain, opt, args, n):
    return take_step(plain.loss(args[0], n), opt)


# ----------------------------------------------------------------------------- main
def fixed_batches(count: int):
    """``count`` fixed-binarized MNIST batches of BATCH images (a seeded walk through the
    training set), the probe batch, and N."""
    train_set = load_images("mnist", "fixed", DATA, download=False).train
    n = len(train_set)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    batches = [train_set.batch(perm[(i * BATCH) % (n - BATCH):][:BATCH], None, ("x",))
               for i in range(count)]
    return batches, train_set.batch(torch.arange(2), None, ("x",)), n


def check_agreement(system, objective, plain, args, n) -> None:
    """The runner's loss and the plain loss at equal weights and seed: the same number."""
    values = []
    for f in (lambda: objective(system.model, system.guide, args, n), lambda: plain.loss(args[0], n)):
        torch.manual_seed(123)
        with torch.no_grad():
            values.append(f().item())
    lr_, lp_ = values
    print(f"check: runner loss {lr_:.6g}, plain loss {lp_:.6g} at equal weights and seed "
          f"(relative difference {abs(lr_ - lp_) / abs(lp_):.1e})")


def time_interleaved(contenders: dict, batches, warm: int, blocks: int, per_block: int,
                     budget: float) -> dict:
    """ms/step per block of ``per_block`` steps, contenders alternating (order flipped every
    block) after ``warm`` uncounted steps; stops after ``budget`` seconds (at least 6 blocks)."""
    names = list(contenders)
    for i in range(warm):
        for name in names:
            contenders[name](batches[i])
    times = {name: [] for name in names}
    t_timed = time.perf_counter()
    for b in range(blocks):
        if b >= 6 and time.perf_counter() - t_timed > budget:
            break
        chunk = batches[warm + b * per_block: warm + (b + 1) * per_block]
        for name in (names if b % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            for args in chunk:
                contenders[name](args)
            times[name].append((time.perf_counter() - t0) / len(chunk) * 1e3)
    return times


def report(times: dict, warm: int, per_block: int) -> None:
    names = list(times)
    base = statistics.median(times["plain PyTorch"])
    print()
    print(f"SVI step, 784-400-20 Bernoulli VAE, batch {BATCH}, Trace_ELBO 1 particle, Adam; "
          f"{len(times[names[0]])} interleaved blocks x {per_block} steps per contender, {warm} "
          "warm-up steps")
    print(f"{'contender':<50} {'median ms/step':>15} {'IQR ms':>15} {'vs plain':>9}")
    for name in names:
        t = sorted(times[name])
        q1, q3 = t[len(t) // 4], t[(3 * len(t)) // 4]
        med = statistics.median(t)
        print(f"{name:<50} {med:>15.3f} {f'{q1:.2f}-{q3:.2f}':>15} {med / base:>8.2f}x")
    r = statistics.median(times[names[0]])
    ratio = r / base
    print()
    print(f"runner/plain = {r:.3f} / {base:.3f} ms/step = {ratio:.2f}x; target <= {TARGET:.2f}x: "
          f"{'MET' if ratio <= TARGET else 'NOT MET'}")


def profile_runner(step, batches) -> None:
    prof = cProfile.Profile()
    prof.enable()
    for args in batches:
        step(args)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short run (under ~30 s)")
    ap.add_argument("--profile", action="store_true", help="also print a cProfile of runner steps")
    a = ap.parse_args()
    # at most `blocks` rounds of `per_block` steps per contender, stopping early once `budget`
    # seconds of timed rounds have passed (the machine is shared: rounds can be slow)
    blocks, per_block, warm, budget = (40, 5, 10, 10.0) if a.quick else (200, 5, 40, 150.0)
    t_start = time.perf_counter()
    print(f"torch {torch.__version__}, pyro {pyro.__version__}; torch threads "
          f"{torch.get_num_threads()} (default), machine cores {os.cpu_count()}")
    batches, probe_args, n = fixed_batches(warm + blocks * per_block)
    system, objective, ropt = make_runner(0, n, probe_args)
    plain, popt = make_plain(system)
    # the variants get their own copies (same initial weights), so every contender trains alike
    novalid_sys, novalid_obj, novalid_opt = make_runner(0, n, probe_args)
    check_agreement(system, objective, plain, batches[0], n)

    def runner(args):
        return runner_step(system, objective, ropt, args, n)

    contenders = {
        "runner (genlab path, validation on = default)": runner,
        "plain PyTorch": lambda args: plain_step(plain, popt, args, n),
        "[variant] runner, pyro.enable_validation(False)":
            lambda args: _novalid(lambda: runner_step(novalid_sys, novalid_obj, novalid_opt, args, n)),
    }
    report(time_interleaved(contenders, batches, warm, blocks, per_block, budget), warm, per_block)
    if a.profile:
        profile_runner(runner, batches[:per_block * 2])
    print(f"(total wall time {time.perf_counter() - t_start:.1f} s)")


def _novalid(fn):
    with pyro.validation_enabled(False):
        return fn()


if __name__ == "__main__":
    main()
