"""Writes notebooks/vae_mnist.ipynb (the VAE study).  Run: python notebooks/build_vae_mnist.py"""

from nbbuild import code, md, write_notebook

cells = []
cells.append(md(r"""
# The VAE on binarized MNIST — study 2, parts (c)–(e)

The probability model (`models/vae.py`), for each image $x \in \{0,1\}^{784}$:

$$z \sim \mathcal N(0, I_d), \qquad x_j \mid z \sim \text{Bernoulli}(\sigma(f_\theta(z))_j),$$

and the guide $q_\phi(z\mid x) = \mathcal N(\mu_\phi(x), \text{diag}\,\sigma_\phi(x)^2)$.
There are **two sources of randomness**: the latent $z$, and the Bernoulli pixels given $z$.
Every figure below says which one it shows.

Everything here calls the library (`inference.runner.train`, `evaluation.api.evaluate`,
`evaluation.reports.vae`); nothing is re-implemented. With `GENLAB_SMOKE=1` the notebook runs
on tiny settings (the test suite does this); the committed copy was executed on real runs.
"""))

cells.append(code(r"""
import json, os
from pathlib import Path

import numpy as np
import pandas as pd
from IPython.display import Image, display

from inference.runner import RunConfig, read_metrics, train_if_missing
from evaluation.api import evaluate, load_run
from evaluation.cli import format_table
from inference.importance import estimate_log_marginal
from evaluation.plotting import save
from evaluation.reports import vae as R

SMOKE = os.environ.get("GENLAB_SMOKE") == "1"
RUNS = Path(os.environ.get("GENLAB_RUNS", "../runs"))
DATA = os.environ.get("GENLAB_DATA")  # None: the library finds it ($GENLAB_DATA, else the user cache)
EPOCHS = 1 if SMOKE else 50                # real runs: 50 epochs, batch 128, Adam 1e-3, dynamic binarization
LIMIT = 300 if SMOKE else None
K = 20 if SMOKE else 1000                  # importance samples per test image
N_TEST = 60 if SMOKE else 2000             # first N test images (the test set is not ordered by class)
KS = (1, 5, 20) if SMOKE else (1, 10, 100, 1000)
print(f"smoke={SMOKE}, runs in {RUNS}, epochs={EPOCHS}, K={K}, test images={N_TEST}")


def ensure_run(name, epochs=EPOCHS, **data_args):
    # train the run unless its directory already holds it (inference.runner.train_if_missing)
    latent = {"vae-d4": 4, "vae-d50": 50}.get(name, 20)
    cfg = RunConfig(system="vae", system_args=dict(latent_dim=latent, hidden=[400], activation="relu"),
                    data_args=dict(dataset="mnist", binarization="dynamic", **data_args),
                    epochs=epochs, limit=LIMIT, data_dir=DATA, seed=0)
    return train_if_missing(cfg, RUNS / name)


def show(paths):
    for p in paths if isinstance(paths, list) else [paths]:
        display(Image(filename=str(p)))


# the options of `python -m evaluation compare RUN_A RUN_B --k ... --limit N_TEST`
COMPARE = R.CompareOptions(k=list(KS), split="test", limit=N_TEST, seed=0, data_dir=DATA)
"""))

cells.append(md("""
## Training: d = 4 and d = 20

Both with the same seed, data and optimizer; the curves share their axes. `train_elbo` is the
mean over the epoch's mini-batches (the model changes during the epoch); `val_elbo` is measured
on the 10,000 validation images at the end of each epoch.
"""))

cells.append(code(r"""
runs = {"d=4": ensure_run("vae-d4"), "d=20": ensure_run("vae-d20")}
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(7, 4))
for i, (name, path) in enumerate(runs.items()):
    m = pd.DataFrame(read_metrics(path))
    ax.plot(m.epoch, m.train_elbo, color=f"C{i}", ls="--", label=f"{name} train")
    ax.plot(m.epoch, m.val_elbo, color=f"C{i}", label=f"{name} validation")
ax.set_xlabel("epoch"); ax.set_ylabel("ELBO, nats per image"); ax.legend()
ax.set_title("vae d=4 vs d=20 · mnist/dynamic · Trace_ELBO k=1 · training curves", fontsize=9)
show(save(fig, RUNS, "vae_training_curves", subdir="study_figures"))
"""))

