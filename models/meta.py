r"""A GRU meta-learner of reset-every-T symbol sequences, and the Bayes-optimal predictor.

The task (``inference.data.symbol_sequences``): symbols :math:`0..J-1` and a reset symbol
:math:`R = J` (vocabulary :math:`V = J + 1`).  Position :math:`t` (0-based) holds :math:`R`
when :math:`t \bmod T = 0`; the :math:`T - 1` symbols after a reset are i.i.d.
:math:`\mathrm{Categorical}(p)` with a fresh :math:`p \sim \mathrm{Dirichlet}(\alpha)` per block.

Bayes-optimal next-symbol predictor, knowing :math:`\alpha` and :math:`T`: with :math:`c_j(t)`
the counts of symbol :math:`j` since the last reset at or before :math:`t`, :math:`n(t) = \sum_j
c_j(t)` and :math:`A = \sum_j \alpha_j`,

.. math::

    P(x_{t+1} = R \mid x_{0..t}) = [\,(t + 1) \bmod T = 0\,], \qquad
    P(x_{t+1} = j \mid x_{0..t}) = [\,(t + 1) \bmod T \ne 0\,]\;
        \frac{\alpha_j + c_j(t)}{A + n(t)} ,

the Dirichlet–Categorical posterior predictive (``models.dirichlet.posterior_predictive``),
restarted at every reset.  It is optimal for sequences of the training law; on fixed-p test
sequences it is still the predictor a learner of the training law should match.

The meta-learner (a Pyro model with an empty guide, so SVI is maximum likelihood): a GRU reads
the one-hot symbols :math:`x_0..x_{t}` and an MLP head maps its state to logits of
:math:`x_{t+1}`:

.. math::

    h_t = \mathrm{GRU}(h_{t-1}, \mathrm{onehot}(x_t)), \qquad
    x_{t+1} \sim \mathrm{Categorical}(\mathrm{softmax}(f_\theta(h_t))), \quad t = 0..L-2 .

Shapes: ``x`` int64 ``(S, L)``, S sequences of length L, under ``pyro.plate("data")`` over
sequences (dim -1, the rightmost batch dim); the site ``"next"`` has batch shape ``(S,)`` and
event shape ``(L - 1,)`` (``to_event(1)``), value ``x[:, 1:]``; logits ``(S, L - 1, V)``.
The objective is then the negative log-likelihood in nats per sequence; divide by ``L - 1``
for nats per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from models.common import GenlabError, data_plate, fill_defaults, mlp, option
from models.dirichlet import check_alpha


def as_sequences(x, vocab: int) -> torch.Tensor:
    """``x`` as an int64 ``(S, L)`` tensor of symbols in ``0..vocab-1``.

    Accepts a tensor or a list of equal-length sequences; ragged lengths are refused.
    """
    if not torch.is_tensor(x):
        rows = [torch.as_tensor(r) for r in x]
        if not rows:
            raise GenlabError("the sequence batch is empty")
        lengths = sorted({int(r.numel()) for r in rows})
        if len(lengths) > 1 or any(r.dim() != 1 for r in rows):
            raise GenlabError(f"every sequence in a batch must have the same length; got lengths "
                              f"from {lengths[0]} to {lengths[-1]}")
        x = torch.stack(rows)
    if x.dim() != 2:
        raise GenlabError(f"sequences must be a (sequences, length) array, got shape {tuple(x.shape)}")
    if x.shape[1] < 2:
        raise GenlabError(f"sequences need a length of at least 2 symbols, got {x.shape[1]}")
    if torch.is_floating_point(x):
        if not bool(torch.all(x == x.round())):
            raise GenlabError("sequences must hold integer symbols, got non-integer values")
    x = x.long()
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab):
        bad = int(x.min()) if int(x.min()) < 0 else int(x.max())
        raise GenlabError(f"symbol {bad} is out of range: symbols lie in 0..{vocab - 1} "
                          f"(the reset symbol is {vocab - 1})")
    return x


def bayes_predictive(x, alpha, period: int) -> torch.Tensor:
    """The Bayes-optimal P(x_{t+1} | x_{0..t}) with the known reset schedule (module docstring).

    ``x`` ``(S, L)`` with the reset symbol ``J = len(alpha)``; returns float64 ``(S, L - 1, J + 1)``.
    """
    a = check_alpha(alpha).double()
    if int(period) != period or period < 1:
        raise GenlabError(f"the reset period T must be an integer of at least 1, got {period}")
    J = a.shape[0]
    x = as_sequences(x, J + 1)
    S, L = x.shape
    onehot = F.one_hot(x, J + 1)[..., :J].double()  # resets count as no symbol
    t = torch.arange(L)
    block = t // int(period)
    # counts since the block's start: cumulative counts minus those before the block
    cum = onehot.cumsum(1)  # (S, L, J), inclusive
    start = block * int(period)
    before = torch.where((start > 0)[None, :, None], cum[:, (start - 1).clamp(min=0), :],
                         torch.zeros_like(cum))
    c = (cum - before)[:, :-1, :]  # counts through x_t, t = 0..L-2
    pred = (a + c) / (a.sum() + c.sum(-1, keepdim=True))
    reset_next = ((t[1:] % int(period)) == 0)[None, :, None]  # is x_{t+1} a reset?
    out = torch.cat([pred * ~reset_next, reset_next.double().expand(S, L - 1, 1)], -1)
    return out


class MetaLearner(nn.Module):
    """GRU next-symbol model over ``num_symbols`` symbols plus the reset symbol."""

    def __init__(self, num_symbols: int = 3, hidden: int = 32, head: Sequence[int] = (64,),
                 activation: str = "relu"):
        super().__init__()
        if int(num_symbols) < 1 or int(hidden) < 1:
            raise GenlabError(f"need at least one symbol and one hidden unit, got {num_symbols} "
                              f"and {hidden}")
        self.num_symbols = int(num_symbols)
        self.vocab = self.num_symbols + 1
        self.hidden = int(hidden)
        self.rnn = nn.GRU(self.vocab, self.hidden, batch_first=True)
        self.head = mlp((self.hidden, *[int(h) for h in head], self.vocab), activation)
        self.act = nn.ReLU() if activation == "relu" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Next-symbol logits ``(S, L - 1, V)`` from ``x`` ``(S, L)``."""
        x = as_sequences(x, self.vocab)
        h, _ = self.rnn(F.one_hot(x[:, :-1], self.vocab).to(self.head[0].weight.dtype))
        return self.head(self.act(h))

    def log_predictive(self, x) -> torch.Tensor:
        """log P_GRU(x_{t+1} | x_{0..t}), ``(S, L - 1, V)``."""
        return torch.log_softmax(self.forward(x), -1)

    def model(self, x, data_size=None):
        """x_{t+1} ~ Categorical(softmax(f(h_t))) for each sequence, under plate "data"."""
        pyro.module("meta", self)
        x = as_sequences(x, self.vocab)
        logits = self.forward(x)
        with data_plate(x.shape[0], data_size):
            pyro.sample("next", dist.Categorical(logits=logits).to_event(1), obs=x[:, 1:])

    def guide(self, x, data_size=None):
        """Empty: no latent variables, so SVI maximises the likelihood."""

    def step_metrics(self, x) -> dict:
        """Cross-entropy (nats per step) and accuracy of the argmax on the batch."""
        x = as_sequences(x, self.vocab)
        logp = self.log_predictive(x)
        y = x[:, 1:]
        ce = -logp.gather(-1, y.unsqueeze(-1)).mean()
        acc = (logp.argmax(-1) == y).double().mean()
        return {"ce_per_step": float(ce), "accuracy": float(acc)}


@dataclass
class MetaConfig:
    """The meta-learner's architecture: the one source of its defaults."""

    hidden: int = option(32, "GRU state size")
    head: list[int] = option([64], "hidden sizes of the output MLP")
    activation: str = option("relu", "nonlinearity", choices=("relu", "tanh", "softplus", "elu"))


def meta_args(num_symbols=None, hidden=None, head=None, activation=None) -> dict:
    """The recorded architecture: defaults for everything not given (3 symbols by default)."""
    d = fill_defaults(MetaConfig, dict(hidden=hidden, head=head, activation=activation))
    return dict(num_symbols=int(num_symbols or 3), hidden=int(d["hidden"]),
                head=[int(h) for h in d["head"]], activation=d["activation"])


def build_meta(**kwargs) -> MetaLearner:
    return MetaLearner(**meta_args(**kwargs))
