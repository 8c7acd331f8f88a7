r"""The two-stochastic-layer VAE of Burda, Grosse & Salakhutdinov (2015), as an explicit Pyro pair.

Model, for each image :math:`x \in \{0,1\}^{784}` under ``pyro.plate("data")``:

.. math::

    z_2 \sim \mathcal N(0, I_{50}), \qquad
    z_1 \mid z_2 \sim \mathcal N(\mu_\theta(z_2), \mathrm{diag}\,\sigma_\theta(z_2)^2), \qquad
    x_j \mid z_1 \sim \mathrm{Bernoulli}(\mathrm{sigmoid}(f_\theta(z_1)_j)).

Guide: :math:`q(z_1 \mid x)\, q(z_2 \mid z_1)`, both diagonal Gaussians.

Networks (the paper's Section 5, "two stochastic layers"): two deterministic tanh layers of 200
units between x and z₁ (both directions), two of 100 units between z₁ and z₂ (both directions).
Every Gaussian layer is ``h = tanh MLP(input)``, ``loc = Linear(h)``, ``scale = exp(Linear(h))``
(Burda et al.'s code computes sigma with an exponential; ``scale="softplus"`` uses genlab's
one-layer VAE's ``softplus(.) + 1e-4`` instead).

Shapes: ``x`` is ``(N, 784)``; ``z1`` is ``(N, 100)`` and ``z2`` ``(N, 50)``, or ``(K, N, ·)``
under a particles plate; sites ``"z1"``, ``"z2"`` and ``"x"`` have batch shape ``(N,)`` and
event shapes ``(100,)``, ``(50,)``, ``(784,)`` (``to_event(1)``).  Every sample site lies inside
the data plate, so the importance-weighted estimator evaluates the pair per image.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer.util import is_validation_enabled
from torch import nn
from torch.nn import functional as F

from models.common import (
    _ACTIVATIONS,
    Bernoulli,
    GenlabError,
    check_binary,
    data_plate,
    mlp,
    option,
    preset_args,
)

#: Named architectures (only the paper's, for now).
PRESETS = {
    # Burda, Grosse & Salakhutdinov (2015), two stochastic layers:
    # 784 -200-200- z1(100) -100-100- z2(50), tanh.
    "iwae-2layer": dict(latent_dims=(100, 50), hidden=((200, 200), (100, 100)),
                        activation="tanh", scale="exp"),
}
SCALES = ("exp", "softplus")


def hidden_pair(text: str) -> list:
    """``"200,200/100,100"`` -> ``[[200, 200], [100, 100]]`` (the ``--hidden`` flag)."""
    try:
        parts = [[int(h) for h in p.split(",") if h.strip()] for p in str(text).split("/")]
    except ValueError:
        parts = []
    if len(parts) != 2 or not all(parts) or min(min(p) for p in parts) < 1:
        raise argparse.ArgumentTypeError(
            f"expected two comma-separated lists of sizes joined by '/', e.g. 200,200/100,100, "
            f"got {text!r}")
    return parts


@dataclass
class IWAE2Config:
    """The two-layer pair's architecture: the one source of its defaults (the paper's)."""

    preset: Optional[str] = option(None, "a named architecture, applied before the options below",
                                   choices=PRESETS)
    latent_dims: list[int] = option([100, 50], "sizes of z1 and z2")
    hidden: list = option([[200, 200], [100, 100]], "tanh layers between x and z1, and between "
                          "z1 and z2, e.g. 200,200/100,100", parse=hidden_pair)
    activation: str = option("tanh", "nonlinearity", choices=("relu", "tanh", "softplus", "elu"))
    scale: str = option("exp", "Gaussian scale: exp(linear) as the paper, or softplus(linear) + "
                        "1e-4", choices=SCALES)


class GaussianLayer(nn.Module):
    """``input -> MLP (activation after every layer) -> (loc, scale)`` of a diagonal Gaussian."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, activation: str,
                 scale: str = "exp"):
        super().__init__()
        if scale not in SCALES:
            raise GenlabError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
        self.scale_kind = scale
        # mlp() puts no nonlinearity after its last layer: append one so h is tanh(...)
        self.hidden = nn.Sequential(*mlp((in_dim, *hidden), activation), _ACTIVATIONS[activation]())
        self.loc = nn.Linear(hidden[-1], out_dim)
        self.raw_scale = nn.Linear(hidden[-1], out_dim)

    def forward(self, v: torch.Tensor):
        h = self.hidden(v)
        raw = self.raw_scale(h)
        scale = raw.exp() if self.scale_kind == "exp" else F.softplus(raw) + 1e-4
        return self.loc(h), scale


