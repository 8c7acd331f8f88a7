r"""Training objectives with the interface of Pyro's ELBOs.

Every loss here answers ``loss(model, guide, *args, **kwargs) -> float``,
``differentiable_loss(...) -> Tensor`` and ``loss_and_grads(...) -> float``, like
``pyro.infer.Trace_ELBO``, so the runner treats them alike (:func:`make_loss`).

``IWAE`` — the importance-weighted bound of Burda et al. (2015) with K particles per datapoint,

.. math::

    \mathcal L_K(x) = E\Big[\log \frac1K \sum_{k=1}^K \frac{p(x, z_k)}{q(z_k \mid x)}\Big],
    \qquad \text{loss} = -\frac{N}{B} \sum_{b=1}^B \mathcal L_K(x_b)

on a mini-batch of B datapoints of N.  It is computed from the unscaled log weights of
:func:`inference.importance.log_weights`: Pyro's own ``RenyiELBO(alpha=0)`` multiplies every
log-probability by the subsampling factor N / B *inside* its log-sum-exp, which is a different
(biased) objective on mini-batches; on an unsubsampled batch the two agree (tests).  N is the
data plate's full size, read from the plate itself.
"""

from __future__ import annotations

import math

import pyro
import torch

from inference.importance import log_weights, probe
from models.common import GenlabError

#: Loss names the runner accepts; ``RenyiELBO`` is an alias of ``IWAE``.
LOSSES = ("Trace_ELBO", "TraceMeanField_ELBO", "IWAE", "RenyiELBO")


class IWAE:
    """The IWAE bound as a loss, per datapoint of ``pyro.plate(data_plate)``."""

    def __init__(self, num_particles: int = 1, data_plate: str = "data"):
        self.num_particles, self.data_plate = int(num_particles), data_plate
        self._structure = None

    def _bound(self, model, guide, args, kwargs) -> tuple:
        if self._structure is None:
            st = probe(model, guide, args, kwargs, self.data_plate)
            if not st.per_datapoint:
                raise GenlabError(
                    f"the IWAE loss needs every sample site inside plate {self.data_plate!r} "
                    f"(per-datapoint weights); sites {st.outside} are outside it: use Trace_ELBO"
                )
            self._structure = st
        lw = log_weights(model, guide, args, kwargs, self.num_particles, self._structure,
                         self.data_plate)
        bound = torch.logsumexp(lw, 0) - math.log(self.num_particles)  # (B,) per datapoint
        return bound, self._structure.data_size or bound.shape[0]

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        bound, n = self._bound(model, guide, args, kwargs)
        return -bound.sum() * (n / bound.shape[0])

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()


def make_loss(name: str, k: int = 1):
    """The loss called ``name`` with ``k`` particles (vectorized when k > 1)."""
    vec = k > 1
    if name == "Trace_ELBO":
        return pyro.infer.Trace_ELBO(num_particles=k, vectorize_particles=vec)
    if name == "TraceMeanField_ELBO":
        return pyro.infer.TraceMeanField_ELBO(num_particles=k, vectorize_particles=vec)
    if name in ("IWAE", "RenyiELBO"):
        return IWAE(num_particles=k)
    raise GenlabError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
