r"""The one importance-weighted estimator of log marginal likelihood, with its diagnostics.

For a model :math:`p(x, z)` and guide :math:`q(z \mid x)` and K draws :math:`z_k \sim q`,
the log weights are :math:`\log w_k = \log p(x, z_k) - \log q(z_k \mid x)` and

.. math::

    \widehat{\log p}(x)_K = \log \frac1K \sum_{k=1}^K w_k \quad(\text{IWAE, Burda et al. 2015}),
    \qquad \text{ELBO} \approx \frac1K \sum_k \log w_k .

:math:`E[\widehat{\log p}_K]` rises with K to :math:`\log p(x)`; the ELBO lies below both.

How the code decides what a "datapoint" is: when every sample site of the model and the guide
lies inside ``pyro.plate(data_plate)``, the weights factorize over the plate and the estimate is
per datapoint: log weights have shape ``(K, N)``, the particles plate sitting left of every
dimension the probe saw in a log-probability (declared plates *and* dimensions a site gets by
broadcasting).  Otherwise (a global latent, or data observed under another plate) the weight is
one joint weight per particle, ``(K,)``, and the result holds a single value; ``summed`` says
which sites were summed into it.

Datapoints are evaluated in chunks in one of three ways (``Structure.mode``):

* ``"cut"``: tensors among the arguments (positional, and keyword tensors of the same first
  size) whose first dimension is N are cut into chunks of rows; used when a probe on two rows
  shows a per-datapoint pair that follows the first axis and no non-module ``pyro.param`` has a
  dimension of size N (a per-datapoint parameter cannot be cut by the estimator);
* ``"index"``: the data plate subsamples at random (``pyro.plate("data", N, subsample_size=b)``
  without ``subsample=``): the arguments are passed whole and the plate's subsample is fixed to
  consecutive blocks of b indices, so every datapoint is evaluated exactly once;
* ``"whole"``: all datapoints at once, only the particles chunked (the plate does not follow
  the first axis, the pair cannot run on a slice, or a guide parameter is per datapoint).

Pyro stores log-probabilities multiplied by subsampling and ``poutine.scale`` factors.  A
factor s inside :math:`\log \sum_k \exp(s \log w_k)` changes the answer, so this estimator never
uses them: it calls each site's ``fn.log_prob`` itself (applying masks, which are part of the
model) and ignores ``scale``.  Guides with enumerated sites are refused, and so are point-mass
(``Delta``) proposals, except the ``Delta`` sites by which Pyro's autoguides (``AutoNormal``,
``AutoDiagonalNormal``, ``AutoMultivariateNormal``, ...) unpack an auxiliary latent: their
``log_density`` is the log-Jacobian, so the guide's summed log-probability is the density of the
model's latents.  ``pyro.deterministic`` sites carry no probability and are skipped.

Trust (docs/estimator.md): k-hat < 0.5 for the raw estimate ``log_marginal``, k-hat < 0.7 for
the Pareto-smoothed ``log_marginal_psis``; k-hat is NaN where fewer than five log weights lie
above the Pareto tail's cutoff (weights that take few distinct values, as with a discrete
guide, or K below about 25), -1 where all weights are equal.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.autoguide import AutoGuide
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from inference.distributed import derive_seed, share
from inference.progress import progress as progress_bar
from models.common import GenlabError

#: Default memory budget of one estimator call, bytes.
DEFAULT_MEMORY = 1 << 30
#: Bytes of hidden activations etc. assumed per byte of site values and parameters.
_OVERHEAD = 3
#: Bytes held per log weight (float64 weights and their copies in the statistics).
_BYTES_PER_WEIGHT = 32
#: Default limit on the projected running time of one estimate, seconds (``max_seconds``).
MAX_SECONDS = 4 * 3600.0
#: k-hat thresholds: the raw estimate is trustworthy below the first, the smoothed below the second.
KHAT_RAW, KHAT_PSIS = 0.5, 0.7
#: Datapoints per block (mode "cut"; mode "index" uses the plate's own subsample size): the
#: unit of sampling and of sharding.  Fixed, so the draws never depend on the memory budget.
BLOCK = 16
#: The size of one sampling cell (a block of datapoints times a run of particles), bytes by the
#: same estimate as the memory budget, but fixed: particles per model call are set by it.
CELL_BYTES = 256 << 20


class EstimatorRefusal(GenlabError):
    """A model/guide pair (or a request) the estimator refuses, with the reason in one sentence."""


def _import_arviz():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


# ----------------------------------------------------------------------------- subsampling
class _RandomPlate(Exception):
    """Raised by a scouting :class:`_FixSubsample`: the data plate subsamples at random."""

    def __init__(self, size: int, subsample_size: int):
        super().__init__(size, subsample_size)
        self.size, self.subsample_size = size, subsample_size


class _FixSubsample(Messenger):
    """Fixes the random subsample of plate ``name`` to the block ``start .. start + b``.

    A plate with ``subsample_size=b`` and no ``subsample`` draws b random indices each run;
    here they become consecutive indices (the block is moved left to end at N when ``start``
    is near the end, so every block has b indices, which the plate requires).  With
    ``scout=True`` it only reports such a plate, by raising :class:`_RandomPlate`.  A random
    subsample of any other plate is refused: its sites would cover random datapoints.
    """

    def __init__(self, name: str, start: Optional[int] = None, scout: bool = False):
        super().__init__()
        self.name, self.start, self.scout = name, start, scout
        self.block = None  # (N, b, first index) of the last fixed subsample

    def _pyro_sample(self, msg):
        fn = msg["fn"]
        if type(fn).__name__ != "_Subsample" or msg["value"] is not None:
            return
        size, b = fn.size, fn.subsample_size
        if b is None or b == size:
            return
        if msg["name"] != self.name:
            if not (self.scout or self.start is not None):
                return  # training (the IWAE loss): a random subsample is the point
            raise EstimatorRefusal(
                f"plate {msg['name']!r} draws a random subsample of {b} of its {size} entries, so "
                "its sites would cover random datapoints; evaluate with subsample_size=None, or "
                f"name it as the data plate (data_plate={msg['name']!r})"
            )
        if self.scout:
            raise _RandomPlate(int(size), int(b))
        if self.start is None:
            return
        first = max(0, min(int(self.start), int(size) - int(b)))
        msg["value"] = torch.arange(first, first + int(b), device=fn.device)
        self.block = (int(size), int(b), first)


# ----------------------------------------------------------------------------- tracing
def _traces(model, guide, args, kwargs, particles: Optional[int] = None, dim: int = -2,
            fix: Optional[_FixSubsample] = None):
    """(model trace, guide trace), the model replayed against the guide's draws."""
    if fix is not None:
        model, guide = fix(model), fix(guide)

    def run():
        guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
        return model_tr, guide_tr

    if particles is None:
        return run()
    with pyro.plate("particles", particles, dim=dim):
        return run()


