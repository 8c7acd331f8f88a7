r"""In-painting (study 1, question 2): the posterior of missing pixels given all the others.

Notation: pixels :math:`x_1..x_T` in reading order, a set :math:`m` of missing positions,
:math:`o` the observed rest.  Every in-painter returns the same :class:`InpaintResult`.

**Exact, by enumeration** (autoregressive model, :math:`|m| \le 16`).  The joint of any full
image is exact, :math:`p(x) = \prod_t p(x_t \mid x_{<t})`, so for each of the :math:`2^{|m|}`
completions :math:`v`

.. math::

    p(x_m = v \mid x_o) = \frac{p(x_m = v, x_o)}{\sum_{v'} p(x_m = v', x_o)}, \qquad
    \log p(x_o) = \operatorname{logsumexp}_{v} \log p(x_m = v, x_o).

All completions of a batch of images go through the GRU as one batch (one pixel: 2 rows per
image, a 2×2 patch: 16).  The pixels before the first missing one are read once per image and
their state is shared by every completion (they do not depend on v).

**Importance sampling / SMC** (larger masks).  The proposal is the model's own conditionals at
the missing positions, read in order with the observed pixels fed in where they are:
:math:`q(x_m) = \prod_{t \in m} p(x_t \mid x_{<t})`.  Then

.. math::

    w = \frac{p(x_m, x_o)}{q(x_m)} = \prod_{t \in o} p(x_t \mid x_{<t}), \qquad
    E_q[w] = p(x_o),

the likelihood of the observed pixels *that follow* each sampled missing pixel (the observed
pixels before the first missing one contribute the same factor to every particle).  With
``smc=True`` the particles of an image are resampled (multinomial) whenever their effective
sample size drops below ``ess_threshold`` × K during the sweep; :math:`\log p(x_o)` is then the
sum of the log mean weights at each resampling and of the final population's.  Diagnostics
(IWAE at several k, ESS, Pareto k-hat) come from the shared estimator's ``weight_stats`` applied to the
final log weights.  The study's own proposal (fill the gap by greedy or sampled completion, score
the rest by cross-entropy, pick the best) is the unweighted special case; the weights above are
what makes it a consistent posterior.

**The VAE as a second in-painter.** The model :math:`p(z)\,\prod_{j \in o} p(x_j \mid z)` (the
missing pixels masked out of the Bernoulli likelihood with ``Distribution.mask``), importance
sampled through the shared estimator's ``log_weights`` with the VAE's encoder as proposal,
applied to the image with its missing pixels imputed (start at 0, then ``impute_iters`` rounds of
"encode, decode at the posterior mean, put the decoded probabilities in the gaps").  The imputed
encoder input only moves the proposal; the weights make the estimate consistent, and k-hat says
when it is not to be trusted.  Then :math:`p(x_j = 1 \mid x_o) \approx \sum_k \bar w_k\,
\sigma(f(z_k))_j` for missing j.

Shapes: images ``x`` ``(N, T)`` float 0/1; masks ``missing`` ``(T,)`` or ``(N, T)`` bool, True =
missing; every per-image output ``(N, ...)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from inference.importance import KHAT_PSIS, KHAT_RAW, log_weights, probe, weight_stats
from models.common import Bernoulli, GenlabError, bernoulli_log_prob, check_binary, data_plate

#: Enumeration limit: 2^16 completions per image.
MAX_EXACT = 16
SIDE = 28


# ----------------------------------------------------------------------------- masks
def pixel_mask(row: int, col: int, side: int = SIDE) -> torch.Tensor:
    """One missing pixel at (row, col), as a ``(side*side,)`` bool mask."""
    return block_mask(row, col, 1, 1, side)


def patch_mask(row: int, col: int, size: int = 2, side: int = SIDE) -> torch.Tensor:
    """A missing ``size`` × ``size`` patch with its top-left corner at (row, col)."""
    return block_mask(row, col, size, size, side)


def row_mask(row: int, side: int = SIDE) -> torch.Tensor:
    """One missing image row."""
    return block_mask(row, 0, 1, side, side)


def block_mask(row: int, col: int, height: int, width: int, side: int = SIDE) -> torch.Tensor:
    """A missing height × width block, top-left corner at (row, col)."""
    if not (0 <= row and 0 <= col and height >= 1 and width >= 1 and row + height <= side
            and col + width <= side):
        raise GenlabError(f"a {height}x{width} block at row {row}, column {col} does not fit in a "
                          f"{side}x{side} image")
    m = torch.zeros(side, side, dtype=torch.bool)
    m[row : row + height, col : col + width] = True
    return m.reshape(-1)


def random_mask(fraction: float, generator: Optional[torch.Generator] = None,
                side: int = SIDE) -> torch.Tensor:
    """Each pixel missing independently with probability ``fraction``."""
    if not 0 < fraction < 1:
        raise GenlabError(f"the missing fraction must lie in (0, 1), got {fraction}")
    return torch.rand(side * side, generator=generator) < fraction


def as_missing(missing, x: torch.Tensor) -> torch.Tensor:
    """The mask as bool ``(N, T)``; one clear message for a wrong shape or an empty/full mask."""
    n, T = x.shape
    missing = torch.as_tensor(missing)
    if missing.dtype != torch.bool:
        if not bool(((missing == 0) | (missing == 1)).all()):
            raise GenlabError("the mask must be boolean or 0/1 (1 = missing)")
        missing = missing.bool()
    if missing.shape == (T,):
        missing = missing.expand(n, T)
    elif missing.shape != (n, T):
        raise GenlabError(f"the mask must have shape ({T},) or ({n}, {T}) like the images, got "
                          f"{tuple(missing.shape)}")
    count = missing.sum(-1)
    if bool((count == 0).any()):
        raise GenlabError(f"the mask hides no pixel of image {int((count == 0).nonzero()[0])}; "
                          "there is nothing to in-paint")
    if bool((count == T).any()):
        raise GenlabError(f"the mask hides every pixel of image {int((count == T).nonzero()[0])}; "
                          "in-painting needs observed pixels (sample the model instead)")
    return missing.to(x.device)


def _check(x: torch.Tensor, T: int) -> torch.Tensor:
    if not torch.is_tensor(x) or x.dim() != 2 or x.shape[1] != T:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise GenlabError(f"images must be a (N, {T}) batch, got shape {shape}")
    check_binary(x)
    return x


# ----------------------------------------------------------------------------- results
@dataclass
class InpaintResult:
    """One in-painter's answer for N images (all tensors on the CPU).

    ``pixel_prob`` ``(N, T)``: p(x_j = 1 | x_o) at missing j, the observed value elsewhere;
    ``mode`` ``(N, T)``: the most probable completion found (``mode_kind`` says which sense);
    ``samples`` ``(S, N, T)``: posterior draws; ``log_marginal`` ``(N,)``: log p(x_o) (exact or
    estimated); ``ess``, ``khat`` ``(N,)`` (NaN for exact answers); ``iwae`` {k: ``(N,)``}.
    """

    method: str
    x: torch.Tensor
    missing: torch.Tensor
    pixel_prob: torch.Tensor
    mode: torch.Tensor
    mode_kind: str
    samples: torch.Tensor
    log_marginal: np.ndarray
    ess: np.ndarray
    khat: np.ndarray
    num_particles: int = 0
    iwae: dict = field(default_factory=dict)
    resamplings: Optional[np.ndarray] = None

    def take(self, idx) -> "InpaintResult":
        """The part of the result for the images ``idx`` (a slice or an index tensor)."""
        def cut(v, axis=0):
            if v is None:
                return None
            if not torch.is_tensor(v) and not isinstance(idx, slice):
                return v[np.asarray(idx)] if axis == 0 else v[:, np.asarray(idx)]
            return v[:, idx] if axis == 1 else v[idx]

        return InpaintResult(self.method, cut(self.x), cut(self.missing), cut(self.pixel_prob),
                             cut(self.mode), self.mode_kind, cut(self.samples, 1),
                             cut(self.log_marginal), cut(self.ess), cut(self.khat),
                             self.num_particles, {k: cut(v) for k, v in self.iwae.items()},
                             cut(self.resamplings))

    def scores(self, log_joint_truth: Optional[np.ndarray] = None) -> dict:
        """How well the posterior predicts the true missing pixels (means over images).

        ``ce``: cross-entropy of the per-pixel marginals against the truth, nats per missing
        pixel; ``acc``: the marginals' mode (p > 1/2) against the truth; ``mode_acc``: the
        most probable completion against the truth; with ``log_joint_truth`` = log p(x) of the
        true images, ``log_cond`` = log p(x_m = truth | x_o) = log p(x) - log p(x_o), nats per
        image.
        """
        m = self.missing
        p = self.pixel_prob.double().clamp(1e-12, 1 - 1e-12)
        t = self.x.double()
        ce = -(t * p.log() + (1 - t) * (1 - p).log())
        out = {"ce": float(ce[m].mean()), "acc": float(((p > 0.5).double() == t)[m].double().mean()),
               "mode_acc": float((self.mode.double() == t)[m].double().mean()),
               "missing_pixels": float(m.sum(-1).double().mean())}
        if log_joint_truth is not None:
            out["log_cond"] = float(np.mean(np.asarray(log_joint_truth) - self.log_marginal))
        if not np.all(np.isnan(self.ess)):
            out["ess"] = float(np.mean(self.ess))
            out["khat_gt_0.5"] = float(np.mean(self.khat > KHAT_RAW))
            out["khat_gt_0.7"] = float(np.mean(self.khat > KHAT_PSIS))
        return out


def _positions(missing: torch.Tensor) -> torch.Tensor:
    """Missing positions ``(N, m)`` in reading order; every image must miss the same count."""
    counts = missing.sum(-1)
    if bool((counts != counts[0]).any()):
        raise GenlabError("exact enumeration needs the same number of missing pixels in every "
                          f"image of the batch; got {int(counts.min())} to {int(counts.max())}")
    m = int(counts[0])
    return torch.sort(missing.long(), dim=-1, descending=True, stable=True).indices[:, :m].sort(-1).values


# ----------------------------------------------------------------------------- exact
@torch.no_grad()
def exact_inpaint(gru, x: torch.Tensor, missing, num_samples: int = 8,
                  memory: int = 1 << 28, generator: Optional[torch.Generator] = None
                  ) -> InpaintResult:
    """p(x_m | x_o) by enumerating all 2^m completions (m <= 16) in one batched pass."""
    T = gru.x_dim
    x = _check(x, T)
    miss = as_missing(missing, x)
    pos = _positions(miss)
    n, m = pos.shape
    if m > MAX_EXACT:
        raise GenlabError(f"exact enumeration is limited to {MAX_EXACT} missing pixels "
                          f"(2^{MAX_EXACT} completions); this mask hides {m}: use "
                          "importance_inpaint")
    V = 1 << m
    bits = ((torch.arange(V).unsqueeze(-1) >> torch.arange(m - 1, -1, -1)) & 1).to(x.dtype)  # (V, m)
    f = int(pos.min())
    # the shared prefix: pixels 0..f-1, read once per image
    logits_pre, h = gru.read(x[:, :f])
    lp_pre = _bern_lp(logits_pre[:, :f], x[:, :f]).sum(-1)  # (N,)
    # every completion of every image, rows image-major: (N*V, T)
    cand = x.unsqueeze(1).repeat(1, V, 1)
    cand.scatter_(2, pos.unsqueeze(1).expand(n, V, m), bits.unsqueeze(0).expand(n, V, m))
    cand = cand.reshape(n * V, T)
    h = h.repeat_interleave(V, 1)
    first = logits_pre[:, f].repeat_interleave(V)
    # memory: the GRU's outputs and activations, about 6 floats per hidden unit and step
    per_row = 6 * 4 * (T - f) * max(gru.hidden, max(gru.head_sizes, default=1))
    rows = max(1, int(memory // per_row))
    log_joint = torch.empty(n * V, dtype=torch.float64)
    for s in range(0, n * V, rows):
        c = cand[s : s + rows]
        lg = _run(gru, c[:, f : T - 1], h[:, s : s + rows].contiguous())
        lg = torch.cat([first[s : s + rows].unsqueeze(-1), lg], 1)
        lp = _bern_lp(lg, c[:, f:]).sum(-1)
        log_joint[s : s + rows] = lp.double()
    log_joint = log_joint.reshape(n, V) + lp_pre.double().unsqueeze(-1)
    log_obs = torch.logsumexp(log_joint, -1)
    post = torch.exp(log_joint - log_obs.unsqueeze(-1))  # (N, V)
    cand = cand.reshape(n, V, T)
    pixel_prob = x.clone().double()
    pixel_prob.scatter_(1, pos, post @ bits.double())
    mode = cand[torch.arange(n), post.argmax(-1)]
    draws = torch.multinomial(post.float(), num_samples, replacement=True, generator=generator)
    samples = cand[torch.arange(n).unsqueeze(-1), draws].transpose(0, 1)  # (S, N, T)
    nan = np.full(n, np.nan)
    return InpaintResult("exact", x.cpu(), miss.cpu(), pixel_prob.cpu(), mode.cpu(),
                         "the most probable completion (exact)", samples.cpu(),
                         log_obs.cpu().numpy(), nan, nan.copy(), V)


def _run(gru, inputs: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The GRU's logits after each of ``inputs`` ``(B, S)``; ``(B, 0)`` when S = 0 (the span
    ends at the image's last pixel, where an RNN refuses an empty sequence)."""
    if inputs.shape[1] == 0:
        return h.new_zeros(inputs.shape[0], 0)
    return gru.run(inputs, h)[0]


