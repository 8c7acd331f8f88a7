r"""The Dirichlet–Categorical conjugate pair, as plain Pyro functions, with its closed forms.

Model, for symbols :math:`x_1..x_n \in \{0, .., J-1\}` and concentration :math:`\alpha \in
(0, \infty)^J`:

.. math::

    p \sim \mathrm{Dirichlet}(\alpha) \quad(\text{global, outside the plate}), \qquad
    x_i \mid p \sim \mathrm{Categorical}(p), \quad i = 1..n \ (\texttt{pyro.plate("data")}).

With counts :math:`c_j = \#\{i : x_i = j\}`, :math:`A = \sum_j \alpha_j` and
:math:`n = \sum_j c_j`, conjugacy gives

.. math::

    p \mid x \sim \mathrm{Dirichlet}(\alpha + c), \qquad
    P(x_{n+1} = j \mid x) = \frac{\alpha_j + c_j}{A + n},

and the evidence of the *ordered* sequence (no multinomial coefficient)

.. math::

    \log p(x_{1:n}) = \log\Gamma(A) - \log\Gamma(A + n)
        + \sum_j \bigl[\log\Gamma(\alpha_j + c_j) - \log\Gamma(\alpha_j)\bigr].

Guide: :math:`q(p) = \mathrm{Dirichlet}(\beta)`, with ``pyro.param("concentration")``
initialised to :math:`\alpha` (or a fixed ``concentration``, e.g. the exact posterior
:math:`\alpha + c`, for which every importance weight equals the evidence).

``alpha`` may be a ``(J,)`` tensor, or a positive scalar (a symmetric prior) together with
``num_categories``.  Because ``p`` lies outside the data plate, importance-weighted estimates
of this model are joint (one value for the whole sequence), not per datapoint.

The ELBO in closed form (used to check SVI and the estimator): with :math:`B = \sum_j \beta_j`,

.. math::

    \mathrm{ELBO}(\beta) = \sum_j c_j\,[\psi(\beta_j) - \psi(B)]
        - \mathrm{KL}(\mathrm{Dir}(\beta)\,\|\,\mathrm{Dir}(\alpha))
      = \log p(x) - \mathrm{KL}(\mathrm{Dir}(\beta)\,\|\,\mathrm{Dir}(\alpha + c)),

so the gap between the evidence and the ELBO is exactly the KL to the exact posterior, and the
ELBO's only maximiser is :math:`\beta = \alpha + c`.

The batched system (:class:`DirichletCategorical`, what ``python -m inference dirichlet``
trains): S independent sequences, each with its own :math:`p_s \sim \mathrm{Dirichlet}(\alpha)`
under ``pyro.plate("sequences", S)``; the datapoints are the symbols of all sequences together,
each carrying its sequence id ``seq``, observed under the (subsampling) data plate:
:math:`x_i \mid p \sim \mathrm{Categorical}(p_{\mathrm{seq}_i})`.  The guide is
:math:`\prod_s \mathrm{Dirichlet}(p_s; \beta_s)` with ``pyro.param("concentration")`` of shape
``(S, J)``, positive-constrained, initialised to the prior.  The posterior factorises over
sequences, so every closed form above holds per sequence and the evidence is the sum.  S = 1 is
the model above.  The ``p_s`` are global (outside the data plate): the estimator gives one joint
value, :math:`\sum_s \log p(x_s)`.
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints

from models.common import GenlabError, data_plate


def _alpha(alpha, num_categories: Optional[int] = None) -> torch.Tensor:
    """The ``(J,)`` concentration, checked positive; a scalar is repeated ``num_categories`` times."""
    a = torch.as_tensor(alpha, dtype=None if torch.is_tensor(alpha) else torch.get_default_dtype())
    if not torch.is_floating_point(a):
        a = a.to(torch.get_default_dtype())
    if a.dim() == 0:
        if num_categories is None:
            raise GenlabError("a scalar alpha needs num_categories to say how many symbols there are")
        a = a.expand(int(num_categories))
    if a.dim() != 1 or a.shape[0] < 1:
        raise GenlabError(f"alpha must be a scalar or a 1-D vector, got shape {tuple(a.shape)}")
    if num_categories is not None and a.shape[0] != int(num_categories):
        raise GenlabError(
            f"alpha has {a.shape[0]} entries but num_categories is {num_categories}"
        )
    if not bool(torch.all(a > 0)) or not bool(torch.all(torch.isfinite(a))):
        raise GenlabError(f"every entry of alpha must be positive and finite, got {a.tolist()}")
    return a


def check_alpha(alpha, num_categories: Optional[int] = None) -> torch.Tensor:
    """The concentration as a ``(J,)`` float tensor; a non-positive entry is refused."""
    if isinstance(alpha, str):
        try:
            alpha = [float(v) for v in alpha.split(",") if v.strip()]
        except ValueError:
            raise GenlabError(f"alpha must be comma-separated numbers, got {alpha!r}") from None
    return _alpha(alpha, num_categories)


def _symbols(x, num_categories: int) -> torch.Tensor:
    """``x`` as a 1-D long tensor, checked to hold symbols in ``0..num_categories-1``."""
    x = torch.as_tensor(x)
    if x.dim() != 1:
        raise GenlabError(f"x must be a 1-D sequence of symbols, got shape {tuple(x.shape)}")
    if torch.is_floating_point(x):
        if not bool(torch.all(x == x.round())):
            raise GenlabError("x must hold integer symbols, got non-integer values")
        x = x.long()
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= num_categories):
        raise GenlabError(
            f"symbols must lie in 0..{num_categories - 1}, got values from {int(x.min())} "
            f"to {int(x.max())}"
        )
    return x.long()


def counts(x, num_categories: int, dtype=None) -> torch.Tensor:
    """``c_j``, how often each symbol occurs in ``x``, as a ``(J,)`` float tensor."""
    x = _symbols(x, int(num_categories))
    return torch.bincount(x, minlength=int(num_categories)).to(dtype or torch.get_default_dtype())


def model(x, alpha, num_categories: Optional[int] = None, concentration=None):
    """p ~ Dirichlet(alpha); x_i ~ Categorical(p) observed under ``pyro.plate("data")``.

    ``concentration`` belongs to the guide (model and guide take the same arguments) and is
    accepted and ignored here.
    """
    a = _alpha(alpha, num_categories)
    x = _symbols(x, a.shape[0])
    p = pyro.sample("p", dist.Dirichlet(a))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Categorical(probs=p), obs=x)


def guide(x, alpha, num_categories: Optional[int] = None, concentration=None):
    """q(p) = Dirichlet(concentration): learnable (initialised to alpha) unless given."""
    a = _alpha(alpha, num_categories)
    if concentration is None:
        beta = pyro.param("concentration", a.detach().clone(), constraint=constraints.positive)
    else:
        beta = torch.as_tensor(concentration, dtype=a.dtype)
        if beta.shape != a.shape:
            raise GenlabError(
                f"concentration must have alpha's shape {tuple(a.shape)}, got {tuple(beta.shape)}"
            )
        if not bool(torch.all(beta > 0)):
            raise GenlabError("every entry of the guide's concentration must be positive")
    pyro.sample("p", dist.Dirichlet(beta))


# ----------------------------------------------------------------------------- closed forms
def posterior_concentration(alpha, counts) -> torch.Tensor:
    """alpha + c: the concentration of the exact posterior p | x."""
    a = _alpha(alpha, None if torch.as_tensor(alpha).dim() else len(counts))
    c = torch.as_tensor(counts, dtype=a.dtype)
    if c.shape != a.shape or not bool(torch.all(c >= 0)):
        raise GenlabError(f"counts must be non-negative with alpha's shape {tuple(a.shape)}")
    return a + c


def posterior_predictive(alpha, counts) -> torch.Tensor:
    """P(x_{n+1} = j | x) = (alpha_j + c_j) / (sum alpha + n)."""
    post = posterior_concentration(alpha, counts)
    return post / post.sum()


def log_evidence(alpha, x, num_categories: Optional[int] = None) -> torch.Tensor:
    """log p(x_1..x_n) of the ordered sequence (Dirichlet-multinomial without the coefficient).

    Computed and returned in float64 whatever dtype comes in: in float32, lgamma(A + n) for
    n ~ 10^6 loses most of a nat.
    """
    a = _alpha(alpha, num_categories).double()
    c = counts(x, a.shape[0], dtype=torch.float64)
    return _log_evidence(a, c)


def _log_evidence(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The closed form over the last dimension, float64 ``a`` and ``c`` of one shape."""
    A, n = a.sum(-1), c.sum(-1)
    return (torch.lgamma(A) - torch.lgamma(A + n)
            + (torch.lgamma(a + c) - torch.lgamma(a)).sum(-1))