class TwoLayerVAE(nn.Module):
    """The paper's two-stochastic-layer pair; ``model`` and ``guide`` as described above."""

    def __init__(
        self,
        x_dim: int = 784,
        latent_dims: Sequence[int] = (100, 50),
        hidden: Sequence[Sequence[int]] = ((200, 200), (100, 100)),
        activation: str = "tanh",
        scale: str = "exp",
    ):
        super().__init__()
        latent_dims = tuple(int(d) for d in latent_dims)
        hidden = tuple(tuple(int(h) for h in hs) for hs in hidden)
        if len(latent_dims) != 2 or min(latent_dims) < 1:
            raise GenlabError(f"latent_dims must be two positive sizes (z1, z2), got {latent_dims}")
        if len(hidden) != 2 or not all(hidden):
            raise GenlabError("hidden must give the layers between x and z1 and between z1 and z2, "
                              f"e.g. [[200, 200], [100, 100]], got {hidden}")
        self.x_dim, self.latent_dims, self.hidden = int(x_dim), latent_dims, hidden
        self.activation, self.scale = activation, scale
        d1, d2 = latent_dims
        h1, h2 = hidden
        # guide q(z1 | x) q(z2 | z1)
        self.q_z1 = GaussianLayer(self.x_dim, h1, d1, activation, scale)
        self.q_z2 = GaussianLayer(d1, h2, d2, activation, scale)
        # model p(z1 | z2) p(x | z1)
        self.p_z1 = GaussianLayer(d2, tuple(reversed(h2)), d1, activation, scale)
        self.p_x = mlp((d1, *reversed(h1), self.x_dim), activation)

    # ------------------------------------------------------------------ networks
    def encode(self, x: torch.Tensor):
        """loc and scale of q(z1 | x), each ``(N, 100)``."""
        return self.q_z1(x)

    def encode_z2(self, z1: torch.Tensor):
        """loc and scale of q(z2 | z1), each ``(..., 50)``."""
        return self.q_z2(z1)

    def decode(self, z1: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits of the pixels, ``(..., 784)``."""
        return self.p_x(z1)

    def check_data(self, x: torch.Tensor) -> None:
        """Every image 0/1, once for a whole data set (the model checks each batch only while
        Pyro's validation is on)."""
        check_binary(x)

    # ------------------------------------------------------------------ the pair
    def model(self, x: torch.Tensor, data_size=None):
        """p(z2) p(z1 | z2) p(x | z1)."""
        pyro.module("p_z1", self.p_z1)
        pyro.module("p_x", self.p_x)
        if x.dim() != 2 or x.shape[-1] != self.x_dim:
            raise GenlabError(f"images must be a (N, {self.x_dim}) batch, got shape {tuple(x.shape)}")
        if is_validation_enabled():
            check_binary(x)
        n, d2 = x.shape[0], self.latent_dims[1]
        with data_plate(n, data_size):
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(n, d2), x.new_ones(n, d2)).to_event(1))
            loc, scale = self.p_z1(z2)
            z1 = pyro.sample("z1", dist.Normal(loc, scale).to_event(1))
            pyro.sample("x", Bernoulli(logits=self.decode(z1), validate_args=False)
                        .to_event(1), obs=x)

    def guide(self, x: torch.Tensor, data_size=None):
        """q(z1 | x) q(z2 | z1)."""
        pyro.module("q_z1", self.q_z1)
        pyro.module("q_z2", self.q_z2)
        with data_plate(x.shape[0], data_size):
            loc, scale = self.encode(x)
            z1 = pyro.sample("z1", dist.Normal(loc, scale).to_event(1))
            loc2, scale2 = self.encode_z2(z1)
            pyro.sample("z2", dist.Normal(loc2, scale2).to_event(1))


def iwae2_args(preset: Optional[str] = None, **kwargs) -> dict:
    """The full architecture: the paper's defaults, then the preset, then explicit arguments
    (not None).  ``hidden`` is two lists: the layers between x and z1, between z1 and z2."""
    args = preset_args(IWAE2Config, PRESETS, preset, kwargs, "two-layer")
    args["latent_dims"] = [int(d) for d in args["latent_dims"]]
    args["hidden"] = [[int(h) for h in hs] for hs in args["hidden"]]
    if args["scale"] not in SCALES:
        raise GenlabError(f"unknown scale {args['scale']!r}; choose one of {', '.join(SCALES)}")
    return dict(preset=preset, **args)


def build_iwae2(**kwargs) -> TwoLayerVAE:
    """A :class:`TwoLayerVAE` from :func:`iwae2_args`'s keywords."""
    args = iwae2_args(**kwargs)
    args.pop("preset")
    return TwoLayerVAE(**args)


# ----------------------------------------------------------------------------- active units
@torch.no_grad()
def active_units(system, x: torch.Tensor, threshold: float = 1e-2, samples: int = 100,
                 chunk: int = 500, generator: Optional[torch.Generator] = None) -> dict:
    r"""Burda et al.'s activity :math:`A_u = \mathrm{Cov}_x(E_{q(u \mid x)}[u])` per stochastic
    layer (Table 2's criterion: a unit is active when :math:`A_u > 10^{-2}`).

    ``system`` is a :class:`TwoLayerVAE` (layers ``z1``, ``z2``) or anything with
    ``encode(x) -> (loc, scale)`` (one layer, ``z``).  For ``z1`` (and ``z``) the inner
    expectation is the encoder's mean; for ``z2`` it is :math:`E_{q(z_1 \mid x)}[\mu_2(z_1)]`,
    averaged over ``samples`` draws of z1 per image.  Returns ``{layer: (count, variances)}``,
    variances a numpy array ``(units,)`` (unbiased variance over the images of ``x``).
    """
    if x.shape[0] < 2:
        raise GenlabError("active units need at least two images (a variance over x)")
    was_training = getattr(system, "training", False)
    if hasattr(system, "eval"):
        system.eval()
    means: dict = {}
    for s in range(0, x.shape[0], chunk):
        xb = x[s : s + chunk]
        loc, scale = system.encode(xb)
        if isinstance(system, TwoLayerVAE):
            eps = torch.randn((samples, *loc.shape), generator=generator, device=loc.device,
                              dtype=loc.dtype)
            z1 = loc + scale * eps  # (S, n, d1)
            m2 = system.encode_z2(z1)[0].mean(0)
            means.setdefault("z1", []).append(loc)
            means.setdefault("z2", []).append(m2)
        else:
            means.setdefault("z", []).append(loc)
    if was_training:
        system.train()
    out = {}
    for name, parts in means.items():
        var = torch.cat(parts).double().var(0, unbiased=True).cpu().numpy()
        out[name] = (int((var > threshold).sum()), np.asarray(var))
    return out