def _sample_sites(trace):
    return [(n, s) for n, s in trace.nodes.items()
            if s["type"] == "sample" and not site_is_subsample(s)
            and not s["infer"].get("_deterministic")]


def _data_frame(site, data_plate: str):
    return next((f for f in site["cond_indep_stack"] if f.name == data_plate), None)


def _point_mass(fn) -> bool:
    """Whether ``fn`` is a Delta, possibly wrapped (Independent, masked, expanded, transformed)."""
    while fn is not None:
        if isinstance(fn, dist.Delta):
            return True
        fn = getattr(fn, "base_dist", None)
    return False


def _is_module_param(name: str) -> bool:
    return "$$$" in name  # pyro.module's parameter names: "<module>$$$<parameter>"


@dataclass
class Structure:
    """What a probe run of the model and guide showed about their sites."""

    max_plate_nesting: int
    per_datapoint: bool
    outside: list = field(default_factory=list)
    scaled: list = field(default_factory=list)
    bytes_per_unit: float = 0.0  # per datapoint (per-datapoint mode) or per call (joint)
    data_size: Optional[int] = None  # the data plate's full size N (its subsample may be smaller)
    mode: str = "whole"  # how datapoints are chunked: "cut", "index" or "whole" (module docstring)
    subsample_size: Optional[int] = None  # b of a randomly subsampling data plate ("index")
    params: dict = field(default_factory=dict)  # non-module pyro.param name -> shape
    auxiliary: list = field(default_factory=list)  # the guide's auxiliary sites (autoguides)

    def summed(self, data_plate: str) -> str:
        if self.per_datapoint:
            return f"per datapoint of plate {data_plate!r}: all sample sites lie inside it"
        return (
            f"one joint value: sites {self.outside} lie outside plate {data_plate!r}, so every "
            "site's log-probability was summed into a single weight per particle"
        )


def _dist_bytes(d) -> int:
    total = 0
    for v in vars(d).values():
        if torch.is_tensor(v):
            total += v.numel() * v.element_size()
        elif isinstance(v, torch.distributions.Distribution):
            total += _dist_bytes(v)
    return total


