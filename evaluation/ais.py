r"""Annealed importance sampling (AIS) and bidirectional Monte Carlo (BDMC) for a Pyro
model/guide pair: a sandwich around :math:`\log p(x)`.

**AIS** (Neal 2001).  With the base :math:`f_0 = q(z \mid x)` (the guide; ``init="prior"``
uses the prior :math:`p(z)`) and the target :math:`f_1 = p(x, z)`, the intermediate densities
are :math:`f_\beta(z) = f_0(z)^{1-\beta} p(x, z)^{\beta}` for inverse temperatures
:math:`0 = \beta_0 < \beta_1 < \dots < \beta_T = 1`.  Each of C chains starts at
:math:`z_0 \sim f_0` and

.. math::

    \log w = \sum_{t=1}^{T} (\beta_t - \beta_{t-1})\,
             \bigl[\log p(x, z_{t-1}) - \log f_0(z_{t-1})\bigr],
    \qquad z_t \sim K_t(z_{t-1}, \cdot)\ (t < T),

where :math:`K_t` leaves :math:`f_{\beta_t}` invariant.  :math:`E[w] = p(x)`, so
:math:`\log \frac1C \sum_c w_c` is a stochastic lower bound of :math:`\log p(x)` that
tightens as T grows.  The standard error reported is the delta-method one across chains,
:math:`\mathrm{sd}(w) / (\sqrt{C}\,\bar w)`.

**Transitions**: Hamiltonian Monte Carlo on the unconstrained space, identity mass matrix,
``leapfrog_steps`` steps of Pyro's own integrator :func:`pyro.ops.integrator.velocity_verlet`,
then a Metropolis accept/reject on the Hamiltonian (a non-finite energy is rejected).  A
latent with a constrained support is moved as :math:`u = T^{-1}(z)` with
:math:`T =` ``biject_to(support)``; the potential adds :math:`\log|\det \partial T/\partial u|`
(the Jacobian cancels in the weights, which are ratios of densities at the same point).

**Step-size rule** (one step size per datapoint, shared by its chains): after every
transition, with :math:`\bar a_n` the acceptance probability :math:`\min(1, e^{-\Delta H})`
averaged over the chains of datapoint n,
:math:`\log \epsilon_n \leftarrow \log \epsilon_n + \kappa (\bar a_n - a^*)`, with
:math:`a^* =` ``target_accept`` (0.65).  The initial :math:`\epsilon_n` is half the smallest
per-coordinate standard deviation of the C starting draws; then a **pilot** of ``pilot``
transitions at the starting temperature (:math:`\beta_0`; they leave the starting
distribution invariant, so the weights are unaffected) with the gain :math:`\kappa = 2`
brings it to its working value before the schedule starts; along the schedule the gain is
:math:`\kappa = 1`, so the step size follows the narrowing of :math:`f_\beta`.

**Schedules** of :math:`\beta` (T + 1 values): ``sigmoid`` (default, as Wu et al. 2017):
:math:`\tilde\beta_t = \sigma(\delta(2t/T - 1))`, :math:`\delta = 4`, rescaled to run from 0
to 1; ``linear`` :math:`t/T`; ``geometric``: :math:`\beta_t = 10^{-4 (T - t) / (T - 1)}` for
t >= 1 (and :math:`\beta_0 = 0`).

**BDMC** (Grosse, Ghahramani & Adams 2015; Wu, Burda, Salakhutdinov & Grosse 2017): draw
(z, x) from the model; z is an exact posterior sample for that x.  Forward AIS on x gives a
stochastic lower bound; reverse AIS, started at z and annealed from :math:`\beta = 1` down to 0
with the same schedule, estimates :math:`1 / p(x)` without bias, so
:math:`-\log \frac1C \sum_c w^{\mathrm{rev}}_c` is a stochastic upper bound.  The gap
``upper - lower`` bounds AIS's own error on data from the model.

Everything is vectorized over chains x datapoints with the particles-plate convention of
:mod:`inference.importance` (a ``pyro.plate("particles", C)`` left of every model plate;
per-datapoint when every site lies in ``pyro.plate("data")``, else one joint value), and
chunked under the same memory budget.  The log joint is evaluated by a light handler that
substitutes the latent values and accumulates unscaled, masked ``fn.log_prob`` (no
``poutine.trace``); a guide with a single latent site is run once per chunk and its
distribution reused, since it cannot depend on the latents.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import scale_and_mask
from pyro.ops.integrator import potential_grad, velocity_verlet
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from evaluation.api import EvalOptions, describe, load_run
from evaluation.plotting import plt, run_title, save
from inference.importance import DEFAULT_MEMORY, estimate_log_marginal, flush_denormals, probe
from inference.progress import progress as progress_bar
from inference.systems import get_system
from models.common import GenlabError, config_defaults

SCHEDULES = ("sigmoid", "linear", "geometric")
INITS = ("guide", "prior")
#: Bytes of activations and gradients assumed per byte of site values and parameters.
_OVERHEAD = 4
_SIGMOID_DELTA = 4.0
_GEOMETRIC_DECADES = 4.0
_PILOT_GAIN = 2.0
_GAIN = 1.0
_LOG_EPS_MIN, _LOG_EPS_MAX = math.log(1e-8), math.log(1e4)  # guards only


# ----------------------------------------------------------------------------- schedules
def schedule(kind: str, num_steps: int) -> np.ndarray:
    """The inverse temperatures :math:`\\beta_0 = 0 < \\dots < \\beta_T = 1`, float64."""
    T = int(num_steps)
    if T < 1:
        raise GenlabError(f"the number of annealing steps must be at least 1, got {num_steps}")
    t = np.arange(T + 1, dtype=np.float64)
    if kind == "linear":
        b = t / T
    elif kind == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-_SIGMOID_DELTA * (2.0 * t / T - 1.0)))
        b = (s - s[0]) / (s[-1] - s[0])
    elif kind == "geometric":
        b = np.zeros(T + 1)
        if T == 1:
            b[1] = 1.0
        else:
            b[1:] = 10.0 ** (-_GEOMETRIC_DECADES * (T - t[1:]) / (T - 1))
    else:
        raise GenlabError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    b[0], b[-1] = 0.0, 1.0
    return b


def default_pilot(num_steps: int) -> int:
    """Pilot transitions before the schedule: T/20, at least 3 and at most 20."""
    return int(min(20, max(3, int(num_steps) // 20)))


# ----------------------------------------------------------------------------- evaluation
class _LogProb(Messenger):
    """Substitute latent values and accumulate unscaled, masked log-probabilities.

    ``reduce(lp, msg)`` turns a site's log-probability into the ``(C, U)`` layout.  Latent
    (substituted) sites go into ``latent``, observed ones into ``observed``.
    """

    def __init__(self, values: dict, reduce):
        super().__init__()
        self.values = values
        self.reduce = reduce
        self.latent = 0.0
        self.observed = 0.0

    def _pyro_sample(self, msg):
        if msg["name"] in self.values and not msg["is_observed"]:
            msg["value"] = self.values[msg["name"]]
            msg["is_observed"] = True
            msg["infer"] = dict(msg["infer"], _genlab_latent=True)

    def _pyro_post_sample(self, msg):
        if site_is_subsample(msg):
            return
        lp = msg["fn"].log_prob(msg["value"])
        if msg["mask"] is not None:
            lp = scale_and_mask(lp, mask=msg["mask"])
        lp = self.reduce(lp, msg)
        if msg["infer"].get("_genlab_latent"):
            self.latent = self.latent + lp
        elif msg["is_observed"]:
            self.observed = self.observed + lp
        else:
            raise GenlabError(f"site {msg['name']!r} is latent but has no value to anneal "
                              "(the model and guide disagree on their latent sites)")


def _is_real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


@dataclass
class _Site:
    name: str
    shape: tuple  # unconstrained value's shape, chains first
    pos: Optional[int]  # position of the data dimension in that shape (None: joint)
    size: int  # coordinates per (chain, unit)
    transform: object  # None for real supports
    lead: int  # batch dims of the site's value (nest + 1)


class _Annealer:
    """One chunk: C chains x U units (datapoints, or 1 for a joint value)."""

    def __init__(self, model, guide, args, kwargs, C, structure, data_plate, init, start=None):
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.C = C
        self.nest = structure.max_plate_nesting
        self.pdim = -(self.nest + 1)
        self.per = structure.per_datapoint
        self.data_plate = data_plate
        self.init = init
        with torch.no_grad(), pyro.validation_enabled(False):
            with pyro.plate("particles", C, dim=self.pdim):
                if init == "guide":
                    guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
                    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(
                        *args, **kwargs)
                else:
                    guide_tr = None
                    model_tr = poutine.trace(model).get_trace(*args, **kwargs)
        latent = [(n, s) for n, s in model_tr.nodes.items() if s["type"] == "sample"
                  and not site_is_subsample(s) and not s["is_observed"]]
        if not latent:
            raise GenlabError("the model has no latent sites to anneal")
        self.U = 1
        self.sites, parts = [], []
        for name, s in latent:
            value = s["value"]
            if start is not None:
                value = start[name].to(value.dtype).expand(value.shape)
            support = s["fn"].support
            t = None if _is_real(support) else biject_to(support)
            u = value if t is None else t.inv(value)
            lead = value.dim() - len(s["fn"].event_shape)
            pos = None
            if self.per:
                frame = next(f for f in s["cond_indep_stack"] if f.name == data_plate)
                pos = lead + frame.dim
                self.U = u.shape[pos]
                u = u.movedim(pos, 1)
            packed = u.reshape(C, self.U, -1)
            self.sites.append(_Site(name, tuple(value.shape if t is None else t.inv(value).shape),
                                    pos, packed.shape[-1], t, lead))
            parts.append(packed)
        self.u0 = torch.cat(parts, -1).detach()
        self._stacks = {n: s["cond_indep_stack"] for n, s in latent}
        # a guide with one latent site cannot depend on the latents: keep its distributions
        self.guide_fns = None
        if init == "guide":
            gl = [(n, s) for n, s in guide_tr.nodes.items() if s["type"] == "sample"
                  and not site_is_subsample(s) and not s["is_observed"]]
            if len(gl) == 1:
                self.guide_fns = {n: (s["fn"], s["mask"], s["cond_indep_stack"]) for n, s in gl}
        self._calls = []
        self.beta = 0.0

    # -- layout
    def reduce(self, lp, msg_or_stack):
        """A site's log-probability summed to ``(C or 1, U or 1)``."""
        stack = msg_or_stack["cond_indep_stack"] if isinstance(msg_or_stack, dict) else msg_or_stack
        nest = self.nest
        if lp.dim() > nest + 1:
            raise GenlabError("a site has more batch dims than the plates declare")
        lp = lp.reshape((1,) * (nest + 1 - lp.dim()) + tuple(lp.shape))
        keep = [0]
        if self.per:
            frame = next((f for f in stack if f.name == self.data_plate), None)
            if frame is None:
                raise GenlabError(f"a site lies outside plate {self.data_plate!r}; per-datapoint "
                                  "annealing needs every sample site inside it")
            keep.append(nest + 1 + frame.dim)
        other = [d for d in range(lp.dim()) if d not in keep]
        if other:
            lp = lp.sum(other)
        return lp.reshape(lp.shape[0], -1)

    def unpack(self, u):
        values, ldj = {}, None
        off = 0
        for s in self.sites:
            piece = u[..., off:off + s.size]
            off += s.size
            if s.pos is None:
                v = piece.reshape(s.shape)
            else:
                rest = [n for i, n in enumerate(s.shape) if i not in (0, s.pos)]
                v = piece.reshape(self.C, self.U, *rest).movedim(1, s.pos)
            if s.transform is not None:
                z = s.transform(v)
                j = s.transform.log_abs_det_jacobian(v, z)
                if j.dim() > s.lead:
                    j = j.flatten(s.lead).sum(-1)
                j = self.reduce(j, self._stacks[s.name])
                ldj = j if ldj is None else ldj + j
                v = z
            values[s.name] = v
        return values, ldj

    def terms(self, u):
        """(log f_0, log p(x, z), log-Jacobian), each ``(C, U)``, at packed values ``u``."""
        values, ldj = self.unpack(u)
        with pyro.validation_enabled(False), pyro.plate("particles", self.C, dim=self.pdim):
            with _LogProb(values, self.reduce) as m:
                self.model(*self.args, **self.kwargs)
            target = m.latent + m.observed
            if self.init == "prior":
                base = m.latent
            elif self.guide_fns is not None:
                base = 0.0
                for name, (fn, mask, stack) in self.guide_fns.items():
                    lp = fn.log_prob(values[name])
                    if mask is not None:
                        lp = scale_and_mask(lp, mask=mask)
                    base = base + self.reduce(lp, stack)
            else:
                with _LogProb(values, self.reduce) as g:
                    self.guide(*self.args, **self.kwargs)
                if torch.is_tensor(g.observed):
                    raise GenlabError("the guide observes a site; guides may only sample latents")
                base = g.latent
        shape = (self.C, self.U)
        zero = u.new_zeros(shape)
        base = zero + base
        target = zero + target
        ldj = zero if ldj is None else zero + ldj
        return base, target, ldj

    # -- HMC
    def potential(self, z):
        base, target, ldj = self.terms(z["u"])
        energy = -((1.0 - self.beta) * base + self.beta * target + ldj)
        self._calls.append((energy.detach(), base.detach(), target.detach(), ldj.detach()))
        return energy.sum()

    def transition(self, u, beta, eps, leapfrog):
        """One HMC transition leaving f_beta invariant; returns (u, (base, target), accept prob)."""
        self.beta = float(beta)
        self._calls = []
        r = torch.randn_like(u)
        grads, _ = potential_grad(self.potential, {"u": u})
        u1, r1, _, _ = velocity_verlet({"u": u}, {"u": r}, self.potential, _kinetic_grad,
                                       eps, leapfrog, grads)
        e0, b0, t0, _ = self._calls[0]
        e1, b1, t1, _ = self._calls[-1]
        h0 = e0 + 0.5 * (r * r).sum(-1)
        h1 = e1 + 0.5 * (r1["u"] * r1["u"]).sum(-1)
        prob = torch.exp(torch.clamp(h0 - h1, max=0.0))
        prob = torch.where(torch.isfinite(prob), prob, torch.zeros_like(prob))
        accept = torch.rand_like(prob) < prob
        u_new = torch.where(accept.unsqueeze(-1), u1["u"].detach(), u)
        return (u_new, torch.where(accept, b1, b0), torch.where(accept, t1, t0), prob)