# ----------------------------------------------------------------------------- IS / SMC
def _bern_lp(logit: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return bernoulli_log_prob(logit, v.to(logit.dtype))


def _resample_rows(w: torch.Tensor, ess_threshold: float, generator) -> tuple:
    """SMC's multinomial resampling of the images whose ESS fell below ``ess_threshold * K``:
    (which images resample ``(N,)``, the new particle-major row of every particle, or None when
    none resamples).  ``w`` are the log weights since the last resampling, ``(K, N)``."""
    K, n = w.shape
    ess = torch.exp(2 * torch.logsumexp(w, 0) - torch.logsumexp(2 * w, 0))
    low = ess < ess_threshold * K
    if not bool(low.any()):
        return low, None
    probs = torch.softmax(w, 0).T.float()  # (N, K)
    idx = torch.multinomial(probs, K, replacement=True, generator=generator)  # (N, K)
    idx = torch.where(low.unsqueeze(-1), idx, torch.arange(K).expand(n, K))
    return low, (idx.T * n + torch.arange(n)).reshape(-1)  # particle k of image i <- idx[i,k]*N+i


def _tail_log_prob(gru, xs, h, logit, last: int, memory: int) -> torch.Tensor:
    """log p of the observed pixels after the last missing one, per particle row (float64),
    the GRU run in row chunks of about ``memory`` bytes of activations."""
    T = gru.x_dim
    per_row = 6 * 4 * (T - last) * max(gru.hidden, max(gru.head_sizes, default=1))
    rows = max(1, int(memory // per_row))
    tail = torch.empty(xs.shape[0], dtype=torch.float64)
    for s in range(0, xs.shape[0], rows):
        lg = _run(gru, xs[s : s + rows, last + 1 : T - 1], h[:, s : s + rows].contiguous())
        lg = torch.cat([logit[s : s + rows].unsqueeze(-1), lg], 1)
        tail[s : s + rows] = _bern_lp(lg, xs[s : s + rows, last + 1 :]).sum(-1).double()
    return tail


@torch.no_grad()
def importance_inpaint(gru, x: torch.Tensor, missing, num_particles: int = 500, smc: bool = False,
                       ess_threshold: float = 0.5, ks: Sequence[int] = (1, 10),
                       num_samples: int = 8, memory: int = 1 << 28,
                       generator: Optional[torch.Generator] = None) -> InpaintResult:
    """p(x_m | x_o) by importance sampling (``smc=False``) or SMC with the model's conditionals
    as the proposal (module docstring); K = ``num_particles`` per image.  The pass over the
    observed pixels after the last missing one is cut into row chunks of about ``memory``
    bytes of GRU activations; the sweep over the missing span holds K × N rows at once."""
    T = gru.x_dim
    x = _check(x, T)
    miss = as_missing(missing, x)
    K = int(num_particles)
    if K < 1:
        raise GenlabError(f"the number of particles must be at least 1, got {num_particles}")
    if not 0 < ess_threshold <= 1:
        raise GenlabError(f"the ESS threshold must lie in (0, 1], got {ess_threshold}")
    n = x.shape[0]
    cols = miss.any(0).nonzero().squeeze(-1)
    f, last = int(cols.min()), int(cols.max())
    logits_pre, h = gru.read(x[:, :f])
    logit = logits_pre[:, f].repeat(K)  # particle-major rows: k * N + i
    h = h.repeat(1, K, 1)
    xs = x.repeat(K, 1).clone()
    miss_r = miss.repeat(K, 1)
    lw = torch.zeros(K * n, dtype=torch.float64)  # log weight since the last resampling
    lq = torch.zeros(K * n, dtype=torch.float64)  # log q of the particle's missing pixels
    lo = torch.zeros(K * n, dtype=torch.float64)  # log p of its observed pixels (after f)
    log_norm = torch.zeros(n, dtype=torch.float64)
    resamplings = torch.zeros(n, dtype=torch.long)
    ar = torch.arange(n)
    for t in range(f, last + 1):
        mt = miss_r[:, t]
        draw = torch.bernoulli(torch.sigmoid(logit), generator=generator).to(x.dtype)
        xs[:, t] = torch.where(mt, draw, xs[:, t])
        lp = _bern_lp(logit, xs[:, t]).double()
        lq += torch.where(mt, lp, torch.zeros_like(lp))
        obs_lp = torch.where(mt, torch.zeros_like(lp), lp)
        lw += obs_lp
        lo += obs_lp
        if smc and t < last and bool((~mt).any()):
            low, rows = _resample_rows(lw.reshape(K, n), ess_threshold, generator)
            if rows is not None:
                w = lw.reshape(K, n)
                log_norm += torch.where(low, torch.logsumexp(w, 0) - math.log(K), 0.0)
                resamplings += low.long()
                xs, h, lq, lo = xs[rows], h[:, rows], lq[rows], lo[rows]
                lw = torch.where(low.repeat(K), torch.zeros_like(lw), lw[rows])
        if t < T - 1:
            logit, h = gru.step(xs[:, t], h)
    if last < T - 1:  # the observed pixels after the last missing one
        tail = _tail_log_prob(gru, xs, h, logit, last, memory)
        lw += tail
        lo += tail
    lw_k = lw.reshape(K, n)
    ks = sorted({int(k) for k in ks if 1 <= int(k) <= K} | {K})
    log_marginal, _, iwae, khat, ess = weight_stats(lw_k, ks)
    wbar = torch.softmax(lw_k, 0)  # (K, N)
    xs_k = xs.reshape(K, n, T)
    pixel_prob = (wbar.unsqueeze(-1) * xs_k.double()).sum(0)
    pixel_prob = torch.where(miss, pixel_prob, x.double())
    log_joint = (lq + lo).reshape(K, n)  # log p(x_m, x_o) up to the shared prefix term
    mode = xs_k[log_joint.argmax(0), ar]
    draws = torch.multinomial(wbar.T.float(), num_samples, replacement=True, generator=generator)
    samples = xs_k[draws, ar.unsqueeze(-1)].transpose(0, 1)  # (S, N, T)
    lp_pre = _bern_lp(logits_pre[:, :f], x[:, :f]).sum(-1).double()
    total = (log_marginal + log_norm + lp_pre).numpy()
    name = "SMC" if smc else "IS"
    return InpaintResult(name, x.cpu(), miss.cpu(), pixel_prob.cpu(), mode.cpu(),
                         f"the most probable of the {K} particles", samples.cpu(), total,
                         ess.numpy(), khat, K, {k: (v + log_norm + lp_pre).numpy()
                                                for k, v in iwae.items()},
                         resamplings.numpy() if smc else None)


# ----------------------------------------------------------------------------- the VAE
class MaskedVAE:
    """The VAE's model with the missing pixels masked out of the likelihood, and its encoder
    on the imputed image as the guide (module docstring).  ``observed`` ``(N, T)`` bool."""

    def __init__(self, vae, impute_iters: int = 5):
        self.vae, self.impute_iters = vae, int(impute_iters)
        self.draws = None  # the guide's last z, (K, N, d) under the particles plate

    @torch.no_grad()
    def impute(self, x: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """The encoder's input: observed pixels, and decoded probabilities in the gaps."""
        xf = torch.where(observed, x, torch.zeros_like(x))
        for _ in range(self.impute_iters):
            p = torch.sigmoid(self.vae.decode(self.vae.encode(xf)[0]))
            xf = torch.where(observed, x, p)
        return xf

    def model(self, x, observed, data_size=None):
        pyro.module("decoder", self.vae.decoder)
        n, d = x.shape[0], self.vae.latent_dim
        with data_plate(n, data_size):
            z = pyro.sample("z", dist.Normal(x.new_zeros(n, d), x.new_ones(n, d)).to_event(1))
            logits = self.vae.decode(z)
            pyro.sample("x", Bernoulli(logits=logits, validate_args=False)
                        .mask(observed).to_event(1), obs=x)

    def guide(self, x, observed, data_size=None):
        pyro.module("encoder", self.vae.encoder)
        with data_plate(x.shape[0], data_size):
            loc, scale = self.vae.encode(self.impute(x, observed))
            self.draws = pyro.sample("z", dist.Normal(loc, scale).to_event(1))


@torch.no_grad()
def vae_inpaint(vae, x: torch.Tensor, missing, num_particles: int = 500, ks: Sequence[int] = (1, 10),
                num_samples: int = 8, impute_iters: int = 5,
                generator: Optional[torch.Generator] = None) -> InpaintResult:
    """p(x_m | x_o) under the VAE by importance sampling over z (module docstring)."""
    T = vae.x_dim
    x = _check(x, T)
    miss = as_missing(missing, x)
    K = int(num_particles)
    if K < 1:
        raise GenlabError(f"the number of particles must be at least 1, got {num_particles}")
    pair = MaskedVAE(vae, impute_iters)
    args = (x, ~miss)
    structure = probe(pair.model, pair.guide, args, {}, "data", x.shape[0])
    lw = log_weights(pair.model, pair.guide, args, {}, K, structure).double()  # (K, N)
    z = pair.draws  # (K, N, d)
    ks = sorted({int(k) for k in ks if 1 <= int(k) <= K} | {K})
    log_marginal, _, iwae, khat, ess = weight_stats(lw, ks)
    wbar = torch.softmax(lw, 0)
    probs = torch.sigmoid(vae.decode(z)).double()  # (K, N, T)
    pixel_prob = torch.where(miss, (wbar.unsqueeze(-1) * probs).sum(0), x.double())
    mode = torch.where(miss, (pixel_prob > 0.5).to(x.dtype), x)
    n = x.shape[0]
    draws = torch.multinomial(wbar.T.float(), num_samples, replacement=True, generator=generator)
    p_draw = probs[draws, torch.arange(n).unsqueeze(-1)].transpose(0, 1)  # (S, N, T)
    pix = torch.bernoulli(p_draw.float(), generator=generator)
    samples = torch.where(miss, pix, x)
    return InpaintResult("VAE", x.cpu(), miss.cpu(), pixel_prob.cpu(), mode.cpu(),
                         "the mode of each pixel's marginal (p > 1/2)", samples.cpu(),
                         log_marginal.numpy(), ess.numpy(), khat, K,
                         {k: v.numpy() for k, v in iwae.items()})
