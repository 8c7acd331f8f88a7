"""Mean per-step KL(Bayes || GRU) of the meta-learners M1-M4 after the study's 1,000 mini-batches.

    python benchmarks/meta_kl.py [--out runs/meta] [--max-batches 3000] [--quick]

M1 = (T=5, alpha=(10,1,1)), M2 = (T=20, alpha=(10,1,1)), M3 = (T=5, alpha=(1.3,1.3,1.3)),
M4 = (T=20, alpha=(1.3,1.3,1.3)) as in the study.  Each is one runner run of the ``meta``
system: GRU(32) -> ReLU -> FC(64) -> ReLU -> FC(4), sequences of length L = 100, batch size
B = 128, Adam lr 1e-3, a training set of 6,400 sequences (50 mini-batches per epoch), 20 epochs
= 1,000 mini-batches, every epoch's checkpoint kept.  KL is measured on the 1,000 test sequences
of the run (the training law), per kept epoch.  Where the mean KL is still above the 0.01
nats/step target after 1,000 mini-batches, the run is resumed (more epochs over the same
training set) up to ``--max-batches`` and the first kept epoch below the target is reported.
Runs that already exist in ``--out`` are reused (resumed when they are shorter).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from inference.runner import train_if_missing  # noqa: E402

MODELS = {"M1": (5, [10.0, 1.0, 1.0]), "M2": (20, [10.0, 1.0, 1.0]),
          "M3": (5, [1.3, 1.3, 1.3]), "M4": (20, [1.3, 1.3, 1.3])}
TARGET = 0.01


def config(period, alpha, epochs, max_epochs, quick=False):
    from inference.runner import RunConfig

    n = 640 if quick else 6400
    return RunConfig(system="meta", system_args=dict(hidden=32, head=[64], activation="relu"),
                     data_args=dict(alpha=alpha, period=period, p=None, length=100, sequences=n,
                                    valid_sequences=1000, test_sequences=1000, data_seed=0),
                     epochs=epochs, batch_size=128, lr=1e-3, seed=0,
                     keep_epochs=list(range(1, max_epochs + 1)))


def kl_curve(out: Path):
    from evaluation.api import load_run
    from evaluation.reports.meta import learning_curves

    cfg, system, data = load_run(out)
    c = learning_curves(out, cfg, system, data.test.x)
    return c["kl_batches"].tolist(), c["kl"].tolist()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "meta"))
    ap.add_argument("--max-batches", type=int, default=3000)
    ap.add_argument("--quick", action="store_true", help="tiny runs (smoke)")
    ap.add_argument("--models", default="M1,M2,M3,M4")
    ns = ap.parse_args()
    torch.set_num_threads(1)
    import logging

    logging.getLogger("pyro").setLevel(logging.WARNING)
    per_epoch = 5 if ns.quick else 50
    study_epochs = 2 if ns.quick else 1000 // per_epoch
    max_epochs = max(study_epochs, ns.max_batches // per_epoch)
    rows = []
    for name in ns.models.split(","):
        period, alpha = MODELS[name]
        out = Path(ns.out) / name
        t0 = time.perf_counter()
        train_if_missing(config(period, alpha, study_epochs, max_epochs, ns.quick), out)
        batches, kl = kl_curve(out)
        at_study = dict(zip(batches, kl))[study_epochs * per_epoch]
        if at_study >= TARGET and max_epochs > study_epochs:
            for e in range(study_epochs + 10, max_epochs + 1, 10):  # resume 10 epochs at a time
                train_if_missing(config(period, alpha, e, max_epochs, ns.quick), out)
                batches, kl = kl_curve(out)
                if kl[-1] < TARGET:
                    break
        reached = next((b for b, k in zip(batches, kl) if k < TARGET), None)
        rows.append((name, period, alpha, at_study, reached, batches[-1], kl[-1],
                     time.perf_counter() - t0))
    print(f"mean per-step KL(Bayes || GRU) on 1000 test sequences, L=100, B=128, lr 1e-3; "
          f"target < {TARGET} nats/step")
    print(f"{'model':<6}{'T':>4}  {'alpha':<16}{'KL @1000':>10}  {'first < target':>15}  "
          f"{'KL @last':>9} (batches){'seconds':>9}")
    for name, T, a, k1, reached, last_b, last_k, sec in rows:
        r = f"{reached}" if reached is not None else f"> {last_b}"
        print(f"{name:<6}{T:>4}  {str(tuple(a)):<16}{k1:>10.4f}  {r:>15}  {last_k:>9.4f} "
              f"({last_b}){sec:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