def _check_guide_sites(guide_tr, model_tr):
    """Refusals: enumerated or observed guide sites, point masses, unmatched sites."""
    model_sites = dict(_sample_sites(model_tr))
    guide_sites = _sample_sites(guide_tr)
    aux = [n for n, s in guide_sites if s["infer"].get("is_auxiliary")]
    for name, site in guide_sites:
        if site["infer"].get("enumerate"):
            raise EstimatorRefusal(
                f"guide site {name!r} is enumerated; the importance-weighted estimator needs every "
                "guide site sampled (enumerated sites cannot be weighted correctly)"
            )
        if site["is_observed"]:
            raise EstimatorRefusal(f"guide site {name!r} is observed; guides may only sample latents")
        if name in aux:
            continue
        if name not in model_sites:
            raise EstimatorRefusal(f"guide site {name!r} has no counterpart in the model")
        if _point_mass(site["fn"]) and not aux:
            if model_sites[name]["fn"].support.is_discrete:
                raise EstimatorRefusal(
                    f"guide site {name!r} is a point mass (Delta) on a discrete latent, which "
                    "proposes a single value and would report the lower bound log p(x, z0) as "
                    "if exact; sample it from a distribution over all its values, or enumerate "
                    "it out of the model"
                )
            raise EstimatorRefusal(
                f"guide site {name!r} is a point mass (Delta, e.g. AutoDelta or a MAP guide) for "
                "a continuous latent, which is no importance proposal (it has no density where "
                "the posterior has mass); use a guide with a density, e.g. AutoNormal"
            )
    names = {n for n, _ in guide_sites}
    for name, site in model_sites.items():
        if not site["is_observed"] and name not in names:
            raise EstimatorRefusal(
                f"model site {name!r} is latent but the guide does not sample it; the importance "
                "weights need a proposal for every latent site"
            )
    return aux


def probe(model, guide, args, kwargs, data_plate: str = "data", n_data: Optional[int] = None,
          *, scout: bool = False, subsample_start: Optional[int] = None):
    """Run guide and model once (no particles) and check they can be importance-weighted.

    ``scout=True`` raises :class:`_RandomPlate` as soon as the data plate turns out to subsample
    at random; ``subsample_start`` fixes such a plate's subsample (mode ``"index"``).
    """
    fix = _FixSubsample(data_plate, subsample_start, scout)
    with torch.no_grad():
        model_tr, guide_tr = _traces(model, guide, args, kwargs, fix=fix)
    aux = _check_guide_sites(guide_tr, model_tr)
    nest, outside, scaled, nbytes, full = 0, [], [], 0, None
    for tr in (model_tr, guide_tr):
        for name, site in _sample_sites(tr):
            nest = max(nest, len(site["fn"].batch_shape))
            nest = max(nest, *[-f.dim for f in site["cond_indep_stack"] if f.vectorized], 0)
            # the dimensions the log-probability really has (a site may broadcast its value
            # against data with more dimensions than its batch shape and plates declare)
            with torch.no_grad(), pyro.validation_enabled(False):
                nest = max(nest, site["fn"].log_prob(site["value"]).dim())
            frame = _data_frame(site, data_plate)
            if frame is None or (n_data is not None and frame.size != n_data):
                if name not in outside:
                    outside.append(name)
            if site["scale"] is not None and not (
                isinstance(site["scale"], (int, float)) and site["scale"] == 1.0
            ):
                scaled.append(name)
            nbytes += site["value"].numel() * site["value"].element_size()
            nbytes += _dist_bytes(site["fn"])
    params = {}
    for tr in (model_tr, guide_tr):
        for name, site in tr.nodes.items():
            if site["type"] == "param" and not _is_module_param(name):
                params[name] = tuple(site["value"].shape)
    # the plate's full size N: its subsample site's distribution knows it (frames hold B only)
    sub = model_tr.nodes.get(data_plate)
    if sub is not None and site_is_subsample(sub):
        full = int(sub["fn"].size)
    per = not outside
    unit = nbytes / n_data if (per and n_data) else nbytes
    st = Structure(nest, per, outside, sorted(set(scaled)), unit, full, params=params,
                   auxiliary=aux)
    if fix.block is not None:
        st.mode, st.subsample_size = "index", fix.block[1]
        if per:
            st.bytes_per_unit = nbytes / fix.block[1]
    return st