def _kinetic_grad(r):
    return {"u": r["u"]}


def _initial_step(u0: torch.Tensor) -> torch.Tensor:
    """Half the smallest per-coordinate standard deviation of the chains, per unit."""
    if u0.shape[0] < 2:
        return u0.new_full((u0.shape[1],), 0.1)
    sd = u0.std(0).min(-1).values  # (U,)
    return torch.where(torch.isfinite(sd) & (sd > 0), 0.5 * sd, torch.full_like(sd, 0.1))


def _anneal(ann: _Annealer, betas: np.ndarray, leapfrog: int, target_accept: float, pilot: int,
            bar=None):
    """Run the chains along ``betas`` (the direction of travel); float64 log weights ``(C, U)``
    accumulate sum_t (b_t - b_{t-1}) [log p(x, z) - log f_0(z)]."""
    u = ann.u0
    with torch.no_grad():
        base, target, _ = ann.terms(u)
    eps = _initial_step(u)
    log_eps = eps.log()
    lw = torch.zeros(ann.C, ann.U, dtype=torch.float64, device=u.device)
    acc_sum = torch.zeros(ann.U, dtype=torch.float64, device=u.device)
    trace_acc, trace_eps = [], []
    T = len(betas) - 1

    def step(beta, gain):
        nonlocal u, base, target, log_eps
        eps_b = log_eps.exp().unsqueeze(-1)
        u, base, target, prob = ann.transition(u, beta, eps_b, leapfrog)
        a = prob.mean(0)
        log_eps = (log_eps + gain * (a - target_accept)).clamp(_LOG_EPS_MIN, _LOG_EPS_MAX)
        trace_acc.append(float(a.mean()))
        trace_eps.append(float(log_eps.mean().exp()))
        if bar is not None:
            bar.update(1)
        return a

    for _ in range(pilot):
        step(betas[0], _PILOT_GAIN)
    for t in range(1, T + 1):
        lw += (betas[t] - betas[t - 1]) * (target - base).double()
        if t < T:
            acc_sum += step(betas[t], _GAIN).double()
    accept = acc_sum / max(T - 1, 1) if T > 1 else torch.full_like(acc_sum, float("nan"))
    return lw, accept, log_eps.exp(), np.array(trace_acc), np.array(trace_eps)


