r"""The conditional VAE: the label as an observed covariate (Kingma et al. 2014; Sohn et al. 2015).

For each image :math:`x \in \{0,1\}^{784}` with its label :math:`y \in \{0..9\}` under
``pyro.plate("data")``:

.. math::

    z \sim \mathcal N(0, I_d), \qquad
    x_j \mid z, y \sim \mathrm{Bernoulli}(\mathrm{sigmoid}(f_\theta(z, \mathrm{onehot}(y))_j)),
    \qquad q_\phi(z \mid x, y) = \mathcal N(\mu_\phi(x, y), \mathrm{diag}\,\sigma_\phi(x, y)^2).

So the model is p(x | y) = ∫ p(x | z, y) p(z) dz.  The label is a covariate: an argument of both
model and guide, one-hot encoded, never a ``pyro.sample`` site and never given a distribution.
It is not random here because nothing in the study's question makes it so: we model the
response x given the known predictor y, as in regression.  The guide takes y too because the
ideal proposal is the exact posterior p(z | x, y), which depends on both.  Where the label *is*
random (unlabelled images, or classification), the model needs a prior p(y) and y becomes a
sample site: that is the semi-supervised M2 model of Kingma, Rezende, Mohamed & Welling (2014).
The generative classifier in ``evaluation/reports/cvae.py`` uses Bayes' rule with the training
label frequencies for p(y) *outside* the model, only as a check of the likelihoods.

Shapes: ``x`` ``(N, 784)``; ``y`` ``(N,)`` int64; ``z`` ``(N, d)`` or ``(K, N, d)`` under a
particles plate; site ``"x"`` has batch shape ``(N,)`` and event shape ``(784,)``.
"""

from __future__ import annotations

from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.util import is_validation_enabled
from torch import nn
from torch.nn import functional as F

from models.common import Bernoulli, GenlabError, check_binary, data_plate, mlp
from models.vae import vae_args

NUM_CLASSES = 10


def check_labels(y, n: int) -> torch.Tensor:
    """Labels must be integer classes 0-9, one per image."""
    if y is None:
        raise GenlabError("the conditional VAE needs a label for every image (got none)")
    y = torch.as_tensor(y)
    if y.dim() != 1 or y.shape[0] != n:
        raise GenlabError(f"got {tuple(y.shape)} labels for {n} images; give one label per image")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise GenlabError(f"labels must be integers 0-9, got dtype {y.dtype}")
    if n and (int(y.min()) < 0 or int(y.max()) >= NUM_CLASSES):
        bad = int(y[(y < 0) | (y >= NUM_CLASSES)][0])
        raise GenlabError(f"labels must be digit classes 0-9, got {bad}")
    return y


class CVAE(nn.Module):
    """Conditional VAE with ``model(x, y)`` and ``guide(x, y)``; y is a covariate."""

    def __init__(self, x_dim: int = 784, latent_dim: int = 20, hidden: Sequence[int] = (400,),
                 activation: str = "relu"):
        super().__init__()
        if int(latent_dim) < 1:
            raise GenlabError(f"latent dimension must be at least 1, got {latent_dim}")
        self.x_dim, self.latent_dim = int(x_dim), int(latent_dim)
        self.hidden = tuple(int(h) for h in hidden)
        self.encoder = mlp((self.x_dim + NUM_CLASSES, *self.hidden, 2 * self.latent_dim), activation)
        self.decoder = mlp((self.latent_dim + NUM_CLASSES, *reversed(self.hidden), self.x_dim),
                           activation)

    @staticmethod
    def onehot(y: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y.long(), NUM_CLASSES).float()

    def encode(self, x: torch.Tensor, y: torch.Tensor):
        """Mean and standard deviation of q(z | x, y), each ``(N, d)``."""
        h = self.encoder(torch.cat([x, self.onehot(y)], -1))
        return h[..., : self.latent_dim], F.softplus(h[..., self.latent_dim :]) + 1e-4

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits ``(..., N, 784)`` of p(x | z, y); z may carry leading particle dims."""
        c = self.onehot(y).expand(*z.shape[:-1], NUM_CLASSES)
        return self.decoder(torch.cat([z, c], -1))

    def _check(self, x, y):
        if x.dim() != 2 or x.shape[-1] != self.x_dim:
            raise GenlabError(f"images must be a (N, {self.x_dim}) batch, got shape {tuple(x.shape)}")
        return check_labels(y, x.shape[0])

    def check_data(self, x: torch.Tensor, y: torch.Tensor = None) -> None:
        """Every image 0/1 and every label 0-9, once for a whole data set."""
        self._check(x, y)
        check_binary(x)

    def model(self, x: torch.Tensor, y: torch.Tensor = None, data_size=None):
        """p(z) p(x | z, y)."""
        pyro.module("decoder", self.decoder)
        y = self._check(x, y)
        if is_validation_enabled():  # Pyro's validation switch: on by default, see check_data
            check_binary(x)
        n = x.shape[0]
        with data_plate(n, data_size):
            z = pyro.sample("z", dist.Normal(x.new_zeros(n, self.latent_dim),
                                             x.new_ones(n, self.latent_dim)).to_event(1))
            pyro.sample("x", Bernoulli(logits=self.decode(z, y), validate_args=False)
                        .to_event(1), obs=x)

    def guide(self, x: torch.Tensor, y: torch.Tensor = None, data_size=None):
        """q(z | x, y)."""
        pyro.module("encoder", self.encoder)
        y = self._check(x, y)
        with data_plate(x.shape[0], data_size):
            loc, scale = self.encode(x, y)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def build_cvae(latent_dim=None, hidden=None, activation=None, preset=None) -> CVAE:
    """A CVAE with the VAE's argument names (presets are the VAE's)."""
    args = vae_args(preset=preset, latent_dim=latent_dim, hidden=hidden, activation=activation)
    args.pop("preset")
    return CVAE(**args)
