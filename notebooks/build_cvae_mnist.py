"""Writes notebooks/cvae_mnist.ipynb (the conditional VAE).  Run: python notebooks/build_cvae_mnist.py"""

from nbbuild import code, md, write_notebook

cells = []
cells.append(md(r"""
# The conditional VAE — study 2, part (f)

The probability model (`models/cvae.py`): the label $y$ is a **covariate**, like a predictor in
regression. It is an argument of the model and the guide, one-hot encoded, and never a random
variable:

$$z \sim \mathcal N(0, I_d), \qquad x_j \mid z, y \sim \text{Bernoulli}(\sigma(f_\theta(z, \text{onehot}(y)))_j),
\qquad q_\phi(z \mid x, y).$$

The guide takes both $x$ and $y$ because the perfect proposal is the posterior $p(z \mid x, y)$,
which depends on both. (Where the label *is* random — unlabelled images — one needs a prior
$p(y)$ and a sample site for $y$: that is Kingma et al.'s semi-supervised M2 model.)

With `GENLAB_SMOKE=1` the notebook runs on tiny settings; the committed copy was executed on
real runs. Everything is a call into the library.
"""))

cells.append(code(r"""
import os
from pathlib import Path

import inspect
import numpy as np
import pandas as pd
import torch
from IPython.display import Image, display

from inference.runner import RunConfig, read_metrics, train_if_missing
from evaluation.api import evaluate, load_run
from evaluation.cli import format_table
from inference.importance import estimate_log_marginal
from evaluation.plotting import save
from evaluation.reports import cvae as R
from models.cvae import CVAE

SMOKE = os.environ.get("GENLAB_SMOKE") == "1"
RUNS = Path(os.environ.get("GENLAB_RUNS", "../runs"))
DATA = os.environ.get("GENLAB_DATA")  # None: the library finds it ($GENLAB_DATA, else the user cache)
EPOCHS = 1 if SMOKE else 50
LIMIT = 300 if SMOKE else None
K = 20 if SMOKE else 1000
K_CLASSIFIER = 5 if SMOKE else 100
N_TEST = 60 if SMOKE else 1000
print(f"smoke={SMOKE}, epochs={EPOCHS}, K={K}, classifier K={K_CLASSIFIER}, test images={N_TEST}")


def run(system, name):
    cfg = RunConfig(system=system, system_args=dict(latent_dim=20, hidden=[400], activation="relu"),
                    data_args=dict(dataset="mnist", binarization="dynamic"), epochs=EPOCHS,
                    limit=LIMIT, data_dir=DATA, seed=0)
    return train_if_missing(cfg, RUNS / name)


def show(paths):
    for p in paths if isinstance(paths, list) else [paths]:
        display(Image(filename=str(p)))


print(inspect.getsource(CVAE.model))
print(inspect.getsource(CVAE.guide))
"""))

cells.append(md("""
## Training (d = 20, the same settings as the unconditional VAE)
"""))

cells.append(code(r"""
cvae_dir, vae_dir = run("cvae", "cvae-d20"), run("vae", "vae-d20")
m = pd.DataFrame(read_metrics(cvae_dir))
v = pd.DataFrame(read_metrics(vae_dir))
pd.DataFrame({"epoch": m.epoch, "cvae val ELBO": m.val_elbo, "vae val ELBO": v.val_elbo[: len(m)]}).tail(5).round(2)
"""))

cells.append(md("""
## log p(x | y) on test images, by the importance-weighted estimator
"""))

cells.append(code(r"""
_ev = evaluate(cvae_dir, [1, 10, K], "test", N_TEST, seed=0, data_dir=DATA)
est, summary, cfg, cvae, data = _ev.estimate, _ev.summary, _ev.config, _ev.system, _ev.data
print(format_table(summary, cfg))
x, y = data.test.x[:N_TEST].cpu(), data.test.y[:N_TEST].cpu()
from evaluation.reports.vae import loglik_by_digit_figure
show(save(loglik_by_digit_figure(est.log_marginal, y.numpy(), cfg, K), cvae_dir, "loglik_given_label_by_digit"))
"""))

cells.append(md("""
## All ten digits in four styles, and style transfer

One $z \\sim \\mathcal N(0, I)$ per row, the label across the columns: the same "style" written
as every digit. In the style-transfer figure, a test image is encoded with its own label and
the posterior mean is decoded with every other label.
"""))

cells.append(code(r"""
torch.manual_seed(0)
show([save(R.styles_figure(cvae, cfg), cvae_dir, "styles"),
      save(R.style_transfer_figure(cvae, x[:6], y[:6], cfg), cvae_dir, "style_transfer")])
"""))

cells.append(md("""
## A generative classifier, as a check of the likelihoods

$p(y \\mid x) \\propto p(x \\mid y)\\,p(y)$ with one importance-weighted estimate of
$\\log p(x \\mid y')$ per label and $p(y)$ the training frequencies. This is a check that
the conditional likelihoods mean something, not a competitive classifier.
"""))

cells.append(code(r"""
ll = R.per_label_loglik(cvae, x, K_CLASSIFIER)
prior = R.label_prior(data.train.y)
log_post, log_px_mix = R.classify(ll, prior)
pred = log_post.argmax(1)
print(f"test accuracy {np.mean(pred == y.numpy()):.2%} on {len(y)} images (IWAE K={K_CLASSIFIER} per label)")
show([save(R.confusion_figure(y.numpy(), pred, cfg, K_CLASSIFIER), cvae_dir, "classifier_confusion"),
      save(R.confident_wrong_figure(x.numpy(), y.numpy(), log_post, cfg), cvae_dir, "classifier_confidently_wrong")])
"""))

cells.append(md("""
## log p(x | y) − log p(x) against log p(y | x) − log p(y)

Bayes' rule makes these equal for every image. The left side takes $\\log p(x \\mid y)$ from
the CVAE and $\\log p(x)$ from the unconditional VAE of the same size; the right side takes
$p(y \\mid x)$ from the classifier above. Their difference is exactly the gap between the
CVAE's own mixture $\\log \\sum_y p(x\\mid y)p(y)$ and the VAE's $\\log p(x)$: two different
models of the same images.
"""))

cells.append(code(r"""
_, vae, _ = load_run(vae_dir, DATA, expect_system="vae")
log_px = estimate_log_marginal(vae.model, vae.guide, x, num_samples=K).log_marginal
yy = y.numpy()
lhs = ll[np.arange(len(yy)), yy] - log_px   # the classifier's own log p(x|y), so left - right = mixture - VAE exactly
rhs = log_post[np.arange(len(yy)), yy] - np.log(prior[yy])
se = lambda a: a.std(ddof=1) / np.sqrt(a.size)
pd.DataFrame([
    {"quantity": "log p(x|y) [CVAE] - log p(x) [VAE]", "mean": lhs.mean(), "s.e.": se(lhs)},
    {"quantity": "log p(y|x) - log p(y) [classifier]", "mean": rhs.mean(), "s.e.": se(rhs)},
    {"quantity": "log sum_y p(x|y)p(y) [CVAE] - log p(x) [VAE]", "mean": (log_px_mix - log_px).mean(), "s.e.": se(log_px_mix - log_px)},
    {"quantity": f"log p(x|y) [CVAE] (IWAE K={K})", "mean": est.log_marginal.mean(), "s.e.": se(est.log_marginal)},
    {"quantity": f"log p(x) [VAE] (IWAE K={K})", "mean": log_px.mean(), "s.e.": se(log_px)},
]).round(3)
"""))

write_notebook(cells, "cvae_mnist.ipynb")
