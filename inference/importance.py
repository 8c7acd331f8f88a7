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
model plate.  Otherwise (a global latent, or data observed under another plate) the weight is
one joint weight per particle, ``(K,)``, and the result holds a single value; ``summed`` says
which sites were summed into it.

Pyro stores log-probabilities multiplied by subsampling and ``poutine.scale`` factors.  A
factor s inside :math:`\log \sum_k \exp(s \log w_k)` changes the answer, so this estimator never
uses them: it calls each site's ``fn.log_prob`` itself (applying masks, which are part of the
model) and ignores ``scale``.  Guides with enumerated sites are refused.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample
from tqdm import tqdm

from models.common import GenlabError

#: Default memory budget of one estimator call, bytes.
DEFAULT_MEMORY = 1 << 30
#: Bytes of hidden activations etc. assumed per byte of site values and parameters.
_OVERHEAD = 3


def _import_arviz():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


# ----------------------------------------------------------------------------- tracing
def _traces(model, guide, args, kwargs, particles: Optional[int] = None, dim: int = -2):
    """(model trace, guide trace), the model replayed against the guide's draws."""

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
            if s["type"] == "sample" and not site_is_subsample(s)]


def _data_frame(site, data_plate: str):
    return next((f for f in site["cond_indep_stack"] if f.name == data_plate), None)


@dataclass
class Structure:
    """What a probe run of the model and guide showed about their sites."""

    max_plate_nesting: int
    per_datapoint: bool
    outside: list = field(default_factory=list)
    scaled: list = field(default_factory=list)
    bytes_per_unit: float = 0.0  # per datapoint (per-datapoint mode) or per call (joint)
    data_size: Optional[int] = None  # the data plate's full size N (its subsample may be smaller)

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


def probe(model, guide, args, kwargs, data_plate: str = "data", n_data: Optional[int] = None):
    """Run guide and model once (no particles) and check they can be importance-weighted."""
    with torch.no_grad():
        model_tr, guide_tr = _traces(model, guide, args, kwargs)
    nest, outside, scaled, nbytes, full = 0, [], [], 0, None
    guide_names = set()
    for name, site in _sample_sites(guide_tr):
        guide_names.add(name)
        if site["infer"].get("enumerate"):
            raise GenlabError(
                f"guide site {name!r} is enumerated; the importance-weighted estimator needs every "
                "guide site sampled (enumerated sites cannot be weighted correctly)"
            )
        if site["is_observed"]:
            raise GenlabError(f"guide site {name!r} is observed; guides may only sample latents")
    for name, site in _sample_sites(model_tr):
        if not site["is_observed"] and name not in guide_names:
            raise GenlabError(
                f"model site {name!r} is latent but the guide does not sample it; the importance "
                "weights need a proposal for every latent site"
            )
    model_names = {n for n, _ in _sample_sites(model_tr)}
    for name in guide_names - model_names:
        raise GenlabError(f"guide site {name!r} has no counterpart in the model")
    for tr in (model_tr, guide_tr):
        for name, site in _sample_sites(tr):
            nest = max(nest, len(site["fn"].batch_shape))
            nest = max(nest, *[-f.dim for f in site["cond_indep_stack"] if f.vectorized], 0)
            frame = _data_frame(site, data_plate)
            if frame is None:
                if name not in outside:
                    outside.append(name)
            elif n_data is not None and frame.size != n_data and frame.subsample_size != n_data:
                if name not in outside:
                    outside.append(name)
            if site["scale"] is not None and not (
                isinstance(site["scale"], (int, float)) and site["scale"] == 1.0
            ):
                scaled.append(name)
            nbytes += site["value"].numel() * site["value"].element_size()
            nbytes += _dist_bytes(site["fn"])
    # the plate's full size N: its subsample site's distribution knows it (frames hold B only)
    sub = model_tr.nodes.get(data_plate)
    if sub is not None and site_is_subsample(sub):
        full = int(sub["fn"].size)
    per = not outside
    unit = nbytes / n_data if (per and n_data) else nbytes
    return Structure(nest, per, outside, sorted(set(scaled)), unit, full)


