r"""Regression with a learned noise scale: homoscedastic, heteroscedastic and Bayesian pairs.

Data: scalar inputs :math:`x_i` (a ``(N, 1)`` tensor) and responses :math:`y_i` (``(N,)``), the
responses observed under ``pyro.plate("data")`` (:func:`models.common.data_plate`).  The
inputs are covariates, not random variables: nothing is sampled for them.

``variant="homo"`` (homoscedastic)
    :math:`y_i \sim \mathcal N(f(x_i), \sigma^2)`, :math:`f` an MLP ``1 -> hidden -> 1``,
    :math:`\sigma = \mathrm{softplus}(\rho) + \sigma_{\min}` with one learned scalar :math:`\rho`.

``variant="hetero"`` (heteroscedastic)
    :math:`y_i \sim \mathcal N(f(x_i), \sigma(x_i)^2)` with
    :math:`\sigma(x) = \mathrm{softplus}(g(x)) + \sigma_{\min}`, where :math:`g` is a *separate*
    MLP of the same architecture as :math:`f` (no shared trunk): ``1 -> hidden -> 1``.

``variant="bayes"`` (Bayesian heteroscedastic)
    The heteroscedastic model with every weight and bias :math:`w` of both networks given the
    prior :math:`w \sim \mathcal N(0, s_0^2)` (``prior_scale`` :math:`s_0`), sampled outside the
    data plate (global latents, sites ``"f.<layer>.weight"``, ``"f.<layer>.bias"``,
    ``"g.<layer>.weight"``, ...), and the explicit mean-field guide
    :math:`q(w) = \prod \mathcal N(\mu_w, \mathrm{softplus}(\varrho_w)^2)`.  The importance-weighted
    estimator then gives one joint :math:`\log p(y_{1:N} \mid x_{1:N})` (the weights are shared
    by all datapoints), and the predictive distribution is the mixture
    :math:`p(y^* \mid x^*) \approx \frac1S \sum_s \mathcal N(y^*; f_{w_s}(x^*), \sigma_{w_s}(x^*)^2)`,
    :math:`w_s \sim q`, whose bands include weight uncertainty.

The homoscedastic and heteroscedastic models have an empty guide: SVI with an empty guide
maximizes the log-likelihood

.. math::

    \mathcal L = \sum_i \Bigl\{ -\tfrac12 \log(2\pi\sigma(x_i)^2)
                 - \frac{(y_i - f(x_i))^2}{2\sigma(x_i)^2} \Bigr\}.

Why its training curve dips: where the fit is tight (:math:`y_i \approx f(x_i)`) the
maximizing :math:`\sigma(x_i)` is the residual's size, so :math:`\sigma(x)` shrinks there and the
term :math:`-(y_i - f(x_i))^2 / 2\sigma(x_i)^2` multiplies any small move of :math:`f` by
:math:`1/\sigma^2`: one optimizer step that shifts :math:`f` by :math:`\delta` costs
:math:`\delta^2 / 2\sigma^2` nats per point (``δ = 0.05``, ``σ = 0.01``: 12.5 nats).  The
homoscedastic model divides every residual by one :math:`\sigma` that is set by the *average*
residual, so it has no such amplifier.  :meth:`HeteroRegression.step_metrics` logs the
evidence at every training step.

Remedies, as options:

* ``sigma_floor`` :math:`\sigma_{\min} > 0` bounds the amplifier :math:`1/\sigma^2` by
  :math:`1/\sigma_{\min}^2`; the default ``1e-6`` is only a numerical guard.
* ``beta`` (β-NLL, Seitzer et al. 2022, heteroscedastic only): each datapoint's log-likelihood
  term is multiplied by :math:`\mathrm{sg}[\sigma(x_i)^{2\beta}]` (``sg`` = stop-gradient) via
  ``poutine.scale``; β = 0 is maximum likelihood, β = 1 gives the mean the gradient of
  squared error.  The scale only changes the *training* gradient: the importance-weighted
  estimator ignores ``poutine.scale``, so evaluation stays the true log-likelihood.
* a smaller learning rate or gradient clipping (``--optimizer clipped_adam --clip-norm``),
  runner options;
* ``variant="bayes"``.

Shapes: ``x`` ``(N, 1)``, ``y`` ``(N,)``; :meth:`predict` returns mean and σ, each ``(N,)``;
in the Bayesian model, weights drawn under a particles plate of K have shape
``(K, 1, out, in)`` and the network outputs ``(K, N)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.nn import functional as F

from models.common import GenlabError, config_defaults, data_plate, mlp, option

VARIANTS = ("homo", "hetero", "bayes")
#: The default floor: a numerical guard only (far below any noise scale in the studies).
NUMERICAL_FLOOR = 1e-6

#: Columns :meth:`HeteroRegression.step_metrics` adds to ``steps.csv``.
STEP_COLUMNS = ("loglik", "rmse", "min_sigma", "worst_ll", "worst_x", "worst_resid",
                "worst_sigma", "drop", "drop_top10_share", "drop_small_sigma_share", "drop_x", "drop_resid", "drop_sigma",
                "drop_delta")


def _inverse_softplus(v: float) -> float:
    return v + math.log(-math.expm1(-v))


@dataclass
class HeteroConfig:
    """The regression model's options: the one source of their defaults."""

    variant: str = option("hetero", "homo: one learned sigma; hetero: sigma(x) from a second "
                          "network; bayes: hetero with priors on all weights", choices=VARIANTS)
    hidden: list[int] = option([50, 50], "hidden sizes of f and g")
    activation: str = option("tanh", "nonlinearity", choices=("relu", "tanh", "softplus", "elu"))
    sigma_floor: float = option(NUMERICAL_FLOOR, "sigma = softplus(.) + floor: a numerical "
                                "guard; e.g. 0.05 as a remedy for the dips")
    beta: float = option(0.0, "beta-NLL exponent in [0, 1] for --variant hetero (0: maximum "
                         "likelihood)")
    prior_scale: float = option(1.0, "prior sd of every weight, --variant bayes")


