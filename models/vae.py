r"""The Bernoulli-pixel variational autoencoder (Kingma & Welling 2014).

Model, for each image :math:`x \in \{0,1\}^{784}` under ``pyro.plate("data")``:

.. math::

    z \sim \mathcal N(0, I_d), \qquad
    x_j \mid z \sim \mathrm{Bernoulli}(\mathrm{sigmoid}(f_\theta(z)_j)), \quad j = 1..784.

Guide: :math:`q_\phi(z \mid x) = \mathcal N(\mu_\phi(x), \mathrm{diag}\,\sigma_\phi(x)^2)`, with
:math:`\sigma = \mathrm{softplus}(\cdot) + 10^{-4}` so the scale never collapses to exactly 0.

Shapes: ``x`` is ``(N, 784)``; ``z`` is ``(N, d)`` (``(K, N, d)`` under a particles plate);
the site ``"x"`` has batch shape ``(N,)`` and event shape ``(784,)`` (``to_event(1)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.util import is_validation_enabled
from torch import nn
from torch.nn import functional as F

from models.common import (
    Bernoulli,
    GenlabError,
    check_binary,
    data_plate,
    mlp,
    option,
    preset_args,
)

#: Named architectures: latent size, hidden sizes, nonlinearity.
PRESETS = {
    "study-d4": dict(latent_dim=4, hidden=(400,), activation="relu"),
    "study-d20": dict(latent_dim=20, hidden=(400,), activation="relu"),
    # Burda, Grosse & Salakhutdinov (2015), one stochastic layer: 784-200-200-50, tanh.
    "iwae-1layer": dict(latent_dim=50, hidden=(200, 200), activation="tanh"),
}


@dataclass
class VAEConfig:
    """The VAE's architecture (also the CVAE's): the one source of its defaults."""

    preset: Optional[str] = option(None, "a named architecture, applied before the options below",
                                   choices=PRESETS)
    latent_dim: int = option(20, "latent dimension d")
    hidden: list[int] = option([400], "hidden sizes of encoder and decoder, e.g. 400 or 200,200")
    activation: str = option("relu", "nonlinearity", choices=("relu", "tanh", "softplus", "elu"))


class VAE(nn.Module):
    """A VAE whose ``model`` and ``guide`` are the explicit Pyro pair described above."""

    def __init__(
        self,
        x_dim: int = 784,
        latent_dim: int = 20,
        hidden: Sequence[int] = (400,),
        activation: str = "relu",
    ):
        super().__init__()
        if int(latent_dim) < 1:
            raise GenlabError(f"latent dimension must be at least 1, got {latent_dim}")
        self.x_dim = int(x_dim)
        self.latent_dim = int(latent_dim)
        self.hidden = tuple(int(h) for h in hidden)
        self.activation = activation
        self.encoder = mlp((self.x_dim, *self.hidden, 2 * self.latent_dim), activation)
        self.decoder = mlp((self.latent_dim, *reversed(self.hidden), self.x_dim), activation)

    def encode(self, x: torch.Tensor):
        """Posterior mean and standard deviation of q(z | x), each ``(N, d)``."""
        h = self.encoder(x)
        loc, raw = h[..., : self.latent_dim], h[..., self.latent_dim :]
        return loc, F.softplus(raw) + 1e-4

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits of the pixels, ``(..., 784)``."""
        return self.decoder(z)

    def check_data(self, x: torch.Tensor) -> None:
        """Every image 0/1, once for a whole data set (the model checks each batch only while
        Pyro's validation is on: the runner's first step, and any direct call)."""
        check_binary(x)

    def model(self, x: torch.Tensor, data_size=None):
        """p(z) p(x | z)."""
        pyro.module("decoder", self.decoder)
        if x.dim() != 2 or x.shape[-1] != self.x_dim:
            raise GenlabError(f"images must be a (N, {self.x_dim}) batch, got shape {tuple(x.shape)}")
        if is_validation_enabled():  # Pyro's validation switch: on by default, see check_data
            check_binary(x)
        n = x.shape[0]
        with data_plate(n, data_size):
            z = pyro.sample(
                "z",
                dist.Normal(x.new_zeros(n, self.latent_dim), x.new_ones(n, self.latent_dim))
                .to_event(1),
            )
            logits = self.decode(z)
            pyro.sample("x", Bernoulli(logits=logits, validate_args=False).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, data_size=None):
        """q(z | x), amortized by the encoder."""
        pyro.module("encoder", self.encoder)
        with data_plate(x.shape[0], data_size):
            loc, scale = self.encode(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def vae_args(preset: Optional[str] = None, **kwargs) -> dict:
    """The full architecture: defaults, then the preset, then explicit arguments (not None)."""
    args = preset_args(VAEConfig, PRESETS, preset, kwargs, "VAE")
    args["hidden"] = [int(h) for h in args["hidden"]]
    return dict(preset=preset, **args)


def build_vae(**kwargs) -> VAE:
    """A VAE from :func:`vae_args`'s keywords."""
    args = vae_args(**kwargs)
    args.pop("preset")
    return VAE(**args)