# ----------------------------------------------------------------------------- results
def _log_mean_exp_and_se(lw: torch.Tensor):
    """Per column of float64 log weights ``(C, U)``: log of the mean weight and its
    delta-method standard error sd(w) / (sqrt(C) mean(w))."""
    C = lw.shape[0]
    m = lw.max(0).values
    w = torch.exp(lw - m)
    mean = w.mean(0)
    est = m + mean.log()
    se = w.std(0) / (math.sqrt(C) * mean) if C > 1 else torch.full_like(mean, float("nan"))
    return est, se


@dataclass
class AISEstimate:
    """Per-datapoint (or one joint) AIS results, in nats."""

    log_marginal: np.ndarray  # log-mean-exp of the chains' weights, (n,)
    se: np.ndarray  # delta-method standard error across chains, (n,)
    accept_rate: np.ndarray  # mean acceptance probability along the schedule, (n,)
    step_size: np.ndarray  # final step size, (n,)
    log_weights: np.ndarray  # (C, n) float64
    accept_trace: np.ndarray  # mean acceptance per transition: pilot, then the schedule
    step_trace: np.ndarray  # geometric-mean step size per transition
    betas: np.ndarray  # (T + 1,)
    num_chains: int
    num_steps: int
    leapfrog_steps: int
    pilot_steps: int
    schedule: str
    init: str
    target_accept: float
    per_datapoint: bool
    seconds: float
    direction: str = "forward"

    @property
    def n(self) -> int:
        return int(self.log_marginal.shape[0])

    @property
    def evaluations(self) -> int:
        """Evaluations of the log joint (with its gradient) per datapoint, all chains."""
        transitions = self.pilot_steps + max(self.num_steps - 1, 0)
        return int(self.num_chains * (transitions * (self.leapfrog_steps + 1) + 1))

    def summary(self) -> dict:
        a = np.asarray(self.log_marginal, dtype=float)
        se_mean = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else float("nan")
        return {
            "n": self.n, "num_chains": self.num_chains, "num_steps": self.num_steps,
            "leapfrog_steps": self.leapfrog_steps, "pilot_steps": self.pilot_steps,
            "schedule": self.schedule, "init": self.init, "target_accept": self.target_accept,
            "direction": self.direction,
            "log_marginal": {"mean": float(a.mean()), "se": se_mean},
            "mc_se_mean": float(np.sqrt(np.sum(self.se ** 2)) / self.se.size),
            "accept_rate": float(np.nanmean(self.accept_rate)),
            "step_size_median": float(np.median(self.step_size)),
            "evaluations_per_datapoint": self.evaluations,
            "seconds": self.seconds, "per_datapoint": self.per_datapoint,
        }

    def arrays(self, prefix: str = "") -> dict:
        out = dict(log_marginal=self.log_marginal, se=self.se, accept_rate=self.accept_rate,
                   step_size=self.step_size, accept_trace=self.accept_trace,
                   step_trace=self.step_trace, betas=self.betas,
                   num_chains=np.array(self.num_chains), num_steps=np.array(self.num_steps),
                   leapfrog_steps=np.array(self.leapfrog_steps),
                   pilot_steps=np.array(self.pilot_steps))
        return {prefix + k: v for k, v in out.items()}

    def save(self, path, **extra) -> None:
        """Per-datapoint arrays (and ``extra`` ones) as ``.npz``, written atomically."""
        _save(path, {**self.arrays(), **extra})