cells.append(md("""
## ELBO against the importance-weighted estimate

Monte Carlo *outside* the log gives the ELBO, $E_q[\\log p(x,z) - \\log q(z|x)]$, a lower bound
we can train on with one sample per image (the epoch's many images do the averaging).
Monte Carlo *inside* the log, $\\log \\frac1K\\sum_k p(x,z_k)/q(z_k|x)$, is the IWAE estimate:
its expectation rises with K towards $\\log p(x)$. To ask *which images are likely*
(part d) we want $\\log p(x)$ itself, so we use the inside-the-log estimate with large K on the
weights we already trained; more samples in training are not needed for that.
"""))

cells.append(code(r"""
ests = {}
for name, path in runs.items():
    _ev = evaluate(path, KS, "test", N_TEST, seed=0, data_dir=DATA)
    est, summary, cfg = _ev.estimate, _ev.summary, _ev.config
    ests[name] = est
    print(format_table(summary, cfg), "\n")
"""))

cells.append(code(r"""
cfg, vae20, data = load_run(runs["d=20"], DATA)
show(save(R.bounds_figure(ests["d=20"], cfg), runs["d=20"], "elbo_vs_iwae"))
"""))

cells.append(md("""
## (c) Reconstruction, generation, corruption, interpolation (d = 20)
"""))

cells.append(code(r"""
import torch
torch.manual_seed(0)
x = data.test.x[:N_TEST]
show([save(R.reconstruction_figure(vae20, x[:8], cfg), runs["d=20"], "reconstruction"),
      save(R.generation_figure(vae20, cfg), runs["d=20"], "generation"),
      save(R.corruption_figure(vae20, x[:6], cfg), runs["d=20"], "corruption")])
"""))

cells.append(md("""
Interpolating between two images in latent space is a question with more than one answer:
between the posterior means, between posterior samples, or by sampling from the interpolated
posterior. The figure shows all three, one row each; its caption says what each row means.
"""))

cells.append(code(r"""
y = data.test.y[:N_TEST]
j = int((y != y[0]).nonzero()[0])
show(save(R.interpolation_figure(vae20, x[0], x[j], cfg), runs["d=20"], "interpolation"))
"""))

cells.append(md("""
## (d) Which images are likely?

Per-image $\\log p(x)$ by the importance-weighted estimate, by digit class. Ones are the
likely bump on the right (few pixels on); the more interesting comparison is *within* a class.
"""))

cells.append(code(r"""
ll, labels = ests["d=20"].log_marginal, y.numpy()
show([save(R.loglik_by_digit_figure(ll, labels, cfg, K), runs["d=20"], "loglik_by_digit"),
      save(R.likely_images_figure(ll, x.numpy(), labels, 6, cfg, K), runs["d=20"], "likely_unlikely_digit6")])
print(pd.Series(ll).groupby(labels).agg(["mean", "std", "count"]).round(2))
"""))

cells.append(md("""
## (e) Held-out log-likelihood: d = 4 against d = 20 (and d = 50)

**Expectation, written before the result.** With d too small the decoder must squeeze every
image's variation through 4 numbers: images that differ in style as well as class get blurred
to a common template, so held-out log-likelihood suffers. A larger d can only help the *model's*
capacity, but the ELBO pays a KL price for every latent unit it uses and the amortized guide
must fit more dimensions; in practice units the data do not need collapse to the prior
("inactive units"), so beyond some d the likelihood should flatten, and can fall slightly when
the guide's error grows with d. We expect d = 20 clearly better than d = 4, and d = 50 about as
good as d = 20 with fewer of its units active.
"""))

cells.append(code(r"""
runs["d=50"] = ensure_run("vae-d50")
_ev = evaluate(runs["d=50"], KS, "test", N_TEST, seed=0, data_dir=DATA)
est50, s50, cfg50 = _ev.estimate, _ev.summary, _ev.config
ests["d=50"] = est50
rows = []
for name, path in runs.items():
    c, v, d = load_run(path, DATA)
    _, active = R.active_units(v, d.test.x[:N_TEST])
    e = ests[name]
    rows.append(dict(model=name, elbo=e.elbo.mean(), iwae=e.log_marginal.mean(),
                     se=e.log_marginal.std(ddof=1) / np.sqrt(e.n), active_units=f"{active} of {v.latent_dim}",
                     khat_gt_07=np.mean(e.khat > 0.7)))
print(f"test images: {N_TEST}, IWAE K={K}")
pd.DataFrame(rows).round(3)
"""))

