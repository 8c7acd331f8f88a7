"""What flushing denormals (``inference.importance.flush_denormals``) buys, and that it changes
no number.

    python benchmarks/denormals.py [--run RUN] [--eval-run runs/vae-d20] [--seconds 40]

(a) Training: the runner's IWAE k = 50 step (batch 20, the burda schedule's Adam; the body of
the training loop as in ``benchmarks/iwae_step.py``) on the one-layer IWAE-paper VAE, started
from ``--run``'s weights when given (denormals appear once a model has trained: most of the 50
self-normalized weights fall below 1e-38), else from 300 untimed steps from scratch.  Flushing
off and on are two copies of the same model, stepped in interleaved blocks of 3 steps
(``time_interleaved`` of benchmarks/runner_overhead.py, 2 warm-up steps; each contender sets
the flag before its step); then both are stepped 50 times more from the same state and seed,
and every loss compared bit for bit.
(b) Evaluation: ``estimate_log_marginal`` with K = 1000 on 48 fixed-binarized test images with
``--eval-run``'s model (if given), without and with the estimator's flushing, twice each, the
estimates compared bit for bit.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from iwae_step import DATA, runner_contender  # noqa: E402  (benchmarks/ is the script's folder)
from runner_overhead import time_interleaved  # noqa: E402

from inference.data import load_images  # noqa: E402
from inference.importance import estimate_log_marginal  # noqa: E402
from models.vae import build_vae  # noqa: E402

MAX_BLOCKS = 400  # rounds at most, 3 steps per contender each


def batches(train, count: int, start: int = 0):
    return [train.batch(torch.arange((start + i) * 20 % 49980, (start + i) * 20 % 49980 + 20),
                        None, ("x",)) for i in range(count)]


def training(vae, train, seconds: float, warm: int) -> None:
    n = len(train)
    probe = train.batch(torch.arange(2), None, ("x",))
    if warm:
        step = runner_contender(vae, "IWAE", 50, probe, n)
        for args in batches(train, warm):
            step(args)
    steps = {flag: runner_contender(copy.deepcopy(vae), "IWAE", 50, probe, n) for flag in (False, True)}

    def flagged(flag):  # the contender sets the CPU's mode before each of its steps
        def step(args):
            torch.set_flush_denormal(flag)
            return steps[flag](args)
        return step

    times = time_interleaved({False: flagged(False), True: flagged(True)},
                             batches(train, 2 + MAX_BLOCKS * 3, warm), 2, MAX_BLOCKS, 3, seconds)
    b = len(times[False])
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"(a) IWAE k=50 training step, batch 20, {b} interleaved blocks of 3 steps: flushing off "
          f"{off:.2f} ms, on {on:.2f} ms ({off / on:.2f}x)")
    losses = {}
    for flag in (False, True):
        torch.set_flush_denormal(flag)
        torch.manual_seed(5)
        step = runner_contender(copy.deepcopy(vae), "IWAE", 50, probe, n)
        losses[flag] = [step(args) for args in batches(train, 50, 7)]
    torch.set_flush_denormal(False)
    print(f"    50 steps from the same state and seed: every loss identical: {losses[False] == losses[True]}")


def evaluation(vae, x) -> None:
    import contextlib

    import inference.importance as importance

    genlab_flush = importance.flush_denormals
    out = {False: [], True: []}
    for flag in (False, True, False, True):
        # off: the estimator with its flushing replaced by a no-op; on: genlab's estimator
        importance.flush_denormals = genlab_flush if flag else contextlib.nullcontext
        torch.manual_seed(0)
        t = time.perf_counter()
        est = estimate_log_marginal(vae.model, vae.guide, x, num_samples=1000)
        out[flag].append((time.perf_counter() - t, np.asarray(est.log_marginal)))
    importance.flush_denormals = genlab_flush
    same = np.array_equal(out[False][0][1], out[True][0][1])
    print(f"(b) IWAE K=1000 estimate of {x.shape[0]} images: flushing off {min(t for t, _ in out[False]):.2f} s, "
          f"on (genlab's estimator) {min(t for t, _ in out[True]):.2f} s; estimates identical: {same}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="(a) start from this trained iwae-1layer VAE run's weights "
                    "(default: 300 untimed steps from scratch)")
    ap.add_argument("--eval-run", help="(b) a trained VAE run to evaluate (e.g. runs/vae-d20)")
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, {torch.get_num_threads()} thread(s), "
          f"load {os.getloadavg()[0]:.2f}")
    data = load_images("mnist", "fixed", DATA, download=False)
    from evaluation.api import load_run

    if a.run:
        vae = load_run(a.run).system
    else:
        torch.manual_seed(0)
        vae = build_vae(preset="iwae-1layer")
    training(vae, data.train, a.seconds, 0 if a.run else 300)
    if a.eval_run:
        evaluation(load_run(a.eval_run).system, data.test.x[:48])


if __name__ == "__main__":
    main()
