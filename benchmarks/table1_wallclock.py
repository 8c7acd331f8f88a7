"""How long the IWAE paper's full Table 1 takes on this machine: every cell's training step,
timed, times the paper's 3,280 passes.

    python benchmarks/table1_wallclock.py [--seconds 60] [--threads 1]

For each distinct run of ``make reproduce`` (10: the k = 1 VAE and IWAE cells are one run per
architecture), the runner's step (``inference.runner.Objective`` with the cell's loss and k,
``loss.item()``, backward, the burda schedule's Adam step; the body of the runner's training
loop, as in ``benchmarks/iwae_step.py``) on batches of 20 fixed-binarized training images is
timed in interleaved blocks (``benchmarks/runner_overhead.py``'s ``time_interleaved``: A B C ...
then reversed, after 3 warm-up steps; the figure is the median block time per step), with denormals flushed as the runner does (``inference.importance.flush_denormals``).  The estimate per cell is ms/step x 2,500 steps per pass x 3,280 passes; it leaves out
the per-epoch validation, checkpoints and the dynamic binarization draw (each well under 1 % of
an epoch in ``runs/reproduce``'s logs), and the final IWAE K = 5000 evaluation.  Two cores run
two one-thread cells at once, so the table's wall-clock on this machine is about half the sum.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyro  # noqa: E402
import torch  # noqa: E402
from iwae_step import DATA, runner_contender  # noqa: E402  (benchmarks/ is the script's folder)
from runner_overhead import time_interleaved  # noqa: E402

from evaluation.reproduce import ALL_CELLS, ARCH, PAPER_PASSES, cell_config, run_key  # noqa: E402
from inference.data import load_images  # noqa: E402
from inference.importance import flush_denormals  # noqa: E402
from models.iwae import TwoLayerVAE  # noqa: E402
from models.vae import build_vae  # noqa: E402

BATCH = 20
MAX_BLOCKS = 400  # rounds at most (each contender: --per-block steps per round)
BUILD = {"iwae-1layer": lambda: build_vae(preset="iwae-1layer"), "iwae-2layer": TwoLayerVAE}


def main(argv=None) -> None:
    with flush_denormals():  # as the runner trains
        _main(argv)


def _main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="timed seconds in all")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per cell")
    ap.add_argument("--per-block", type=int, default=3)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    train = load_images("mnist", "fixed", DATA, download=False).train
    n = len(train)
    probe = train.batch(torch.arange(2), None, ("x",))
    runs = {}
    for cell in ALL_CELLS:
        key = run_key(cell)
        if key in runs:
            continue
        preset = ARCH[cell.layers][1]
        torch.manual_seed(0)
        cfg = cell_config(cell, budget=1)[0]  # the cell's loss and k, as reproduce trains it
        runs[key] = (cfg, runner_contender(copy.deepcopy(BUILD[preset]()), cfg.loss, cfg.k, probe, n))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    warm, blocks = 3, MAX_BLOCKS
    batches = [train.batch(perm[(i * BATCH) % (n - BATCH):][:BATCH], None, ("x",))
               for i in range(warm + blocks * a.per_block)]
    times = time_interleaved({name: step for name, (_, step) in runs.items()}, batches, warm,
                             blocks, a.per_block, a.seconds)
    names, b = list(runs), len(next(iter(times.values())))
    steps = PAPER_PASSES * (n // BATCH)
    print(f"torch {torch.__version__}, pyro {pyro.__version__}; {torch.get_num_threads()} torch "
          f"thread(s) per cell, machine cores {os.cpu_count()}, load {os.getloadavg()[0]:.2f}; "
          f"{b} interleaved blocks x {a.per_block} steps per run, batch {BATCH}")
    print(f"{'run (cells)':<34} {'loss':<12} {'ms/step':>8} {'3,280 passes (h)':>17}")
    total = 0.0
    for name in names:
        cfg, _ = runs[name]
        ms = statistics.median(times[name])
        hours = ms * steps / 3.6e6
        total += hours
        print(f"{name:<34} {cfg.loss + f' k={cfg.k}':<12} {ms:>8.2f} {hours:>17.1f}")
    print(f"the full table: {total:.0f} CPU-hours of training at {torch.get_num_threads()} "
          f"thread(s) per run; about {total / max(1, (os.cpu_count() or 1) // a.threads) / 24:.1f} "
          f"days on this machine's {os.cpu_count()} cores, one run per core")


if __name__ == "__main__":
    main()
