"""Build notebooks/dirichlet_categorical.ipynb (run from the repo root or notebooks/)."""


from nbbuild import write_notebook
from nbformat.v4 import new_code_cell, new_markdown_cell

CELLS = [
    new_markdown_cell("""# Dirichlet–Categorical: conjugate checks and GRU meta-learners against Bayes

Issue 6; the math and the measured figures are in `docs/dirichlet_categorical.md`.
Part 1 checks SVI on the conjugate model against its closed forms (posterior, ELBO gap, IWAE,
SBC, NUTS). Part 2 trains the study's meta-learners M1–M4 (GRU, 1,000 mini-batches of 128
sequences of length 100) and holds them against the Bayes-optimal predictor.

`GENLAB_SMOKE=1` runs everything tiny; `GENLAB_RUNS` says where runs go (default `../runs`).
Runs that already exist are reused, not retrained."""),
    new_code_cell("""import logging, os
from pathlib import Path
import torch
from IPython.display import Image, display

from inference.runner import RunConfig, train_if_missing
from evaluation.api import load_run
from evaluation.reports import dirichlet as dreport, meta as mreport

torch.set_num_threads(1)
logging.getLogger("pyro").setLevel(logging.WARNING)
SMOKE = os.environ.get("GENLAB_SMOKE") == "1"
RUNS = Path(os.environ.get("GENLAB_RUNS", "../runs"))
print("smoke" if SMOKE else "full", "runs in", RUNS)"""),
    new_markdown_cell("""## 1. The conjugate model

One sequence of 100 symbols from p ~ Dirichlet(1.3, 1.3, 1.3); SVI (Trace_ELBO, 32 particles,
mini-batches of 10 symbols, Adam lr 0.3 decayed by 0.97 per epoch, 200 epochs = 2,000 steps).
The report prints the checks and draws three figures."""),
    new_code_cell("""drun = RUNS / ("dirichlet-smoke" if SMOKE else "dirichlet")
cfg = RunConfig(system="dirichlet",
                data_args=dict(alpha=[1.3, 1.3, 1.3], symbols=20 if SMOKE else 100, sequences=1,
                               p=None, test_symbols=None, data_seed=0),
                epochs=5 if SMOKE else 200, batch_size=10, lr=0.3, lr_decay=0.97, k=32, seed=0)
train_if_missing(cfg, drun)
cfg, system, data = load_run(drun)
opts = dreport.Options(k=[1, 10, 100] if SMOKE else [1, 10, 100, 1000, 10000], seed=0, split="test")
paths = dreport.report(drun, cfg, system, data, None, opts)
for p in paths:
    display(Image(str(p)))"""),
    new_markdown_cell("""## 2. Meta-learners M1–M4 against the Bayes-optimal predictor

M1 = (T=5, α=(10,1,1)), M2 = (T=20, α=(10,1,1)), M3 = (T=5, α=(1.3,1.3,1.3)),
M4 = (T=20, α=(1.3,1.3,1.3)). The same runs as `benchmarks/meta_kl.py` (which may have
continued them past 1,000 mini-batches where the KL target was not met)."""),
    new_code_cell("""MODELS = {"M1": (5, [10.0, 1.0, 1.0]), "M2": (20, [10.0, 1.0, 1.0]),
          "M3": (5, [1.3, 1.3, 1.3]), "M4": (20, [1.3, 1.3, 1.3])}
mdir = RUNS / ("meta-smoke" if SMOKE else "meta")
runs = []
for name, (T, alpha) in MODELS.items():
    out = mdir / name
    n, epochs = (256, 1) if SMOKE else (6400, 20)
    cfg = RunConfig(system="meta", system_args=dict(hidden=32, head=[64], activation="relu"),
                    data_args=dict(alpha=alpha, period=T, p=None, length=100, sequences=n,
                                   valid_sequences=200 if SMOKE else 1000,
                                   test_sequences=200 if SMOKE else 1000, data_seed=0),
                    epochs=epochs, batch_size=128, lr=1e-3, seed=0,
                    keep_epochs=list(range(1, epochs + 1)))
    train_if_missing(cfg, out)
    runs.append(out)
paths = mreport.compare(runs, mreport.CompareOptions(out=str(mdir), data_dir=None, fixed_p=None))
for p in paths:
    display(Image(str(p)))"""),
    new_markdown_cell("""Reading (full runs; the numbers are in the printed lines above and in `docs/dirichlet_categorical.md`):
the GRU learns the reset schedule in all four models, but for T = 20 the KL per step spikes at
every reset position (it has to count 19 steps) and creeps up towards the end of each block; for
T = 5 it stays at 1e-4 to 1e-3. Under the biased prior α = (10,1,1) we do not see the study's
over-estimate of symbol 0 for T = 5. On fixed-p = (1,0,0) sequences under the flat prior with
long blocks (M4), the GRU first moves faster than Bayes and then saturates below it: long runs of
one symbol are rare in training."""),
]


def main():
    write_notebook(CELLS, "dirichlet_categorical.ipynb")


if __name__ == "__main__":
    main()