def hetero_args(variant: Optional[str] = None, hidden: Optional[Sequence[int]] = None,
                activation: Optional[str] = None, sigma_floor: Optional[float] = None,
                beta: Optional[float] = None, prior_scale: Optional[float] = None) -> dict:
    """The full, checked system arguments (defaults filled in), as recorded in config.json."""
    d = config_defaults(HeteroConfig)
    variant = variant or d["variant"]
    if variant not in VARIANTS:
        raise GenlabError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    hidden = d["hidden"] if hidden is None else [int(h) for h in hidden]
    floor = d["sigma_floor"] if sigma_floor is None else float(sigma_floor)
    if not floor > 0 or not math.isfinite(floor):
        raise GenlabError(f"--sigma-floor must be a positive number, got {sigma_floor}")
    beta = d["beta"] if beta is None else float(beta)
    if not 0.0 <= beta <= 1.0:
        raise GenlabError(f"--beta must lie in [0, 1], got {beta}")
    if beta > 0 and variant != "hetero":
        raise GenlabError(f"--beta (β-NLL) applies to --variant hetero, not {variant}")
    prior_scale = d["prior_scale"] if prior_scale is None else float(prior_scale)
    if not prior_scale > 0 or not math.isfinite(prior_scale):
        raise GenlabError(f"--prior-scale must be a positive number, got {prior_scale}")
    return dict(variant=variant, hidden=hidden, activation=activation or d["activation"],
                sigma_floor=floor, beta=beta,
                prior_scale=prior_scale if variant == "bayes" else None)


