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

``DReG_IWAE`` (name ``"DReG"``) — the same loss value as ``IWAE`` (bit for bit, with the same
use of the RNG), with the doubly-reparameterized gradient of Tucker, Lawson, Gu & Maddison
(2019) for the guide's parameters φ and the usual IWAE gradient for the model's parameters θ:

.. math::

    \nabla_\theta = \sum_k \tilde w_k \nabla_\theta \log w_k, \qquad
    \nabla_\phi = \sum_k \tilde w_k^2 \,
        \frac{\partial \log w_k}{\partial z_k} \frac{\partial z_k}{\partial \phi},
    \qquad \tilde w_k = w_k / \textstyle\sum_j w_j .

``STL_ELBO`` (name ``"STL"``) — the ELBO averaged over k particles (the mean log weight) with
the "sticking the landing" gradient of Roeder, Wu & Duvenaud (2017): the same path derivative
with weights 1/k.

How the path derivative is obtained, for any Pyro guide: the total derivative of
:math:`\log w_k` in φ is the path term plus the explicit term
:math:`-\partial_\phi \log q_\phi(z)|_z` (the score, zero in expectation).  The guide is run
a second time, replayed (``poutine.replay``) against its own trace with every sampled value
*detached*; the log density of that replay, :math:`\log q_\phi(\mathrm{sg}(z))`, has exactly
the explicit term as its φ-gradient, so adding it cancels the score.  For a hierarchical guide
such as q(z1 | x) q(z2 | z1) this keeps the path through z1 into q(z2 | z1)'s parameters, which
re-scoring each site under its distribution with detached parameters (``site["fn"]``) would
drop: that shortcut is biased for hierarchical guides (tests/test_iwae_paper.py checks the
unbiasedness on one).  The gradients of θ (the model trace's ``pyro.param``/``pyro.module``
parameters) and φ (the guide trace's) are taken separately with ``torch.autograd.grad`` and
returned through a surrogate ``value + (s - sg(s))``, ``s = Σ_p <p, g_p>``, whose value is the
loss exactly and whose gradient in each parameter p is g_p.

Limits: every guide sample site must be reparameterized (``has_rsample``), else one sentence
refuses it; a parameter used by both the model and the guide is refused (its gradient would be
neither θ's nor φ's); only the traces' parameters receive gradients (not other tensors that
require grad); it costs one more guide pass and a second backward through the model (1.16-1.19x
IWAE's step at batch 20, benchmarks/iwae_step.py).
"""

from __future__ import annotations

import logging
import math

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask

from inference.importance import _data_frame, _sample_sites, _traces, log_weights, probe
from models.common import GenlabError


class _NoPlateNestingGuess(logging.Filter):
    """Pyro logs "Guessed max_plate_nesting = N" at INFO, and its "pyro" logger prints INFO to
    stderr: every vectorized ELBO would add that line to genlab's output.  The guess is right
    (the plates declare it), so the record is dropped; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Guessed max_plate_nesting")


logging.getLogger("pyro.infer.elbo").addFilter(_NoPlateNestingGuess())

#: Loss names the runner accepts; ``RenyiELBO`` is an alias of ``IWAE``.
LOSSES = ("Trace_ELBO", "TraceMeanField_ELBO", "IWAE", "RenyiELBO", "DReG", "STL")


class IWAE:
    """The IWAE bound as a loss, per datapoint of ``pyro.plate(data_plate)``."""

    def __init__(self, num_particles: int = 1, data_plate: str = "data"):
        self.num_particles, self.data_plate = int(num_particles), data_plate
        self._structure = None

    def _probe(self, model, guide, args, kwargs) -> None:
        if self._structure is None:
            st = probe(model, guide, args, kwargs, self.data_plate)
            if not st.per_datapoint:
                raise GenlabError(
                    f"the IWAE loss needs every sample site inside plate {self.data_plate!r} "
                    f"(per-datapoint weights); sites {st.outside} are outside it: use Trace_ELBO"
                )
            self._structure = st

    def _bound(self, model, guide, args, kwargs) -> tuple:
        self._probe(model, guide, args, kwargs)
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


def _site_sum(trace, structure, data_plate: str, total=0.0, sign: float = 1.0):
    """``total`` plus ``sign`` times each unscaled site log-probability of ``trace``, reduced as
    :func:`inference.importance.log_weights` reduces them (``(K, B)`` per datapoint), in the
    same order and arithmetic, so that the log weights are bit-for-bit the IWAE loss's."""
    nest = structure.max_plate_nesting
    for _name, site in _sample_sites(trace):
        with pyro.validation_enabled(False):
            lp = site["fn"].log_prob(site["value"])
        if site["mask"] is not None:
            lp = scale_and_mask(lp, mask=site["mask"])
        lp = lp.reshape((1,) * (nest + 1 - lp.dim()) + tuple(lp.shape))
        keep = [0, nest + 1 + _data_frame(site, data_plate).dim]
        other = [d for d in range(lp.dim()) if d not in keep]
        if other:
            lp = lp.sum(other)
        total = total + sign * lp
    return total


def _detached_values(trace):
    """A copy of ``trace`` whose sample sites hold detached values (for ``poutine.replay``)."""
    out = trace.copy()
    for name, site in _sample_sites(trace):
        out.nodes[name] = dict(site, value=site["value"].detach())
    return out


def _trace_params(trace) -> dict:
    """{name: tensor} of the ``pyro.param`` values a trace used (``pyro.module`` registers its
    weights as param sites)."""
    return {n: s["value"] for n, s in trace.nodes.items() if s["type"] == "param"}


class _PathGradient(IWAE):
    """Shared code of :class:`DReG_IWAE` and :class:`STL_ELBO` (see the module docstring).

    Subclasses give ``_value(lw)``: the per-datapoint objective (B,) from log weights (K, B),
    whose gradient the model's parameters get, and ``_weights(lw)``: the detached weights
    (K, B) of the guide's path derivative.
    """

    name = "path"

    def _value(self, lw: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _weights(self, lw: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check(self, guide_tr, model_params: dict, guide_params: dict) -> None:
        for name, site in _sample_sites(guide_tr):
            if not site["fn"].has_rsample:
                raise GenlabError(f"the {self.name} gradient needs every guide site reparameterized; "
                                  f"site {name!r} ({type(site['fn']).__name__}) has no rsample")
        shared = sorted(set(model_params) & set(guide_params))
        if shared:
            raise GenlabError(f"the {self.name} gradient needs disjoint model and guide parameters; "
                              f"{shared[:3]} are used by both")

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        self._probe(model, guide, args, kwargs)  # the same probe (and RNG use) as IWAE's
        st, K, plate = self._structure, self.num_particles, self.data_plate
        pdim = -(st.max_plate_nesting + 1)
        with pyro.validation_enabled(False):
            model_tr, guide_tr = _traces(model, guide, args, kwargs, K, pdim)
        lw = _site_sum(guide_tr, st, plate, _site_sum(model_tr, st, plate), -1.0)
        lw = lw.expand(K, *lw.shape[1:]) if lw.shape[0] == 1 else lw
        value = self._value(lw)  # (B,)
        n = st.data_size or value.shape[0]
        factor = n / value.shape[0]
        loss = -value.sum() * factor
        if not torch.is_grad_enabled() or not loss.requires_grad:
            return loss
        theta, phi = _trace_params(model_tr), _trace_params(guide_tr)
        self._check(guide_tr, theta, phi)
        w_guide = self._weights(lw.detach())
        # log q_phi(sg z): phi-gradient = the explicit (score) term of log q at fixed z
        with pyro.validation_enabled(False), pyro.plate("particles", K, dim=pdim):
            replay_tr = poutine.trace(poutine.replay(guide, trace=_detached_values(guide_tr))
                                      ).get_trace(*args, **kwargs)
        lq_fixed = _site_sum(replay_tr, st, plate)
        surr_guide = -(w_guide * (lw + lq_fixed)).sum() * factor
        grads = {}
        for params, surr in ((theta, loss), (phi, surr_guide)):
            names = [k for k, p in params.items() if p.requires_grad]
            if not names:
                continue
            gs = torch.autograd.grad(surr, [params[k] for k in names], retain_graph=True,
                                     allow_unused=True)
            grads.update({k: (params[k], g) for k, g in zip(names, gs) if g is not None})
        if not grads:
            return loss
        inner = sum((p * g).sum() for p, g in grads.values())
        return loss.detach() + (inner - inner.detach())


class DReG_IWAE(_PathGradient):
    """IWAE(k) loss value; doubly-reparameterized gradient for the guide (Tucker et al. 2019),
    the usual IWAE gradient for the model."""

    name = "DReG"

    def _value(self, lw):
        return torch.logsumexp(lw, 0) - math.log(self.num_particles)

    def _weights(self, lw):
        return torch.softmax(lw, 0) ** 2


class STL_ELBO(_PathGradient):
    """ELBO averaged over k particles (the value of ``Trace_ELBO`` without analytic KL) with
    the sticking-the-landing gradient for the guide (Roeder et al. 2017)."""

    name = "STL"

    def _value(self, lw):
        return lw.mean(0)

    def _weights(self, lw):
        return torch.full_like(lw, 1.0 / lw.shape[0])


def make_loss(name: str, k: int = 1):
    """The loss called ``name`` with ``k`` particles (vectorized when k > 1)."""
    vec = k > 1
    if name == "Trace_ELBO":
        return pyro.infer.Trace_ELBO(num_particles=k, vectorize_particles=vec)
    if name == "TraceMeanField_ELBO":
        return pyro.infer.TraceMeanField_ELBO(num_particles=k, vectorize_particles=vec)
    if name in ("IWAE", "RenyiELBO"):
        return IWAE(num_particles=k)
    if name == "DReG":
        return DReG_IWAE(num_particles=k)
    if name == "STL":
        return STL_ELBO(num_particles=k)
    raise GenlabError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