def log_weights(
    model, guide, args, kwargs, num_particles: int, structure: Structure, data_plate: str = "data"
) -> torch.Tensor:
    """Unscaled log importance weights, ``(K, N)`` per datapoint or ``(K,)`` joint.

    Differentiable when called with gradients enabled (the runner's IWAE loss uses it).
    """
    nest = structure.max_plate_nesting
    pdim = -(nest + 1)
    # the probe already ran with validation; skipping it here saves a third of the time
    with pyro.validation_enabled(False):
        model_tr, guide_tr = _traces(model, guide, args, kwargs, num_particles, pdim)
    total = 0.0
    for tr, sign in ((model_tr, 1.0), (guide_tr, -1.0)):
        for name, site in _sample_sites(tr):
            with pyro.validation_enabled(False):
                lp = site["fn"].log_prob(site["value"])
            if site["mask"] is not None:
                lp = scale_and_mask(lp, mask=site["mask"])
            if lp.dim() > nest + 1:
                raise GenlabError(f"site {name!r} has more batch dims than the plates declare")
            lp = lp.reshape((1,) * (nest + 1 - lp.dim()) + tuple(lp.shape))
            keep = [0]
            if structure.per_datapoint:
                frame = _data_frame(site, data_plate)
                if frame is None:
                    raise GenlabError(
                        f"site {name!r} lies outside plate {data_plate!r}; per-datapoint "
                        "importance weights need every sample site inside it"
                    )
                keep.append(nest + 1 + frame.dim)
            other = [d for d in range(lp.dim()) if d not in keep]
            if other:
                lp = lp.sum(other)
            total = total + sign * lp
    if not torch.is_tensor(total):
        raise GenlabError("the model and guide have no sample sites to weight")
    return total.expand(num_particles, *total.shape[1:]) if total.shape[0] == 1 else total


# ----------------------------------------------------------------------------- statistics
def _khat(lw: np.ndarray) -> np.ndarray:
    """Pareto k-hat per row of ``lw`` ``(n, K)``; rows of (numerically) equal weights get -1."""
    az = _import_arviz()
    spread = lw.max(axis=1) - lw.min(axis=1)
    flat = spread <= 1e-5 * np.maximum(1.0, np.abs(lw).max(axis=1))
    out = np.full(lw.shape[0], -1.0)
    if (~flat).any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, k = az.psislw(lw[~flat])
        out[~flat] = np.asarray(k, dtype=float)
    return out


class WeightStats(NamedTuple):
    """Per-datapoint statistics of float64 log weights ``(K, n)`` (tensors except ``khat``)."""

    log_marginal: torch.Tensor  # IWAE at K: log-mean-exp of all K weights, (n,)
    elbo: torch.Tensor  # mean log weight, (n,)
    iwae: dict  # k -> (n,) mean over K // k groups of log-mean-exp of k weights
    khat: np.ndarray  # Pareto k-hat, (n,); -1 where all weights are equal
    ess: torch.Tensor  # effective sample size, (n,)


def weight_stats(lw: torch.Tensor, ks: Sequence[int]) -> WeightStats:
    """From float64 log weights ``(K, n)``: IWAE at K, ELBO, IWAE at each k, k-hat, ESS."""
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
    khat = _khat(lw_np)
    flat = khat == -1.0
    ess[torch.from_numpy(flat).to(ess.device)] = float(K)
    return WeightStats(log_marginal, elbo, iwae, khat, ess)


@dataclass
class Estimate:
    """Per-datapoint (or one joint) importance-sampling results, all in nats."""

    log_marginal: np.ndarray
    elbo: np.ndarray
    iwae: dict
    khat: np.ndarray
    ess: np.ndarray
    num_samples: int
    per_datapoint: bool
    summed: str
    scaled_sites: list

    @property
    def n(self) -> int:
        return int(self.log_marginal.shape[0])

    def summary(self) -> dict:
        """Means with standard errors across datapoints, and the k-hat summary."""

        def ms(a):
            a = np.asarray(a, dtype=float)
            se = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else float("nan")
            return {"mean": float(a.mean()), "se": se}

        return {
            "n": self.n,
            "num_samples": self.num_samples,
            "elbo": ms(self.elbo),
            "iwae": {int(k): ms(v) for k, v in sorted(self.iwae.items())},
            "gap": ms(self.log_marginal - self.elbo),
            "khat_gt_0.7": float(np.mean(self.khat > 0.7)),
            "ess_mean": float(np.mean(self.ess)),
            "per_datapoint": self.per_datapoint,
            "summed": self.summed,
        }

    def save(self, path) -> None:
        """Per-datapoint values as ``.npz`` (``iwae_<k>`` arrays), written atomically."""

        arrays = dict(log_marginal=self.log_marginal, elbo=self.elbo, khat=self.khat,
                      ess=self.ess, num_samples=np.array(self.num_samples))
        arrays.update({f"iwae_{k}": v for k, v in self.iwae.items()})
        tmp = f"{path}.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)