def log_weights(
    model, guide, args, kwargs, num_particles: int, structure: Structure, data_plate: str = "data",
    *, subsample_start: Optional[int] = None,
) -> torch.Tensor:
    """Unscaled log importance weights, ``(K, N)`` per datapoint or ``(K,)`` joint.

    Differentiable when called with gradients enabled (the runner's IWAE loss uses it).  With
    ``subsample_start`` (mode ``"index"``) a randomly subsampling data plate evaluates the
    block of datapoints from that index on (see :class:`_FixSubsample`).
    """
    nest = structure.max_plate_nesting
    pdim = -(nest + 1)
    fix = _FixSubsample(data_plate, subsample_start) if subsample_start is not None else None
    # the probe already ran with validation; skipping it here saves a third of the time
    with pyro.validation_enabled(False):
        model_tr, guide_tr = _traces(model, guide, args, kwargs, num_particles, pdim, fix)
    total = 0.0
    for tr, sign in ((model_tr, 1.0), (guide_tr, -1.0)):
        for name, site in _sample_sites(tr):
            with pyro.validation_enabled(False):
                lp = site["fn"].log_prob(site["value"])
            if site["mask"] is not None:
                lp = scale_and_mask(lp, mask=site["mask"])
            if lp.dim() > nest + 1:
                raise EstimatorRefusal(
                    f"site {name!r} has log-probabilities of shape {tuple(lp.shape)}, with more "
                    f"dimensions than the {nest} the probe saw, so the particles cannot be kept "
                    "apart from its batch; declare its dimensions with pyro.plate"
                )
            lp = lp.reshape((1,) * (nest + 1 - lp.dim()) + tuple(lp.shape))
            if lp.shape[0] not in (1, num_particles):
                raise EstimatorRefusal(
                    f"site {name!r} has log-probabilities of shape {tuple(lp.shape)}, whose "
                    f"first dimension is neither 1 nor the {num_particles} particles; declare its "
                    "dimensions with pyro.plate"
                )
            keep = [0]
            if structure.per_datapoint:
                frame = _data_frame(site, data_plate)
                if frame is None:
                    raise EstimatorRefusal(
                        f"site {name!r} lies outside plate {data_plate!r}; per-datapoint "
                        "importance weights need every sample site inside it"
                    )
                keep.append(nest + 1 + frame.dim)
            other = [d for d in range(lp.dim()) if d not in keep]
            if other:
                lp = lp.sum(other)
            total = total + sign * lp
    if not torch.is_tensor(total):
        raise EstimatorRefusal("the model and guide have no sample sites to weight")
    return total.expand(num_particles, *total.shape[1:]) if total.shape[0] == 1 else total


# ----------------------------------------------------------------------------- statistics
def _psis(lw: np.ndarray) -> tuple:
    """Pareto k-hat and the PSIS estimate log mean w per row of ``lw`` ``(n, K)``.

    k-hat is -1 for rows of (numerically) equal weights and NaN where the Pareto fit has fewer
    than five weights above its cutoff (arviz returns inf there and smooths nothing): weights
    with few distinct values, as a discrete guide gives, or K below about 25.  The smoothed
    estimate is NaN wherever nothing was smoothed (the caller puts the raw one there).
    """
    az = _import_arviz()
    K = lw.shape[1]
    spread = lw.max(axis=1) - lw.min(axis=1)
    flat = spread <= 1e-5 * np.maximum(1.0, np.abs(lw).max(axis=1))
    out = np.full(lw.shape[0], -1.0)
    smoothed = lw.copy()
    if (~flat).any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slw, k = az.psislw(lw[~flat], normalize=False)
        k = np.asarray(k, dtype=float)
        out[~flat] = np.where(np.isinf(k), np.nan, k)
        smoothed[~flat] = np.asarray(slw, dtype=float)
    m = smoothed.max(axis=1, keepdims=True)
    psis = m[:, 0] + np.log(np.exp(smoothed - m).sum(axis=1)) - math.log(K)
    return out, np.where(np.isfinite(out) & (out != -1.0), psis, np.nan)


class WeightStats(NamedTuple):
    """Per-datapoint statistics of float64 log weights ``(K, n)`` (tensors except ``khat``)."""

    log_marginal: torch.Tensor  # IWAE at K: log-mean-exp of all K weights, (n,)
    elbo: torch.Tensor  # mean log weight, (n,)
    iwae: dict  # k -> (n,) mean over K // k groups of log-mean-exp of k weights
    khat: np.ndarray  # Pareto k-hat, (n,); -1 where all weights are equal, NaN where undefined
    ess: torch.Tensor  # effective sample size, (n,)


def _weight_stats(lw: torch.Tensor, ks: Sequence[int]) -> tuple:
    """(:class:`WeightStats`, PSIS-smoothed log marginal ``(n,)`` numpy)."""
    K = lw.shape[0]
    lse = torch.logsumexp(lw, 0)
    log_marginal = lse - math.log(K)
    elbo = lw.mean(0)
    iwae = {}
    for k in ks:
        g = K // k
        grouped = lw[: g * k].reshape(g, k, -1)
        iwae[k] = (torch.logsumexp(grouped, 1) - math.log(k)).mean(0)
    ess = torch.exp(2 * lse - torch.logsumexp(2 * lw, 0))
    lw_np = lw.T.cpu().numpy()
    khat, psis = _psis(lw_np)
    raw = ~np.isfinite(psis)  # nothing smoothed: the raw estimate itself
    psis[raw] = log_marginal.cpu().numpy()[raw]
    flat = khat == -1.0
    ess[torch.from_numpy(flat).to(ess.device)] = float(K)
    return WeightStats(log_marginal, elbo, iwae, khat, ess), psis


def weight_stats(lw: torch.Tensor, ks: Sequence[int]) -> WeightStats:
    """From float64 log weights ``(K, n)``: IWAE at K, ELBO, IWAE at each k, k-hat, ESS."""
    return _weight_stats(lw, ks)[0]