class HeteroRegression(nn.Module):
    """One of the three model/guide pairs of the module docstring, chosen by ``variant``."""

    def __init__(self, variant: str = "hetero", hidden: Sequence[int] = (50, 50),
                 activation: str = "tanh", sigma_floor: float = NUMERICAL_FLOOR,
                 beta: float = 0.0, prior_scale: Optional[float] = 1.0):
        super().__init__()
        args = hetero_args(variant, hidden, activation, sigma_floor, beta, prior_scale)
        self.variant, self.hidden = args["variant"], tuple(args["hidden"])
        self.activation, self.sigma_floor = args["activation"], args["sigma_floor"]
        self.beta, self.prior_scale = args["beta"], args["prior_scale"]
        sizes = (1, *self.hidden, 1)
        self.f = mlp(sizes, self.activation)
        if self.variant == "homo":
            self.rho = nn.Parameter(torch.tensor(_inverse_softplus(1.0)))
        else:
            self.g = mlp(sizes, self.activation)
        if self.variant == "bayes":
            # mean-field guide: locs start at PyTorch's default initialisation of f and g,
            # scales at softplus(-6) ~ 0.0025 so early training sees near-deterministic nets
            self.q_loc = nn.ParameterDict()
            self.q_rho = nn.ParameterDict()
            for name, p in self._named_weights():
                key = name.replace(".", "_")
                self.q_loc[key] = nn.Parameter(p.detach().clone())
                self.q_rho[key] = nn.Parameter(torch.full_like(p, -6.0))
        self._last = None  # step_metrics' cache: the previous step's per-point log-likelihood

    # ----------------------------------------------------------------- networks
    def _named_weights(self):
        """(site name, tensor) of every weight and bias of f and g, e.g. ``("f.0.weight", W)``."""
        for net in ("f", "g"):
            for name, p in getattr(self, net).named_parameters():
                yield f"{net}.{name}", p

    def _layers(self, net: str) -> list:
        return [m for m in getattr(self, net) if isinstance(m, nn.Linear)]

    def _functional(self, net: str, weights: dict, x: torch.Tensor) -> torch.Tensor:
        """Network ``net`` with the given weights: ``(N, 1)`` -> ``(*lead, N)``.

        A weight drawn under a particles plate has shape ``(*lead, 1, out, in)`` (the 1 is the
        data plate's place); it is dropped so the output lines up as ``(*lead, N)``.
        """
        act = type(getattr(self, net)[1]) if len(getattr(self, net)) > 1 else None
        h = x
        layers = self._layers(net)
        idx = [i for i, m in enumerate(getattr(self, net)) if isinstance(m, nn.Linear)]
        for j, i in enumerate(idx):
            W, b = weights[f"{net}.{i}.weight"], weights[f"{net}.{i}.bias"]
            if W.dim() > 2:
                if W.shape[-3] != 1:
                    raise GenlabError(f"weight {net}.{i} has unexpected batch shape {tuple(W.shape[:-2])}")
                W, b = W.squeeze(-3), b.squeeze(-2)
            h = h @ W.transpose(-1, -2) + b.unsqueeze(-2)
            if j < len(layers) - 1:
                h = act()(h)
        return h.squeeze(-1)

    def _sigma(self, raw: torch.Tensor) -> torch.Tensor:
        return F.softplus(raw) + self.sigma_floor

    def predict(self, x: torch.Tensor):
        """Mean ``(N,)`` and σ ``(N,)``; for ``bayes`` at the guide's mean weights."""
        if self.variant == "bayes":
            w = {n: self.q_loc[n.replace(".", "_")] for n, _ in self._named_weights()}
            return self._functional("f", w, x), self._sigma(self._functional("g", w, x))
        mean = self.f(x).squeeze(-1)
        if self.variant == "homo":
            return mean, self._sigma(self.rho).expand_as(mean)
        return mean, self._sigma(self.g(x).squeeze(-1))

    def predictive_samples(self, x: torch.Tensor, num_samples: int = 1,
                           generator: Optional[torch.Generator] = None):
        """Means and σ of ``S`` predictive components, each ``(S, N)``.

        Maximum-likelihood variants have one component (``S = 1``); ``bayes`` draws
        ``S = num_samples`` weight sets from the guide.
        """
        if self.variant != "bayes":
            m, s = self.predict(x)
            return m.unsqueeze(0), s.unsqueeze(0)
        w = {}
        for n, _ in self._named_weights():
            key = n.replace(".", "_")
            loc, scale = self.q_loc[key], F.softplus(self.q_rho[key])
            eps = torch.randn((num_samples, 1, *loc.shape), generator=generator,
                              dtype=loc.dtype, device=loc.device)
            w[n] = loc + scale * eps
        return self._functional("f", w, x), self._sigma(self._functional("g", w, x))

    def log_predictive(self, x, y, num_samples: int = 1, generator=None) -> torch.Tensor:
        r"""Per-point :math:`\log \frac1S \sum_s \mathcal N(y_i; m_s(x_i), \sigma_s(x_i)^2)`, ``(N,)``.

        Exact for the maximum-likelihood variants; a Monte Carlo posterior-predictive density
        (not a marginal likelihood) for ``bayes``.
        """
        m, s = self.predictive_samples(x, num_samples, generator)
        lp = dist.Normal(m, s).log_prob(y)
        return torch.logsumexp(lp, 0) - math.log(lp.shape[0])

    def predictive_cdf(self, x, y, num_samples: int = 1, generator=None) -> torch.Tensor:
        """The predictive CDF at ``y`` (the PIT value), ``(N,)``: a mixture of Normal CDFs."""
        m, s = self.predictive_samples(x, num_samples, generator)
        return dist.Normal(m, s).cdf(y).mean(0)

    # ----------------------------------------------------------------- model and guide
    def model(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, data_size=None):
        """y_i ~ N(f(x_i), σ(x_i)²) under the data plate; ``bayes`` first draws the weights."""
        n = x.shape[0]
        if self.variant == "bayes":
            w = {}
            for name, p in self._named_weights():
                prior = dist.Normal(torch.zeros_like(p), self.prior_scale * torch.ones_like(p))
                w[name] = pyro.sample(name, prior.to_event(p.dim()))
            mean, sigma = self._functional("f", w, x), self._sigma(self._functional("g", w, x))
        else:
            pyro.module("hetero", self)
            mean, sigma = self.predict(x)
        with data_plate(n, data_size):
            if self.beta > 0:
                weight = sigma.detach() ** (2 * self.beta)
                with poutine.scale(scale=weight):
                    pyro.sample("y", dist.Normal(mean, sigma), obs=y)
            else:
                pyro.sample("y", dist.Normal(mean, sigma), obs=y)

    def guide(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, data_size=None):
        """Empty (maximum likelihood) for ``homo``/``hetero``; mean-field Normal for ``bayes``."""
        if self.variant != "bayes":
            return
        pyro.module("hetero", self)
        for name, p in self._named_weights():
            key = name.replace(".", "_")
            q = dist.Normal(self.q_loc[key], F.softplus(self.q_rho[key]))
            pyro.sample(name, q.to_event(p.dim()))

    # ----------------------------------------------------------------- diagnostics
    @torch.no_grad()
    def step_metrics(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """The dip evidence on this step's batch, after the step (``bayes``: at the guide mean).

        ``loglik`` mean log-likelihood per point; ``min_sigma``; the worst point's log-likelihood,
        x, residual y - f(x) and σ; and, when the batch holds the same points as the previous
        step's (full-batch training), the decomposition of the change: ``drop`` the change of
        the mean log-likelihood, ``drop_top10_share`` the share of a fall carried by the tenth
        of the points that lost most, ``drop_small_sigma_share`` the share carried by the tenth
        with the smallest σ(x_i), and x, residual, σ and change of the point that lost most
        (NaN where not defined).
        """
        mean, sigma = self.predict(x)
        ll = dist.Normal(mean, sigma).log_prob(y)
        resid = y - mean
        i = int(torch.argmin(ll))
        out = dict(loglik=float(ll.mean()), rmse=float(resid.pow(2).mean().sqrt()),
                   min_sigma=float(sigma.min()), worst_ll=float(ll[i]), worst_x=float(x[i, 0]),
                   worst_resid=float(resid[i]), worst_sigma=float(sigma[i]))
        order = torch.argsort(x[:, 0])
        xs, lls = x[order, 0].detach().clone(), ll[order].detach().clone()
        nan = float("nan")
        out.update(drop=nan, drop_top10_share=nan, drop_small_sigma_share=nan, drop_x=nan, drop_resid=nan, drop_sigma=nan,
                   drop_delta=nan)
        if self._last is not None and torch.equal(self._last[0], xs):
            delta = lls - self._last[1]
            j = int(torch.argmin(delta))
            total = float(delta.sum())
            tenth = max(1, delta.numel() // 10)
            losers = float(torch.topk(-delta, tenth).values.sum())
            small = float(delta[torch.topk(-sigma[order], tenth).indices].sum())
            out.update(drop=float(delta.mean()),
                       drop_top10_share=-losers / total if total < 0 else nan,
                       drop_small_sigma_share=small / total if total < 0 else nan,
                       drop_x=float(xs[j]), drop_resid=float(resid[order][j]),
                       drop_sigma=float(sigma[order][j]), drop_delta=float(delta[j]))
        self._last = (xs, lls)
        return out


def build_hetero(**kwargs) -> HeteroRegression:
    """A :class:`HeteroRegression` from :func:`hetero_args`'s keywords."""
    return HeteroRegression(**hetero_args(**kwargs))
