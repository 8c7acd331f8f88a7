"""What every system shares: the user-error type, the data plate and the MLP block."""

from __future__ import annotations

import copy
from dataclasses import MISSING, field, fields
from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F


def option(default=None, help: str = "", choices: Optional[Sequence] = None, parse=None):
    """A field of a config dataclass: its default and its one-line help.

    Config dataclasses (``VAEConfig``, ``ImageData``, ``RunConfig``, ...) are the one source of
    every default: the command-line flags, their help (with "(default X)" appended) and the
    recorded ``config.json`` are all generated from them.  List defaults are (deep-)copied per use.
    ``parse`` overrides the flag's parser, which otherwise follows the field's type.
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None, "parse": parse}
    if isinstance(default, list):  # a fresh (deep) copy per use: lists may nest
        frozen = copy.deepcopy(default)
        return field(default_factory=lambda: copy.deepcopy(frozen), metadata=meta)
    return field(default=default, metadata=meta)


def config_defaults(cls) -> dict:
    """Every field of a config dataclass with its default, in declaration order."""
    out = {}
    for f in fields(cls):
        out[f.name] = f.default_factory() if f.default_factory is not MISSING else f.default
    return out


def fill_defaults(cls, given: dict) -> dict:
    """``given`` with every None or missing field of ``cls`` replaced by its default."""
    d = config_defaults(cls)
    return {k: (d[k] if given.get(k) is None else given[k]) for k in d}


class GenlabError(Exception):
    """A user mistake (bad argument, bad file, wrong checkpoint).

    The command lines catch it and print its message as one line on stderr, exit code 2.
    """

    exit_code = 2


def data_plate(batch_size: int, data_size: Optional[int] = None, dim: int = -1):
    """The ``pyro.plate("data")`` every system puts its datapoints under.

    With ``data_size`` (the full training-set size N) larger than the batch B, the plate is a
    subsampling plate: Pyro scales every log-probability inside it by N / B, which keeps the
    mini-batch objective an unbiased estimate of the full-data one while sites outside the
    plate (global latents) stay unscaled.  Evaluation calls with ``data_size=None``: no scale.
    """
    if data_size is None or data_size == batch_size:
        return pyro.plate("data", batch_size, dim=dim)
    if data_size < batch_size:
        raise GenlabError(f"data_size {data_size} is smaller than the batch {batch_size}")
    return pyro.plate("data", size=data_size, subsample=torch.arange(batch_size), dim=dim)


_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU}


def mlp(sizes: Sequence[int], activation: str = "relu") -> nn.Sequential:
    """Fully connected layers ``sizes[0] -> ... -> sizes[-1]``, nonlinearity between them."""
    if activation not in _ACTIVATIONS:
        raise GenlabError(
            f"unknown activation {activation!r}; choose one of {', '.join(_ACTIVATIONS)}"
        )
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise GenlabError(f"layer sizes must be at least two positive integers, got {list(sizes)}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(int(a), int(b)))
        if i < len(sizes) - 2:
            layers.append(_ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def preset_args(cls, presets: dict, preset: Optional[str], given: dict, what: str) -> dict:
    """A model's full architecture from its config dataclass ``cls``: the defaults, then the
    named preset ``presets[preset]``, then the ``given`` arguments that are not None (the
    ``preset`` field itself left out)."""
    args = fill_defaults(cls, {})
    args.pop("preset", None)
    if preset is not None:
        if preset not in presets:
            raise GenlabError(f"unknown {what} preset {preset!r}; choose one of {', '.join(presets)}")
        args.update(presets[preset])
    args.update({k: v for k, v in given.items() if v is not None})
    return args


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    r"""log Bernoulli(x | sigmoid(l)) elementwise, broadcast: the one Bernoulli log density.

    .. math:: \log p(x \mid l) = x\,l - \log(1 + e^{l}) = x\,l - \mathrm{softplus}(l),

    the same function as torch's ``-binary_cross_entropy_with_logits(l, x)`` (also for x in
    [0, 1]) and the same gradient, x - sigmoid(l).  Why not torch's: on CPU that kernel (its
    ``log1p``) costs about as much as the decoder's last matmul at K = 5000 draws; this form is
    faster and no less accurate in float32 (``python benchmarks/bernoulli_logprob.py --runs
    RUN...`` measures both: 1.28x faster, per-image errors against float64 of 2.2-4.1e-5 nats
    against torch's 3.9-5.1e-5 on three trained VAEs; README).  ``softplus`` returns l itself
    above l = 20 (error < 2.1e-9 per pixel)."""
    return x * logits - F.softplus(logits)


class Bernoulli(dist.Bernoulli):
    """Pyro's ``Bernoulli`` whose ``log_prob`` is :func:`bernoulli_log_prob` (used by every
    genlab model with Bernoulli pixels; give it ``logits``)."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return bernoulli_log_prob(self.logits, value)


def check_binary(x: torch.Tensor, what: str = "images") -> None:
    """Bernoulli likelihoods only ever see 0/1 data: one clear message otherwise."""
    bad = (x != 0) & (x != 1)
    if bool(bad.any()):
        raise GenlabError(
            f"{what} must be 0/1 for a Bernoulli likelihood; found the value {x[bad][0].item():g}"
        )