@dataclass
class Estimate:
    """Per-datapoint (or one joint) importance-sampling results, all in nats.

    ``log_marginal`` is the raw IWAE estimate, trustworthy where ``khat`` < 0.5;
    ``log_marginal_psis`` the Pareto-smoothed one (PSIS, Vehtari et al. 2024), trustworthy
    where ``khat`` < 0.7.  ``khat`` is NaN where the tail fit is undefined (see :func:`_psis`).
    """

    log_marginal: np.ndarray
    elbo: np.ndarray
    iwae: dict
    khat: np.ndarray
    ess: np.ndarray
    num_samples: int
    per_datapoint: bool
    summed: str
    scaled_sites: list
    log_marginal_psis: Optional[np.ndarray] = None
    mode: str = ""

    @property
    def n(self) -> int:
        return int(self.log_marginal.shape[0])

    @classmethod
    def concat(cls, parts: Sequence["Estimate"]) -> "Estimate":
        """One Estimate from the shards of :func:`estimate_log_marginal` (``shard=``), in order."""
        parts = list(parts)
        first = parts[0]
        cat = np.concatenate
        psis = (None if first.log_marginal_psis is None
                else cat([p.log_marginal_psis for p in parts]))
        return cls(cat([p.log_marginal for p in parts]), cat([p.elbo for p in parts]),
                   {k: cat([p.iwae[k] for p in parts]) for k in first.iwae},
                   cat([p.khat for p in parts]), cat([p.ess for p in parts]), first.num_samples,
                   first.per_datapoint, first.summed, first.scaled_sites, psis, first.mode)

    def summary(self) -> dict:
        """Means with standard errors across datapoints, and the k-hat summary.

        ``khat_gt_0.5``: the share of values whose raw estimate is untrustworthy;
        ``khat_gt_0.7``: the share whose smoothed estimate (``psis``) is untrustworthy;
        ``khat_undefined``: the share with NaN k-hat (counted in neither).
        """

        def ms(a):
            a = np.asarray(a, dtype=float)
            se = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else float("nan")
            return {"mean": float(a.mean()), "se": se}

        psis = self.log_marginal if self.log_marginal_psis is None else self.log_marginal_psis
        return {
            "n": self.n,
            "num_samples": self.num_samples,
            "elbo": ms(self.elbo),
            "iwae": {int(k): ms(v) for k, v in sorted(self.iwae.items())},
            "psis": ms(psis),
            "gap": ms(self.log_marginal - self.elbo),
            "khat_gt_0.5": float(np.mean(self.khat > KHAT_RAW)),
            "khat_gt_0.7": float(np.mean(self.khat > KHAT_PSIS)),
            "khat_undefined": float(np.mean(np.isnan(self.khat))),
            "ess_mean": float(np.mean(self.ess)),
            "per_datapoint": self.per_datapoint,
            "summed": self.summed,
        }

    def save(self, path) -> None:
        """Per-datapoint values as ``.npz`` (``iwae_<k>`` arrays), written atomically."""

        arrays = dict(log_marginal=self.log_marginal, elbo=self.elbo, khat=self.khat,
                      ess=self.ess, num_samples=np.array(self.num_samples))
        if self.log_marginal_psis is not None:
            arrays["log_marginal_psis"] = self.log_marginal_psis
        arrays.update({f"iwae_{k}": v for k, v in self.iwae.items()})
        tmp = f"{path}.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)


# ----------------------------------------------------------------------------- the estimator
def _leading(args, n: int):
    return [i for i, a in enumerate(args) if torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == n]


def _leading_kw(kwargs, n: int):
    return [k for k, a in kwargs.items() if torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == n]


def _cut(args, kwargs, n: int, start: int, stop: int):
    """The arguments with rows ``start:stop`` of every tensor whose first dimension is ``n``."""
    idx, kidx = _leading(args, n), _leading_kw(kwargs, n)
    cargs = tuple(a[start:stop] if i in idx else a for i, a in enumerate(args))
    ckw = {k: (a[start:stop] if k in kidx else a) for k, a in kwargs.items()}
    return cargs, ckw


def _data_size(args, kwargs) -> Optional[int]:
    """N: the one first size of the positional tensors (of the keyword tensors when there are
    no positional ones); None when they disagree or there are none."""
    for group in (args, tuple(kwargs.values())):
        lead = {a.shape[0] for a in group if torch.is_tensor(a) and a.dim() > 0}
        if lead:
            return lead.pop() if len(lead) == 1 else None
    return None


def _setup_autoguide(guide, args, kwargs) -> None:
    """An autoguide learns its shapes from its first call: make that call the full data."""

    if isinstance(guide, AutoGuide) and getattr(guide, "prototype_trace", None) is None:
        setup = getattr(guide, "_setup_prototype", None)
        if setup is not None:
            with torch.no_grad():
                setup(*args, **kwargs)