def _leading(args, n: int):
    return [i for i, a in enumerate(args) if torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == n]


def estimate_log_marginal(
    model,
    guide,
    *args,
    num_samples: int = 1000,
    ks: Sequence[int] = (),
    data_plate: str = "data",
    memory: int = DEFAULT_MEMORY,
    progress: bool = False,
    **kwargs,
) -> Estimate:
    """The IWAE estimate of log p(x), the ELBO, IWAE at each k, k-hat and ESS.

    ``args``/``kwargs`` are the model's and guide's arguments.  Positional tensor arguments are
    the data: when they share a first dimension N that the data plate follows, they are cut
    into chunks of datapoints (pass parameters such as a prior's concentration as keywords,
    which are never cut), and the K particles
    into chunks, so that one chunk's values take about ``memory`` bytes at most.  Log-sum-exp
    is taken in float64 over all K draws of each datapoint.
    """
    K = int(num_samples)
    if K < 1:
        raise GenlabError(f"the number of importance samples must be at least 1, got {num_samples}")
    ks = sorted({int(k) for k in ks} | {K})
    if ks[0] < 1 or ks[-1] > K:
        raise GenlabError(f"every k must lie in 1..{K} (the number of samples), got {ks}")

    lead_n = {a.shape[0] for a in args if torch.is_tensor(a) and a.dim() > 0}
    n_all = lead_n.pop() if len(lead_n) == 1 else None
    probe_n = min(2, n_all) if n_all else None
    if probe_n:
        idx = _leading(args, n_all)
        probe_args = tuple(a[:probe_n] if i in idx else a for i, a in enumerate(args))
        st = probe(model, guide, probe_args, kwargs, data_plate, probe_n)
    else:
        st = probe(model, guide, args, kwargs, data_plate, None)
    if not st.per_datapoint and probe_n:
        # the plate did not follow the data's first dimension: re-probe on everything, jointly
        st = probe(model, guide, args, kwargs, data_plate, None)
        st.per_datapoint = False

    per = st.per_datapoint
    # datapoints are cut into chunks only when the data's size is known from the arguments
    split = per and n_all is not None
    unit = max(st.bytes_per_unit * _OVERHEAD, 1.0)
    cells = max(1, int(memory // unit))
    kb = min(K, cells)
    nb = min(n_all, max(1, cells // kb), max(1, int(memory // (8 * 4 * K)))) if split else 1
    chunks = range(0, n_all, nb) if split else [0]

    outs = []
    bar = tqdm(total=len(chunks), desc=f"IWAE K={K}", unit="chunk", leave=False,
               disable=None if progress else True)
    with torch.no_grad():
        for start in chunks:
            if split:
                idx = _leading(args, n_all)
                cargs = tuple(a[start : start + nb] if i in idx else a for i, a in enumerate(args))
            else:
                cargs = args
            parts = []
            for k0 in range(0, K, kb):
                lw = log_weights(model, guide, cargs, kwargs, min(kb, K - k0), st, data_plate)
                parts.append(lw.double().reshape(lw.shape[0], -1))
            outs.append(weight_stats(torch.cat(parts, 0), ks))
            bar.update(1)
    bar.close()
    log_marginal = torch.cat([o.log_marginal for o in outs]).cpu().numpy()
    elbo = torch.cat([o.elbo for o in outs]).cpu().numpy()
    iwae = {k: torch.cat([o.iwae[k] for o in outs]).cpu().numpy() for k in ks}
    khat = np.concatenate([o.khat for o in outs])
    ess = torch.cat([o.ess for o in outs]).cpu().numpy()
    return Estimate(log_marginal, elbo, iwae, khat, ess, K, per, st.summed(data_plate), st.scaled)