cells.append(code(r"""
paths = R.compare([str(runs["d=4"]), str(runs["d=20"])], COMPARE)
show(paths)
"""))

cells.append(md("""
## "Extreme" holdout via one-dimensional PCA

The first principal component of the training images (grey levels) mostly measures how much
ink an image has. We hold out the top 5 % and, separately, the bottom 5 % along it, train on
the rest, and compare the log-likelihood of each extreme set with that of the ordinary test set.
An ordinary held-out set tests interpolation; an extreme one tests extrapolation.
"""))

cells.append(code(r"""
rows = []
for which in ("pca-top", "pca-bottom"):
    path = ensure_run(f"vae-d20-{which}", epochs=1 if SMOKE else 30, holdout=which)
    n_hold = N_TEST if SMOKE else 1000
    _ev = evaluate(path, KS, "holdout", n_hold, seed=0, data_dir=DATA)
    e_hold, s_hold, v, d = _ev.estimate, _ev.summary, _ev.system, _ev.data
    _ev = evaluate(path, KS, "test", N_TEST, seed=0, data_dir=DATA)
    e_test, s_test = _ev.estimate, _ev.summary
    # the same extreme images under the d=20 model that saw them in training
    hold_x = d.split("holdout").x[:n_hold]
    e_seen = estimate_log_marginal(vae20.model, vae20.guide, hold_x, num_samples=K)
    rows.append(dict(trained_without=which, holdout_ll=e_hold.log_marginal.mean(),
                     holdout_se=s_hold["iwae"][K]["se"], test_ll=e_test.log_marginal.mean(),
                     test_se=s_test["iwae"][K]["se"], n_holdout=s_hold["n"],
                     same_images_under_full_d20=e_seen.log_marginal.mean()))
pd.DataFrame(rows).round(2)
"""))

cells.append(md("""
## How far below the truth is IWAE? AIS and BDMC (d = 20)

k-hat > 0.7 on most images says the IWAE numbers above are lower bounds of unknown tightness.
Annealed importance sampling (`evaluation.ais_log_marginal`: HMC transitions from the guide to
the posterior along a sigmoid schedule) is a much tighter lower bound; BDMC runs it forwards and
backwards on images *simulated from the model*, where the exact posterior sample is known, and
brackets log p(x) between the two: the gap is AIS's own error for this model and schedule.
"""))

cells.append(code(r"""
from evaluation.ais import ais_figure, ais_log_marginal, bdmc, bdmc_figure
import pyro

N_AIS, T_AIS, C_AIS = (12, 10, 2) if SMOKE else (500, 300, 4)
cfg20, vae20_, _ = load_run(runs["d=20"], data_dir=DATA)
x_ais = data.test.x[:N_AIS]
pyro.set_rng_seed(0)
ais = ais_log_marginal(vae20_.model, vae20_.guide, x_ais, num_chains=C_AIS, num_steps=T_AIS)
pyro.set_rng_seed(0)
iw = estimate_log_marginal(vae20_.model, vae20_.guide, x_ais, num_samples=K)
diff = ais.log_marginal - iw.log_marginal
print(f"{N_AIS} test images: IWAE-{K} {iw.log_marginal.mean():.3f}, AIS (T={T_AIS}, {C_AIS} chains) "
      f"{ais.log_marginal.mean():.3f} nats/image; AIS - IWAE = {diff.mean():.3f} ± "
      f"{diff.std(ddof=1) / len(diff) ** 0.5:.3f} (max {diff.max():.2f}, on image {diff.argmax()})")
pyro.set_rng_seed(0)
sand = bdmc(vae20_.model, vae20_.guide, x_ais, n=min(N_AIS, 100), num_chains=C_AIS, num_steps=T_AIS)
print(f"BDMC on {sand.lower.size} simulated images: lower {sand.lower.mean():.3f}, upper "
      f"{sand.upper.mean():.3f}, gap {sand.gap.mean():.3f} ± {sand.gap.std(ddof=1) / sand.gap.size ** 0.5:.3f} nats")
show([save(ais_figure(ais, iw, cfg20), runs["d=20"], "ais_notebook"),
      save(bdmc_figure(sand, cfg20, T_AIS, C_AIS), runs["d=20"], "bdmc_notebook")])
"""))

write_notebook(cells, "vae_mnist.ipynb")