def _structure(model, guide, args, kwargs, data_plate: str, n_all: Optional[int]) -> Structure:
    """Probe the pair and choose how datapoints are chunked (module docstring)."""
    if n_all:
        probe_n = min(2, n_all)
        cargs, ckw = _cut(args, kwargs, n_all, 0, probe_n)
        store = pyro.get_param_store()
        before = set(store.keys())
        try:
            st = probe(model, guide, cargs, ckw, data_plate, probe_n, scout=True)
        except _RandomPlate:
            st = None
            random = True
        except EstimatorRefusal:
            raise
        except Exception:  # the pair cannot run on a slice (e.g. a per-datapoint parameter)
            st, random = None, False
        else:
            random = False
        # parameters first created on the slice may be sized by it: let the real run make them
        created = [k for k in store.keys() if k not in before and not _is_module_param(k)]
        for k in created:
            del store[k]
        if st is not None and st.per_datapoint:
            sized = [k for k, s in st.params.items() if n_all > probe_n and n_all in s]
            if not sized and not created:
                st.mode = "cut"
                return st
        if random:
            return _index_structure(model, guide, args, kwargs, data_plate)
    try:
        st = probe(model, guide, args, kwargs, data_plate, None, scout=True)
    except _RandomPlate:
        return _index_structure(model, guide, args, kwargs, data_plate)
    st.mode = "whole"
    return st


def _index_structure(model, guide, args, kwargs, data_plate: str) -> Structure:
    st = probe(model, guide, args, kwargs, data_plate, None, subsample_start=0)
    if not st.per_datapoint:
        raise EstimatorRefusal(
            f"plate {data_plate!r} draws a random subsample of {st.subsample_size} of its "
            f"{st.data_size} datapoints and sites {st.outside} lie outside it, so a joint "
            "estimate would need all datapoints in one run, which the plate's subsample_size "
            "forbids; evaluate with subsample_size=None"
        )
    return st


@contextmanager
def _rng_restored():
    """Leave the global RNGs as they were (the cells reseed torch's)."""
    saved = pyro.util.get_rng_state()
    try:
        yield
    finally:
        pyro.util.set_rng_state(saved)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def estimate_log_marginal(
    model,
    guide,
    *args,
    num_samples: int = 1000,
    ks: Sequence[int] = (),
    data_plate: str = "data",
    memory: int = DEFAULT_MEMORY,
    progress: bool = False,
    max_seconds: Optional[float] = MAX_SECONDS,
    shard: tuple = (0, 1),
    **kwargs,
) -> Estimate:
    """The IWAE estimate of log p(x), the ELBO, IWAE at each k, k-hat, ESS and the PSIS estimate.

    ``args``/``kwargs`` are the model's and guide's arguments.  The data are the tensors whose
    first dimension is N, the one first size the positional tensor arguments share (or, with
    no positional tensors, the keyword ones); keyword tensors of that first size are data too.
    Datapoints are evaluated in chunks (module docstring: ``"cut"``, ``"index"`` or
    ``"whole"``) and the K particles in chunks, so that one chunk's values take about
    ``memory`` bytes at most.  Log-sum-exp is taken in float64 over all K draws of each
    datapoint.

    Draws: the datapoints fall into fixed blocks (:data:`BLOCK` datapoints in mode
    ``"cut"``, the plate's subsample in ``"index"``, all of them in ``"whole"``) and each block's
    K particles into fixed runs (cells of about :data:`CELL_BYTES`); every cell samples from
    torch's RNG seeded by (a seed drawn once from the global RNG, block, cell).  So an estimate
    depends on the global seed and the datapoint's block only, never on ``memory`` or on
    ``shard``; the global RNG is left as it was but for that one draw.  ``shard=(rank, size)``
    evaluates only the rank's contiguous share of the blocks (``Estimate.concat`` joins them).

    Requests that cannot finish in reason are refused: K log weights of one datapoint must fit
    in ``memory`` (at least 1 GiB), and when the first chunk projects a total above ``max_seconds`` (default
    four hours) the call stops with the projection; ``max_seconds=None`` lifts the limit.
    """
    K, ks = _check_request(num_samples, ks, memory)
    keep_freed_memory()
    base_seed = int(torch.randint(0, 1 << 62, (1,)).item())  # the one draw from the global RNG
    _setup_autoguide(guide, args, kwargs)
    n_all = _data_size(args, kwargs)
    st = _structure(model, guide, args, kwargs, data_plate, n_all)
    plan = _Plan.make(st, n_all, K, shard)
    clock = _Clock(plan.n_parts, K, max_seconds)
    outs = []
    bar = progress_bar(len(plan.blocks), f"IWAE K={K}", bool(progress) and shard[0] == 0,
                       unit="chunks")
    with torch.no_grad(), _rng_restored(), flush_denormals():
        try:
            for block, start in plan.blocks:
                lw = _block_log_weights(model, guide, args, kwargs, st, plan, block, start,
                                        base_seed, data_plate, clock)
                outs.append(_weight_stats(lw, ks))
                bar.update(1)
        finally:
            bar.close()
    return _assemble(outs, st, K, ks, data_plate)