def _save(path, arrays: dict) -> None:
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


@dataclass
class BDMCResult:
    """Per simulated datapoint: stochastic lower (forward AIS) and upper (reverse AIS) bounds."""

    lower: np.ndarray
    upper: np.ndarray
    lower_se: np.ndarray
    upper_se: np.ndarray
    forward: AISEstimate
    reverse: AISEstimate
    data: tuple = field(default=(), repr=False)  # the simulated positional arguments

    @property
    def gap(self) -> np.ndarray:
        return self.upper - self.lower

    @property
    def n(self) -> int:
        return int(self.lower.shape[0])

    def summary(self) -> dict:
        def ms(a):
            a = np.asarray(a, dtype=float)
            se = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else float("nan")
            return {"mean": float(a.mean()), "se": se}

        f = self.forward
        return {"n": self.n, "num_chains": f.num_chains, "num_steps": f.num_steps,
                "leapfrog_steps": f.leapfrog_steps, "schedule": f.schedule, "init": f.init,
                "lower": ms(self.lower), "upper": ms(self.upper), "gap": ms(self.gap),
                "accept_rate": {"forward": float(np.nanmean(f.accept_rate)),
                                "reverse": float(np.nanmean(self.reverse.accept_rate))},
                "seconds": f.seconds + self.reverse.seconds}

    def save(self, path, **extra) -> None:
        arrays = dict(lower=self.lower, upper=self.upper, gap=self.gap, lower_se=self.lower_se,
                      upper_se=self.upper_se)
        arrays.update(self.forward.arrays("forward_"))
        arrays.update(self.reverse.arrays("reverse_"))
        _save(path, {**arrays, **extra})


