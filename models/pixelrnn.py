r"""The autoregressive pixel GRU (study 1, question 1): an exact-likelihood image model.

An image :math:`x \in \{0,1\}^{T}` (T = 784, read row by row) factorizes exactly as

.. math::

    p_\theta(x) = \prod_{t=1}^{T} p_\theta(x_t \mid x_{<t}), \qquad
    p_\theta(x_t = 1 \mid x_{<t}) = \sigma(\ell_t), \qquad
    \ell_t = f_\theta(h_t), \quad h_t = \mathrm{GRU}(h_{t-1}, x_{t-1}),

with :math:`h_0 = 0` and the start input :math:`x_0 = 0`, so :math:`p(x_1)` is a learned
constant; :math:`f_\theta` = ReLU → FC(64) → ReLU → FC(1) (the study's head).  Input pixel
:math:`x_{t-1}` → GRU(H) → ReLU → FC(64) → ReLU → FC(1) gives the logit of pixel :math:`t`.

Training is teacher forcing, vectorized: the inputs are the image shifted right by one
(:math:`x_0, \dots, x_{T-1}`), one ``nn.GRU`` call gives every :math:`h_t`, and the 784 pixels
are one Bernoulli observation ``to_event(1)`` under the data plate.  The guide is empty (no
latent variables), so SVI maximizes the likelihood and the shared importance-weighted estimator
returns :math:`\log p_\theta(x)` exactly, for every K (every weight is the same number).

Exact conditionals the same network gives, used for completion and in-painting
(``evaluation.inpainting``):

* :meth:`PixelGRU.read` — the state :math:`h_t` after reading a prefix, and its logits;
* :meth:`PixelGRU.step` — one autoregressive step from a state and an input pixel;
* :meth:`PixelGRU.complete` — :math:`x_{s+1..s+n}` generated from :math:`x_{1..s}`, feeding the
  model's own outputs back: greedy (most probable pixel) or sampled; the cross-entropy of the
  truth under the model along that path and the accuracy of the path (:func:`completion_scores`).

Shapes: ``x`` is ``(N, 784)`` float 0/1; logits ``(N, 784)``; the state ``h`` is ``(1, N, H)``
(``nn.GRU``'s layout); the site ``"x"`` has batch shape ``(N,)``, event shape ``(784,)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import pyro
import torch
from torch import nn
from torch.nn import functional as F

from models.common import (
    Bernoulli,
    GenlabError,
    bernoulli_log_prob,
    check_binary,
    config_defaults,
    data_plate,
    mlp,
    option,
)


@dataclass
class PixelRNNConfig:
    """The pixel GRU's architecture; the defaults are the study's GRU(32) with a 64-unit head."""

    hidden: int = option(32, "GRU state size H")
    head: list[int] = option([64], "hidden sizes of the output MLP")


#: The study's architecture.
STUDY = config_defaults(PixelRNNConfig)
COMPLETION_MODES = ("greedy", "sample")


class PixelGRU(nn.Module):
    """The pixel GRU as an explicit Pyro model with an empty guide (maximum likelihood)."""

    def __init__(self, x_dim: int = 784, hidden: int = 32, head: Sequence[int] = (64,)):
        super().__init__()
        if int(hidden) < 1 or int(x_dim) < 2:
            raise GenlabError(f"the GRU needs at least 1 hidden unit and 2 pixels, got hidden={hidden}, "
                              f"pixels={x_dim}")
        self.x_dim, self.hidden = int(x_dim), int(hidden)
        self.head_sizes = tuple(int(h) for h in head)
        self.rnn = nn.GRU(1, self.hidden, batch_first=True)
        self.head = nn.Sequential(nn.ReLU(), mlp((self.hidden, *self.head_sizes, 1), "relu"))

    # ------------------------------------------------------------------ checks
    def check_images(self, x: torch.Tensor, what: str = "images") -> torch.Tensor:
        if not torch.is_tensor(x) or x.dim() != 2 or x.shape[-1] != self.x_dim:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise GenlabError(f"{what} must be a (N, {self.x_dim}) batch, got shape {shape}")
        check_binary(x, what)
        return x

    # ------------------------------------------------------------------ the network
    def _dtype(self):
        return self.rnn.weight_ih_l0.dtype

    def run(self, inputs: torch.Tensor, h: Optional[torch.Tensor] = None):
        """Read input pixels ``(B, S)`` from state ``h`` ``(1, B, H)`` (zeros when None).

        Returns (logits ``(B, S)`` of the pixel *after* each input, final state ``(1, B, H)``).
        """
        out, h = self.rnn(inputs.to(self._dtype()).unsqueeze(-1), h)
        return self.head(out).squeeze(-1), h

    def shifted(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher-forcing inputs ``(N, T)``: the start input 0, then x_1..x_{T-1}."""
        return torch.cat([x.new_zeros(x.shape[0], 1), x[:, :-1]], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, T)`` of p(x_t = 1 | x_<t) for every t, by teacher forcing."""
        return self.run(self.shifted(x))[0]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x), ``(N,)``, nats per image."""
        x = self.check_images(x)
        logits = self.forward(x)
        return bernoulli_log_prob(logits, x.to(logits.dtype)).sum(-1)

    def read(self, prefix: torch.Tensor):
        """State after reading pixels ``x_1..x_s`` (``prefix`` ``(N, s)``, s >= 0).

        Returns (logits ``(N, s + 1)`` of pixels 1..s+1, state h_{s+1} ``(1, N, H)``), where
        ``logits[:, -1]`` is the logit of p(x_{s+1} | x_{1..s}) and the state has consumed the
        start input and all s pixels.
        """
        n = prefix.shape[0]
        return self.run(torch.cat([prefix.new_zeros(n, 1), prefix], 1))

    def step(self, pixel: torch.Tensor, h: torch.Tensor):
        """One step: input pixel ``(B,)`` and state ``(1, B, H)`` -> (logit ``(B,)``, new state)."""
        logits, h = self.run(pixel.unsqueeze(-1), h)
        return logits[:, 0], h

    # ------------------------------------------------------------------ the Pyro pair
    def model(self, x: torch.Tensor, data_size: Optional[int] = None):
        """x ~ prod_t Bernoulli(sigmoid(l_t(x_<t))), one ``to_event(1)`` site per image."""
        pyro.module("pixelrnn", self)
        x = self.check_images(x)
        logits = self.forward(x)
        self._last = (x, logits.detach())  # step_metrics reads this pass instead of a second one
        with data_plate(x.shape[0], data_size):
            pyro.sample("x", Bernoulli(logits=logits, validate_args=False).to_event(1),
                        obs=x.to(logits.dtype))

    def guide(self, x: torch.Tensor, data_size: Optional[int] = None):
        """Empty: no latent variables, so SVI maximizes the likelihood."""

    def step_metrics(self, x: torch.Tensor) -> dict:
        """Per-pixel cross-entropy (nats) and next-pixel accuracy on the batch.

        The runner calls this after the step's update; the logits are those of the step's own
        forward pass (parameters before the update, like the objective column), which saves a
        second 784-step pass.  On any other batch the logits are computed afresh.
        """
        last = getattr(self, "_last", None)
        logits = last[1] if last is not None and last[0] is x else self.forward(x)
        ce = F.binary_cross_entropy_with_logits(logits, x.to(logits.dtype))
        acc = ((logits > 0).to(x.dtype) == x).double().mean()
        return {"pixel_ce": float(ce), "pixel_acc": float(acc)}

    # ------------------------------------------------------------------ completion
    @torch.no_grad()
    def complete(self, x: torch.Tensor, start: int, steps: int, mode: str = "greedy",
                 samples: int = 1, generator: Optional[torch.Generator] = None):
        """Generate pixels start+1 .. start+steps from the true pixels 1..start.

        ``x`` ``(N, T)`` (only its first ``start`` pixels are read).  Each generated pixel is
        fed back as the next input: greedy takes the most probable value (ties -> 1 when
        p = 1/2 exactly, never in practice), sample draws it.  Returns
        (``pixels`` ``(S, N, steps)``, ``logits`` ``(S, N, steps)``): ``logits[..., i]`` is the
        model's logit of pixel start+1+i given the true prefix and its own pixels before it.
        S = ``samples`` (1 for greedy, whose path is deterministic).
        """
        x = self.check_images(x)
        check_horizon(start, steps, self.x_dim)
        if mode not in COMPLETION_MODES:
            raise GenlabError(f"unknown completion mode {mode!r}; choose greedy or sample")
        if int(samples) < 1:
            raise GenlabError(f"the number of samples must be at least 1, got {samples}")
        S = 1 if mode == "greedy" else int(samples)
        n = x.shape[0]
        logits0, h = self.read(x[:, :start])
        logit = logits0[:, -1].repeat(S)  # (S*N,), sample-major
        h = h.repeat(1, S, 1)
        pixels, all_logits = [], []
        for i in range(steps):
            all_logits.append(logit)
            if mode == "greedy":
                pix = (logit >= 0).to(x.dtype)
            else:
                pix = torch.bernoulli(torch.sigmoid(logit), generator=generator).to(x.dtype)
            pixels.append(pix)
            if i + 1 < steps:
                logit, h = self.step(pix, h)
        return (torch.stack(pixels, -1).reshape(S, n, steps),
                torch.stack(all_logits, -1).reshape(S, n, steps))