_ALLOCATOR = {"tuned": False}


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse instead of returning it to the system
    (``mallopt`` of M_TRIM_THRESHOLD and M_MMAP_THRESHOLD, as the environment variables
    ``MALLOC_TRIM_THRESHOLD_``/``MALLOC_MMAP_THRESHOLD_`` would).  The estimator's chunks
    allocate and free the same large temporaries over and over; returned to the system, every
    chunk re-faults them page by page, which cost about a quarter of the estimator's time
    (``benchmarks/estimator_throughput.py``: 73 % of the plain-PyTorch ceiling before, at the
    ceiling after).  The process keeps its peak memory instead of shrinking after an estimate.
    Done once per process; a no-op off glibc, or with ``GENLAB_KEEP_MEMORY=0``.  Changes no
    number.  Returns whether it was applied."""
    if _ALLOCATOR["tuned"] or os.environ.get("GENLAB_KEEP_MEMORY", "1") == "0":
        return _ALLOCATOR["tuned"]
    _ALLOCATOR["tuned"] = True
    try:
        import ctypes  # only here: the C library's allocator settings

        libc = ctypes.CDLL("libc.so.6")
        big = (1 << 31) - 1
        ok = libc.mallopt(-1, big)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, big)  # M_MMAP_THRESHOLD (glibc caps it; trimming is what matters)
        return bool(ok)
    except (OSError, AttributeError):
        return False


_DENORMALS = {"depth": 0}


@contextmanager
def flush_denormals():
    """Within: the CPU computes float values below the normal range (|v| < 1.2e-38 in float32,
    the "denormals") as zero (``torch.set_flush_denormal``), and restores the default (off)
    when the outermost such block ends.

    Why: x86 CPUs compute on denormals up to ~100x slower, and genlab's work makes them
    routinely: IWAE's self-normalized weights of k = 50 particles (most of them ~e^-100 once a
    model trains), the exp inside softplus of a confident decoder's logits (l < -87).  Measured
    on the 2-core CPU (``python benchmarks/denormals.py --eval-run runs/vae-d20``): an IWAE
    k = 50 training step of the paper's one-layer model after 300 steps, 61.4 -> 23.9 ms; an
    IWAE K = 1000 estimate of 48 test images, 0.69 -> 0.47 s (``runs/vae-d4``: 0.75 -> 0.45).
    A denormal's contribution to any sum with a normal-sized term is below float32 rounding,
    so the numbers stay the same: bitwise-identical
    losses and parameters over 150 steps of IWAE k = 50, Trace_ELBO k = 5 and DReG k = 5 on both
    paper architectures, and identical estimates on three trained VAEs (tests/test_runner.py
    checks a training run and an estimate).  A number whose every term is denormal would become
    0; none of genlab's outputs is one.  A no-op where the CPU lacks the flag; CUDA is not
    affected."""
    _DENORMALS["depth"] += 1
    if _DENORMALS["depth"] == 1:
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        _DENORMALS["depth"] -= 1
        if _DENORMALS["depth"] == 0:
            torch.set_flush_denormal(False)


def flush_denormals_in_process() -> bool:
    """For command-line processes (``python -m inference``/``evaluation``, the console
    scripts, ``reproduce``): flush denormals from now on, in this thread and in the worker
    threads torch's CPU pool starts later.  A thread takes its floating-point mode from the
    thread that starts it, so :func:`flush_denormals` alone, set on the main thread after the
    pool is running, leaves the workers computing on denormals: at two threads the estimator
    gained nothing from it, and with this 1.4x (an IWAE K = 1000 estimate of 48 images with
    ``runs/vae-d20``, 0.43 -> 0.28-0.32 s, the same estimates).  Call it first thing; later
    :func:`flush_denormals` blocks leave it on.  ``GENLAB_FLUSH_DENORMALS=0`` opts out.
    Returns whether it was applied."""
    if os.environ.get("GENLAB_FLUSH_DENORMALS", "1") == "0":
        return False
    _DENORMALS["depth"] += 1  # never undone
    return bool(torch.set_flush_denormal(True))


def _check_request(num_samples, ks, memory) -> tuple:
    """(K, sorted ks including K), or one sentence why the request is refused."""
    K = int(num_samples)
    if K < 1:
        raise GenlabError(f"the number of importance samples must be at least 1, got {num_samples}")
    ks = sorted({int(k) for k in ks} | {K})
    if ks[0] < 1 or ks[-1] > K:
        raise GenlabError(f"every k must lie in 1..{K} (the number of samples), got {ks}")
    if K * _BYTES_PER_WEIGHT > max(memory, DEFAULT_MEMORY):
        raise EstimatorRefusal(
            f"{K} importance samples need about {K * _BYTES_PER_WEIGHT / 2**30:.1f} GiB for the "
            f"log weights of a single datapoint, above the memory budget of "
            f"{max(memory, DEFAULT_MEMORY) / 2**30:.2f} GiB; use fewer samples (IWAE gains little beyond 10^4 to "
            "10^5), or raise memory= if the machine has it"
        )
    return K, ks


@dataclass
class _Plan:
    """The fixed blocks of datapoints and cells of particles an estimate is drawn in."""

    nb: Optional[int]  # datapoints per block (None: all of them, mode "whole")
    kb: int  # particles per cell
    blocks: list  # (block index, first datapoint) of this shard
    n_parts: int  # calls of log_weights in all

    @classmethod
    def make(cls, st: Structure, n_all, K: int, shard: tuple) -> "_Plan":
        unit = max(st.bytes_per_unit * _OVERHEAD, 1.0)
        cells = max(1, int(CELL_BYTES // unit))  # datapoint-particle pairs per call: fixed
        if st.mode == "cut":
            nb, chunks = BLOCK, list(range(0, n_all, BLOCK))
        elif st.mode == "index":
            nb = st.subsample_size
            chunks = list(range(0, st.data_size, nb))
        else:
            nb, chunks = None, [0]
        kb = max(1, min(K, cells // (nb or 1)))
        lo, hi = share(len(chunks), *shard)
        blocks = list(enumerate(chunks))[lo:hi]
        return cls(nb, kb, blocks, len(blocks) * math.ceil(K / kb))


class _Clock:
    """Times the first call and refuses a projected total above ``max_seconds``."""

    def __init__(self, n_parts: int, K: int, max_seconds: Optional[float]):
        self.n_parts, self.K, self.max_seconds = n_parts, K, max_seconds
        self.t0, self.done = time.perf_counter(), 0

    def tick(self) -> None:
        self.done += 1
        if self.done == 1 and self.n_parts > 1 and self.max_seconds is not None:
            projected = (time.perf_counter() - self.t0) * self.n_parts
            if projected > self.max_seconds:
                raise EstimatorRefusal(
                    f"this estimate would take about {_duration(projected)} ({self.K} "
                    f"samples in {self.n_parts} chunks, timed on the first), above "
                    f"max_seconds={self.max_seconds:g}; use fewer samples or datapoints, or "
                    "pass max_seconds=None (genlab-eval --yes) to run it anyway"
                )


def _block_log_weights(model, guide, args, kwargs, st: Structure, plan: _Plan, block: int,
                       start: int, base_seed: int, data_plate: str, clock: _Clock) -> torch.Tensor:
    """float64 log weights ``(K, n_block)`` of one block, each cell of particles drawn from
    torch's RNG seeded by (base seed, block, cell)."""
    cargs, ckw, sub = args, kwargs, None
    if st.mode == "cut":
        cargs, ckw = _cut(args, kwargs, _data_size(args, kwargs), start, start + plan.nb)
    elif st.mode == "index":
        sub = start
    K, parts = clock.K, []
    for cell, k0 in enumerate(range(0, K, plan.kb)):
        torch.manual_seed(derive_seed(base_seed, block, cell))
        lw = log_weights(model, guide, cargs, ckw, min(plan.kb, K - k0), st, data_plate,
                         subsample_start=sub)
        parts.append(lw.double().reshape(lw.shape[0], -1))
        clock.tick()
    lw = torch.cat(parts, 0)
    if st.mode == "index":
        # the last block is moved left to end at N: keep only datapoints not yet done
        first = max(0, min(start, st.data_size - plan.nb))
        lw = lw[:, start - first:]
    return lw


def _assemble(outs: list, st: Structure, K: int, ks: list, data_plate: str) -> Estimate:
    """One :class:`Estimate` from the blocks' ``(WeightStats, psis)``."""
    if not outs:  # a shard with no blocks
        empty = np.zeros(0)
        return Estimate(empty, empty, {k: empty for k in ks}, empty, empty, K, st.per_datapoint,
                        st.summed(data_plate), st.scaled, empty, st.mode)
    stats = [o[0] for o in outs]
    log_marginal = torch.cat([o.log_marginal for o in stats]).cpu().numpy()
    elbo = torch.cat([o.elbo for o in stats]).cpu().numpy()
    iwae = {k: torch.cat([o.iwae[k] for o in stats]).cpu().numpy() for k in ks}
    khat = np.concatenate([o.khat for o in stats])
    ess = torch.cat([o.ess for o in stats]).cpu().numpy()
    psis = np.concatenate([o[1] for o in outs])
    return Estimate(log_marginal, elbo, iwae, khat, ess, K, st.per_datapoint,
                    st.summed(data_plate), st.scaled, psis, st.mode)