# ----------------------------------------------------------------------------- drivers
def _leading(args, n: int):
    return [i for i, a in enumerate(args) if torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == n]


def _check_continuous(model, guide, args, kwargs):
    with torch.no_grad(), pyro.validation_enabled(False):
        guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
    for tr in (model_tr, guide_tr):
        for name, s in tr.nodes.items():
            if (s["type"] == "sample" and not site_is_subsample(s) and not s["is_observed"]
                    and s["fn"].support.is_discrete):
                raise GenlabError(
                    f"AIS moves latents by Hamiltonian Monte Carlo, which needs continuous "
                    f"latents, but site {name!r} is discrete; sum it out of the model or use "
                    "the importance-weighted estimator")


def _structure(model, guide, args, kwargs, data_plate):
    lead_n = {a.shape[0] for a in args if torch.is_tensor(a) and a.dim() > 0}
    n_all = lead_n.pop() if len(lead_n) == 1 else None
    if n_all:
        idx = _leading(args, n_all)
        pn = min(2, n_all)
        pargs = tuple(a[:pn] if i in idx else a for i, a in enumerate(args))
        _check_continuous(model, guide, pargs, kwargs)
        st = probe(model, guide, pargs, kwargs, data_plate, pn)
        if not st.per_datapoint:
            st = probe(model, guide, args, kwargs, data_plate, None)
            st.per_datapoint = False
    else:
        _check_continuous(model, guide, args, kwargs)
        st = probe(model, guide, args, kwargs, data_plate, None)
    return st, n_all