def check_horizon(start: int, steps: int, x_dim: int = 784) -> None:
    """One clear message for a completion that does not fit in the image."""
    if int(start) != start or int(steps) != steps:
        raise GenlabError(f"the prefix length and the horizon must be integers, got {start} and {steps}")
    if not 0 <= start < x_dim:
        raise GenlabError(f"the prefix must hold 0..{x_dim - 1} pixels, got {start}")
    if steps < 1:
        raise GenlabError(f"the horizon must be at least 1 pixel, got {steps}")
    if start + steps > x_dim:
        raise GenlabError(f"a horizon of {steps} pixels after pixel {start} runs past the image's "
                          f"{x_dim} pixels (at most {x_dim - start})")


def completion_scores(x: torch.Tensor, start: int, pixels: torch.Tensor, logits: torch.Tensor,
                      horizons: Sequence[int]) -> dict:
    """Cross-entropy (nats per predicted pixel) and accuracy per horizon.

    For horizon n: the mean over images, samples and the first n generated pixels of
    -log p(x_t = truth | true prefix, generated x_{start+1..t-1}) and of [generated x_t = truth].
    Returns ``{n: {"ce": float, "acc": float}}``.
    """
    steps = pixels.shape[-1]
    truth = x[:, start : start + steps].unsqueeze(0).expand_as(pixels).to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, truth, reduction="none")
    hit = (pixels.to(truth.dtype) == truth).double()
    out = {}
    for n in horizons:
        if n > steps:
            raise GenlabError(f"horizon {n} exceeds the {steps} generated pixels")
        out[int(n)] = {"ce": float(ce[..., :n].mean()), "acc": float(hit[..., :n].mean())}
    return out


def pixelrnn_args(hidden: Optional[int] = None, head: Optional[Sequence[int]] = None) -> dict:
    """The full architecture: the study's defaults, then explicit arguments (not None)."""
    args = dict(STUDY)
    if hidden is not None:
        args["hidden"] = int(hidden)
    if head is not None:
        args["head"] = [int(h) for h in head]
    return args


def build_pixelrnn(**kwargs) -> PixelGRU:
    return PixelGRU(**pixelrnn_args(**kwargs))