def kl_dirichlet(a, b) -> torch.Tensor:
    """KL(Dirichlet(a) || Dirichlet(b)) in closed form."""
    a, b = _alpha(a), _alpha(b)
    if a.shape != b.shape:
        raise GenlabError(f"both concentrations need the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.distributions.kl_divergence(dist.Dirichlet(a), dist.Dirichlet(b))


def expected_log_likelihood(beta, counts) -> torch.Tensor:
    """E_q[sum_i log p_{x_i}] = sum_j c_j (psi(beta_j) - psi(sum beta)), over the last dim."""
    beta = torch.as_tensor(beta)
    c = torch.as_tensor(counts, dtype=beta.dtype)
    return (c * (torch.digamma(beta) - torch.digamma(beta.sum(-1, keepdim=True)))).sum(-1)


def elbo(alpha, beta, counts) -> torch.Tensor:
    """The ELBO of q = Dirichlet(beta) in closed form (see the module docstring), per row."""
    beta = torch.as_tensor(beta)
    a = torch.as_tensor(alpha, dtype=beta.dtype).expand_as(beta)
    kl = torch.distributions.kl_divergence(dist.Dirichlet(beta), dist.Dirichlet(a))
    return expected_log_likelihood(beta, counts) - kl


def log_evidence_from_counts(alpha, counts) -> torch.Tensor:
    """log p(x) of ordered sequences from their counts ``(..., J)``: one value per row.

    In float64 whatever dtypes come in (integer counts used to cast alpha to an integer).
    """
    c = torch.as_tensor(counts).to(torch.float64)
    a = torch.as_tensor(alpha).to(torch.float64).expand_as(c)
    return _log_evidence(a, c)


def counts_by_sequence(x, seq, num_sequences: int, num_categories: int, dtype=None) -> torch.Tensor:
    """``(S, J)`` counts of each symbol in each sequence; ``seq`` None means one sequence."""
    x = _symbols(x, int(num_categories))
    seq = torch.zeros_like(x) if seq is None else torch.as_tensor(seq).long()
    if seq.shape != x.shape:
        raise GenlabError(f"seq must give one sequence id per symbol, got shapes {tuple(seq.shape)} "
                          f"and {tuple(x.shape)}")
    if seq.numel() and (int(seq.min()) < 0 or int(seq.max()) >= num_sequences):
        raise GenlabError(f"sequence ids must lie in 0..{num_sequences - 1}, got values up to "
                          f"{int(seq.max())}")
    flat = seq * int(num_categories) + x
    c = torch.bincount(flat, minlength=int(num_sequences) * int(num_categories))
    return c.reshape(int(num_sequences), int(num_categories)).to(dtype or torch.get_default_dtype())


class DirichletCategorical(nn.Module):
    """The batched conjugate system: S sequences, one ``p_s`` each (module docstring).

    Shapes: ``x`` int64 ``(B,)`` symbols in ``0..J-1``; ``seq`` int64 ``(B,)`` in ``0..S-1``
    (None: all sequence 0); site ``"p"`` ``(S, J)`` (``(K, S, J)`` under a particles plate);
    site ``"x"`` batch shape ``(B,)``.
    """

    def __init__(self, alpha, num_sequences: int = 1):
        super().__init__()
        if int(num_sequences) != num_sequences or num_sequences < 1:
            raise GenlabError(f"the number of sequences must be a positive integer, got {num_sequences}")
        self.register_buffer("alpha", check_alpha(alpha))
        self.num_sequences = int(num_sequences)
        self.num_categories = int(self.alpha.shape[0])

    def _check(self, x, seq):
        x = _symbols(x, self.num_categories)
        if seq is None:
            seq = torch.zeros_like(x)
        elif seq.shape != x.shape:
            raise GenlabError(f"seq must give one sequence id per symbol, got shapes "
                              f"{tuple(seq.shape)} and {tuple(x.shape)}")
        return x, seq.long()

    def model(self, x, seq=None, data_size=None):
        """p_s ~ Dirichlet(alpha) under plate "sequences"; x_i ~ Categorical(p_{seq_i})."""
        x, seq = self._check(x, seq)
        with pyro.plate("sequences", self.num_sequences, dim=-1):
            p = pyro.sample("p", dist.Dirichlet(self.alpha))
        with data_plate(x.shape[0], data_size):
            pyro.sample("x", dist.Categorical(probs=p.index_select(-2, seq)), obs=x)

    def guide(self, x, seq=None, data_size=None):
        """q(p_s) = Dirichlet(beta_s), beta = pyro.param("concentration") (S, J) > 0."""
        beta = pyro.param("concentration",
                          lambda: self.alpha.expand(self.num_sequences, -1).clone(),
                          constraint=constraints.positive)
        with pyro.plate("sequences", self.num_sequences, dim=-1):
            pyro.sample("p", dist.Dirichlet(beta))

    def concentration(self) -> torch.Tensor:
        """The guide's learned concentration ``(S, J)`` (the prior before training)."""
        store = pyro.get_param_store()
        if "concentration" in store:
            return pyro.param("concentration").detach().clone()
        return self.alpha.expand(self.num_sequences, -1).clone()

    def exact_posterior(self, x, seq=None) -> torch.Tensor:
        """alpha + c_s, ``(S, J)``."""
        return self.alpha + counts_by_sequence(x, seq, self.num_sequences, self.num_categories,
                                               self.alpha.dtype)