@flush_denormals()  # denormals slow the CPU ~100x and change no number here (see there)
def _run(model, guide, args, kwargs, *, num_chains, num_steps, schedule_kind, init,
         leapfrog_steps, target_accept, pilot, memory, progress, data_plate, start=None,
         direction="forward", desc="AIS"):
    C, T, L = int(num_chains), int(num_steps), int(leapfrog_steps)
    if C < 1:
        raise GenlabError(f"the number of chains must be at least 1, got {num_chains}")
    if L < 1:
        raise GenlabError(f"the number of leapfrog steps must be at least 1, got {leapfrog_steps}")
    if init not in INITS:
        raise GenlabError(f"unknown init {init!r}; choose guide or prior")
    if not 0.0 < float(target_accept) < 1.0:
        raise GenlabError(f"the target acceptance rate must lie in (0, 1), got {target_accept}")
    betas = schedule(schedule_kind, T)
    pilot = default_pilot(T) if pilot is None else int(pilot)
    if T == 1:
        pilot = 0  # no transition follows z_0: a pilot could not change the weights
    travel = betas if direction == "forward" else betas[::-1].copy()
    st, n_all = _structure(model, guide, args, kwargs, data_plate)
    split = st.per_datapoint and n_all is not None
    unit = max(st.bytes_per_unit * _OVERHEAD, 1.0)
    cells = max(1, int(memory // unit))
    cb = min(C, cells)
    nb = min(n_all, max(1, cells // cb)) if split else 1
    chunks = list(range(0, n_all, nb)) if split else [0]
    groups = list(range(0, C, cb))
    t0 = time.perf_counter()
    bar = progress_bar(len(chunks) * len(groups) * (pilot + max(T - 1, 0)),
                       f"{desc} C={C} T={T}", bool(progress), unit="steps")
    res = []
    for c0 in chunks:
        if split:
            idx = _leading(args, n_all)
            cargs = tuple(a[c0:c0 + nb] if i in idx else a for i, a in enumerate(args))
            cstart = None if start is None else {
                k: (v if p is None else v.narrow(p, c0, min(nb, n_all - c0)))
                for k, (v, p) in start.items()}
        else:
            cargs = args
            cstart = None if start is None else {k: v for k, (v, _) in start.items()}
        parts = []
        for g0 in groups:
            ann = _Annealer(model, guide, cargs, kwargs, min(cb, C - g0), st, data_plate, init,
                            cstart)
            parts.append(_anneal(ann, travel, L, float(target_accept), pilot, bar))
        lw = torch.cat([p[0] for p in parts], 0)
        w = [min(cb, C - g0) / C for g0 in groups]
        acc = sum(wi * p[1] for wi, p in zip(w, parts))
        eps = torch.exp(sum(wi * p[2].log() for wi, p in zip(w, parts)))
        res.append((lw, acc, eps, parts[0][3], parts[0][4]))
    bar.close()
    lw = torch.cat([r[0] for r in res], 1)
    if direction == "forward":
        est, se = _log_mean_exp_and_se(lw)
    else:
        neg, se = _log_mean_exp_and_se(lw)
        est = -neg
    sizes = np.array([r[0].shape[1] for r in res], dtype=float)
    acc_trace = np.average(np.stack([r[3] for r in res]), axis=0, weights=sizes) if len(
        res[0][3]) else np.zeros(0)
    eps_trace = np.exp(np.average(np.log(np.stack([r[4] for r in res])), axis=0,
                                  weights=sizes)) if len(res[0][4]) else np.zeros(0)
    return AISEstimate(
        log_marginal=est.cpu().numpy(), se=se.cpu().numpy(),
        accept_rate=torch.cat([r[1] for r in res]).cpu().numpy(),
        step_size=torch.cat([r[2] for r in res]).cpu().numpy(),
        log_weights=lw.cpu().numpy(), accept_trace=acc_trace, step_trace=eps_trace,
        betas=betas, num_chains=C, num_steps=T, leapfrog_steps=L, pilot_steps=pilot,
        schedule=schedule_kind, init=init, target_accept=float(target_accept),
        per_datapoint=st.per_datapoint, seconds=time.perf_counter() - t0, direction=direction)


def ais_log_marginal(model, guide, *args, num_chains: int = 16, num_steps: int = 500,
                     schedule: str = "sigmoid", init: str = "guide", leapfrog_steps: int = 5,
                     target_accept: float = 0.65, pilot: Optional[int] = None,
                     memory: int = DEFAULT_MEMORY, progress: bool = False,
                     data_plate: str = "data", **kwargs) -> AISEstimate:
    """AIS estimate of log p(x) per datapoint, from ``num_chains`` chains annealed over
    ``num_steps`` temperatures (see the module docstring for the schedule and the step-size
    rule).  ``args``/``kwargs`` are the model's and guide's arguments, cut into chunks of
    datapoints as :func:`inference.importance.estimate_log_marginal` does (pass parameters as
    keywords); chains are split into groups only when one datapoint's chains exceed
    ``memory`` bytes.  Each transition costs ``leapfrog_steps + 1`` evaluations of the log
    joint and its gradient; ``pilot`` transitions (default :func:`default_pilot`) precede
    the schedule."""
    return _run(model, guide, args, kwargs, num_chains=num_chains, num_steps=num_steps,
                schedule_kind=schedule, init=init, leapfrog_steps=leapfrog_steps,
                target_accept=target_accept, pilot=pilot, memory=memory, progress=progress,
                data_plate=data_plate)


def simulate(model, *args, n: Optional[int] = None, data_plate: str = "data", **kwargs):
    """Draw (z, x) from the model: returns (the positional arguments with every observed value
    replaced by its draw, {latent site: (value, data dim or None)})."""
    args = tuple(args)
    if n is not None:
        lead_n = {a.shape[0] for a in args if torch.is_tensor(a) and a.dim() > 0}
        if len(lead_n) != 1:
            raise GenlabError("--n needs the data as positional tensors sharing a first dimension")
        n_all = lead_n.pop()
        if int(n) < 1:
            raise GenlabError(f"the number of simulated datapoints must be at least 1, got {n}")
        rows = torch.arange(int(n)) % n_all
        idx = _leading(args, n_all)
        args = tuple(a[rows.to(a.device)] if i in idx else a for i, a in enumerate(args))
    with torch.no_grad(), pyro.validation_enabled(False):
        cond = poutine.trace(model).get_trace(*args, **kwargs)
        sim = poutine.trace(poutine.uncondition(model)).get_trace(*args, **kwargs)
    new = list(args)
    for name, s in cond.nodes.items():
        if s["type"] != "sample" or site_is_subsample(s) or not s["is_observed"]:
            continue
        v = s["value"]
        hit = [i for i, a in enumerate(args) if a is v] or [
            i for i, a in enumerate(args)
            if torch.is_tensor(a) and a.shape == v.shape and torch.equal(a, v)]
        if not hit:
            raise GenlabError(
                f"BDMC replaces each observed value by a draw from the model, so it must be one "
                f"of the positional arguments; the value of site {name!r} is not")
        new[hit[0]] = sim.nodes[name]["value"].to(args[hit[0]].dtype)
    latent = {}
    for name, s in cond.nodes.items():
        if s["type"] == "sample" and not site_is_subsample(s) and not s["is_observed"]:
            frame = next((f for f in s["cond_indep_stack"] if f.name == data_plate), None)
            value = sim.nodes[name]["value"]
            lead = value.dim() - len(s["fn"].event_shape)
            pos = None if frame is None else lead + frame.dim
            latent[name] = (sim.nodes[name]["value"], pos)
    return tuple(new), latent


def bdmc(model, guide, *args, num_chains: int = 16, num_steps: int = 500, n: Optional[int] = None,
         schedule: str = "sigmoid", init: str = "guide", leapfrog_steps: int = 5,
         target_accept: float = 0.65, pilot: Optional[int] = None, memory: int = DEFAULT_MEMORY,
         progress: bool = False, data_plate: str = "data", **kwargs) -> BDMCResult:
    """Bidirectional Monte Carlo on ``n`` datapoints simulated from the model (the arguments
    give their shape; rows are reused cyclically when ``n`` exceeds them): forward AIS on the
    simulated x (``lower``) and reverse AIS from the latent that generated it (``upper``)."""
    sim_args, latent = simulate(model, *args, n=n, data_plate=data_plate, **kwargs)
    opts = dict(num_chains=num_chains, num_steps=num_steps, schedule_kind=schedule, init=init,
                leapfrog_steps=leapfrog_steps, target_accept=target_accept, pilot=pilot,
                memory=memory, progress=progress, data_plate=data_plate)
    fwd = _run(model, guide, sim_args, kwargs, desc="BDMC forward", **opts)
    if not fwd.per_datapoint:
        latent = {k: (v, None) for k, (v, _) in latent.items()}
    rev = _run(model, guide, sim_args, kwargs, start=latent, direction="reverse",
               desc="BDMC reverse", **opts)
    return BDMCResult(fwd.log_marginal, rev.log_marginal, fwd.se, rev.se, fwd, rev, sim_args)


# ----------------------------------------------------------------------------- command line
def add_arguments(parser) -> None:
    """The AIS/BDMC options of ``python -m evaluation RUN_DIR``."""
    parser.add_argument("--estimator", choices=("iwae", "ais"), default="iwae",
                        help="iwae (default): importance sampling with the guide; ais: annealed "
                        "importance sampling, saved beside IWAE-K and the ELBO on the same images "
                        "in RUN_DIR/ais_<split>.npz")
    parser.add_argument("--chains", type=int, default=16, help="AIS chains per datapoint (16)")
    parser.add_argument("--steps", type=int, default=1000,
                        help="AIS annealing steps T (default 1000)")
    parser.add_argument("--leapfrog", type=int, default=5,
                        help="leapfrog steps per HMC transition (default 5)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="sigmoid",
                        help="inverse-temperature schedule (default sigmoid)")
    parser.add_argument("--bdmc", action="store_true",
                        help="bidirectional Monte Carlo on data simulated from the model: "
                        "stochastic lower and upper bounds of log p(x), in RUN_DIR/bdmc.npz")
    parser.add_argument("--n", type=int, default=100,
                        help="with --bdmc: datapoints to simulate (default 100)")


def _ms(a) -> dict:
    a = np.asarray(a, dtype=float)
    se = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else float("nan")
    return {"mean": float(a.mean()), "se": se}


def _options(ns) -> EvalOptions:
    """The evaluation's shared options from the namespace (a flag left unset takes
    :class:`evaluation.api.EvalOptions`' default; its checks run on construction)."""
    given = {name: getattr(ns, name) for name in config_defaults(EvalOptions)
             if getattr(ns, name, None) is not None}
    return EvalOptions(**given)


def ais_figure(est: AISEstimate, iw, cfg):
    """One run's AIS against its IWAE estimate on the same images: per image (scatter on shared
    axes with the identity), the difference AIS − IWAE-K, and the acceptance rate and step size
    along the schedule (pilot first), so the adaptation can be seen working."""
    fig, ax = plt.subplots(1, 3, figsize=(14, 4.2))
    a, b = iw.log_marginal, est.log_marginal
    ax[0].scatter(a, b, s=6, alpha=0.6)
    lim = [min(a.min(), b.min()), max(a.max(), b.max())]
    ax[0].plot(lim, lim, "k:", lw=1, label="AIS = IWAE")
    ax[0].set_xlabel(f"IWAE-{iw.num_samples} log p(x), nats")
    ax[0].set_ylabel(f"AIS (T = {est.num_steps}, {est.num_chains} chains), nats")
    ax[0].set_aspect("equal", adjustable="datalim")
    ax[0].legend(fontsize=8)
    ax[0].set_title("per image", fontsize=9)
    d = b - a
    ax[1].hist(d, bins=40, color="0.4")
    ax[1].axvline(0, color="k", lw=0.8)
    ax[1].axvline(d.mean(), color="C3", ls="--", label=f"mean {d.mean():.3f} nats")
    ax[1].set_xlabel(f"AIS − IWAE-{iw.num_samples}, nats per image")
    ax[1].set_ylabel("images")
    ax[1].legend(fontsize=8)
    ax[1].set_title(f"how far below AIS IWAE lies (n = {d.size})", fontsize=9)
    t = np.arange(len(est.accept_trace))
    ax[2].plot(t, est.accept_trace, lw=0.8, label="acceptance (mean over images)")
    ax[2].axhline(est.target_accept, color="k", lw=0.6, ls=":", label="target")
    ax[2].set_xlabel("transition (pilot, then the schedule)")
    ax[2].set_ylabel("acceptance rate")
    ax[2].set_ylim(0, 1.05)
    tw = ax[2].twinx()
    tw.plot(t, est.step_trace, color="C1", lw=0.8)
    tw.set_ylabel("step size (geometric mean)", color="C1")
    tw.set_yscale("log")
    ax[2].legend(fontsize=8, loc="lower right")
    ax[2].set_title("HMC adaptation along the schedule", fontsize=9)
    fig.suptitle(run_title(cfg, f"AIS vs IWAE-{iw.num_samples} on the same images"), fontsize=9)
    fig.tight_layout()
    return fig


def bdmc_figure(res: BDMCResult, cfg, num_steps: int, num_chains: int):
    """BDMC on simulated images: the lower (forward) and upper (reverse) AIS bound of every
    image on shared axes, and the gap between them."""
    fig, ax = plt.subplots(1, 2, figsize=(10, 4.2))
    lo, hi = res.lower, res.upper
    order = np.argsort(lo)
    ax[0].plot(lo[order], "o", ms=3, label="lower (forward AIS)")
    ax[0].plot(hi[order], "o", ms=3, mfc="none", label="upper (reverse AIS)")
    ax[0].set_xlabel("simulated image (sorted by the lower bound)")
    ax[0].set_ylabel("log p(x) bound, nats")
    ax[0].legend(fontsize=8)
    ax[0].set_title("the sandwich per image", fontsize=9)
    ax[1].hist(res.gap, bins=30, color="0.4")
    ax[1].axvline(res.gap.mean(), color="C3", ls="--", label=f"mean gap {res.gap.mean():.3f}")
    ax[1].set_xlabel("upper − lower, nats")
    ax[1].set_ylabel("simulated images")
    ax[1].legend(fontsize=8)
    ax[1].set_title("AIS's own error bound (stochastic: it holds on average)", fontsize=9)
    fig.suptitle(run_title(cfg, f"BDMC, T = {num_steps}, {num_chains} chains, "
                                f"n = {lo.size} simulated"), fontsize=9)
    fig.tight_layout()
    return fig


def run_from_cli(ns, run_dir) -> str:
    """``--estimator ais`` or ``--bdmc``: run it on the run's data, save ``.npz``/``.json`` in
    the run directory, and return the text to print."""

    opt = _options(ns)
    as_json = bool(getattr(ns, "json", False))
    run = load_run(run_dir, opt.data_dir, opt.device, checkpoint=opt.checkpoint)
    cfg, system, data = run
    split = opt.split
    part = data.split(split).subset(opt.limit, opt.spread)
    inputs = get_system(cfg.system).model_inputs(part)
    if hasattr(system, "check_data"):
        system.check_data(*inputs)
    seed = opt.seed
    memory = int(opt.memory_gb * (1 << 30))
    opts = dict(num_chains=ns.chains, num_steps=ns.steps, leapfrog_steps=ns.leapfrog,
                schedule=getattr(ns, "schedule", "sigmoid"), memory=memory, progress=True)
    info = {"run": str(run_dir), "system": cfg.system, "seed": seed,
            "checkpoint": run.checkpoint.name, "checkpoint_epoch": run.epoch}
    run_dir = Path(run_dir)
    pyro.set_rng_seed(seed)
    if ns.bdmc:
        res = bdmc(system.model, system.guide, *inputs, n=ns.n, **opts)
        summary = res.summary() | info
        res.save(run_dir / "bdmc.npz")
        (run_dir / "bdmc.json").write_text(json.dumps(summary, indent=2) + "\n")
        figure = save(bdmc_figure(res, cfg, ns.steps, ns.chains), run_dir, "bdmc")
        if as_json:
            return json.dumps(summary)
        s = summary
        return "\n".join([
            describe(cfg),
            f"BDMC on n = {s['n']} datapoints simulated from the model; {ns.chains} chains, "
            f"T = {ns.steps} ({s['schedule']}), {ns.leapfrog} leapfrog steps, seed {seed}; "
            "nats per datapoint, mean ± standard error",
            f"  {'lower (forward AIS)':<22}{s['lower']['mean']:>12.3f} ± {s['lower']['se']:.3f}",
            f"  {'upper (reverse AIS)':<22}{s['upper']['mean']:>12.3f} ± {s['upper']['se']:.3f}",
            f"  {'gap upper - lower':<22}{s['gap']['mean']:>12.3f} ± {s['gap']['se']:.3f}",
            f"  acceptance {s['accept_rate']['forward']:.2f} forward, "
            f"{s['accept_rate']['reverse']:.2f} reverse; {s['seconds']:.1f} s",
            f"saved: {run_dir / 'bdmc.npz'}", f"figure: {figure}"])
    est = ais_log_marginal(system.model, system.guide, *inputs, **opts)
    ks = sorted(set(opt.k))
    pyro.set_rng_seed(seed)
    iw = estimate_log_marginal(system.model, system.guide, *inputs, num_samples=ks[-1], ks=ks,
                               memory=memory, progress=True)
    K = iw.num_samples
    diff = est.log_marginal - iw.log_marginal
    summary = {"split": split, "ais": est.summary(), "elbo": _ms(iw.elbo),
               "iwae": {int(k): _ms(v) for k, v in sorted(iw.iwae.items())},
               "ais_minus_iwae": _ms(diff) | {
                   "median": float(np.median(diff)), "max": float(diff.max()),
                   "worst": [int(i) for i in np.argsort(-diff)[:10]]}} | info
    stem = f"ais_{split}"
    est.save(run_dir / f"{stem}.npz", iwae_log_marginal=iw.log_marginal, elbo=iw.elbo,
             khat=iw.khat, iwae_num_samples=np.array(K),
             **{f"iwae_{k}": v for k, v in iw.iwae.items()})
    (run_dir / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    figure = save(ais_figure(est, iw, cfg), run_dir, stem)
    if as_json:
        return json.dumps(summary)
    a = summary["ais"]
    lines = [describe(cfg),
             f"{split} split, n = {est.n}; AIS with {ns.chains} chains, T = {ns.steps} "
             f"({a['schedule']}, from the guide), {ns.leapfrog} leapfrog steps, seed {seed}; "
             "nats per datapoint, mean ± standard error",
             f"  {'ELBO':<22}{summary['elbo']['mean']:>12.3f} ± {summary['elbo']['se']:.3f}"]
    for k, v in summary["iwae"].items():
        lines.append(f"  {f'IWAE k={k}':<22}{v['mean']:>12.3f} ± {v['se']:.3f}")
    lines += [
        f"  {'AIS':<22}{a['log_marginal']['mean']:>12.3f} ± {a['log_marginal']['se']:.3f}"
        f"  (Monte Carlo error of the mean {a['mc_se_mean']:.3f})",
        f"  {f'AIS - IWAE-{K}':<22}{summary['ais_minus_iwae']['mean']:>12.3f} ± "
        f"{summary['ais_minus_iwae']['se']:.3f}  (median {summary['ais_minus_iwae']['median']:.3f},"
        f" max {summary['ais_minus_iwae']['max']:.3f})",
        f"  acceptance {a['accept_rate']:.2f} (target {a['target_accept']:.2f}); "
        f"{a['evaluations_per_datapoint']} log-joint evaluations per datapoint; "
        f"{a['seconds']:.1f} s",
        f"saved: {run_dir / (stem + '.npz')}", f"figure: {figure}"]
    return "\n".join(lines)
