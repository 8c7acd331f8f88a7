r"""The two-stochastic-layer VAE of the IWAE paper (``vae2``): ``python -m evaluation RUN --report``.

Figures, each a function the notebook or ``evaluation.reproduce`` can call:

* ``elbo_vs_iwae`` — the ELBO against the IWAE estimate per image, with the k-hat histogram and
  the trust thresholds (shared with the one-layer VAE's report);
* ``active_units_z1``, ``active_units_z2`` — Burda et al.'s activity
  :math:`A_u = \mathrm{Cov}_x(E_q[u])` per unit of each stochastic layer (Table 2's criterion
  :math:`A_u > 10^{-2}`), from :func:`models.iwae.active_units`;
* ``reconstruction`` — test images beside :math:`\sigma(f(\mu_1(x)))`, the decoder at the mean
  of q(z1 | x).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evaluation.api import EvalOptions
from evaluation.plotting import image_rows, run_title, save
from evaluation.reports.vae import active_units_figure, bounds_figure
from models.iwae import active_units


@dataclass
class Options(EvalOptions):
    """``python -m evaluation RUN_DIR --report`` of a ``vae2`` run (the evaluation's options)."""


def report(run_dir, cfg, system, data, est, options: Options) -> list:
    """The single-run figures into RUN_DIR/figures/."""
    options.check()
    x = data.split(options.split).subset(options.limit, options.spread).x.cpu()
    vae = system.cpu()
    torch.manual_seed(options.seed)
    paths = [save(bounds_figure(est, cfg), run_dir, "elbo_vs_iwae")]
    for layer, (count, var) in active_units(vae, x).items():
        paths.append(save(active_units_figure(var, cfg), run_dir, f"active_units_{layer}"))
        print(f"active units of {layer} (Cov_x E_q[u] > 0.01): {count} of {var.size}")
    with torch.no_grad():
        recon = torch.sigmoid(vae.decode(vae.encode(x[:10])[0]))
    fig = image_rows([x[:10].numpy(), recon.numpy()], ["test images", "p(x | z1 = mean q(z1|x))"],
                     run_title(cfg, "reconstruction through the first stochastic layer"))
    paths.append(save(fig, run_dir, "reconstruction"))
    return paths
