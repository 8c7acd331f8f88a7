r"""Named optimization schedules: the learning rate of every epoch, the epoch count, and the
optimizer settings, as pure data and pure functions (the runner builds the optimizer).

``burda`` — Burda, Grosse & Salakhutdinov (2015), Section 5: Adam with β₁ = 0.9, β₂ = 0.999,
ε = 10⁻⁴, mini-batches of 20, and :math:`3^i` passes over the training data at learning rate
:math:`0.001 \cdot 10^{-i/7}` for :math:`i = 0, \dots, 7`: 3,280 passes in all, the last 2,187 at
10⁻⁴.

A budget of ``passes=N`` compresses the same shape into N epochs: epoch e (0-based) covers the
share :math:`[e/N, (e+1)/N)` of the full schedule and takes the learning rate of the full
schedule at the middle of that share, i.e. of pass :math:`\lfloor (e + \frac12) \cdot 3280 / N
\rfloor`.  With N = 3,280 this is exactly the paper's schedule; with small N the early,
short, high-rate stages get no epoch of their own (e.g. N = 10 runs 1 epoch at
1.93·10⁻⁴, 2 at 1.39·10⁻⁴ and 7 at 10⁻⁴), which is what "the same shape" means.

Use (the runner):

    s = get_schedule("burda", passes=N)
    opt = torch.optim.Adam(params, lr=s.lr(0), **s.adam)        # betas, eps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, s.lr_factor)   # stepped once per epoch
    epochs, batch_size = s.epochs, s.batch_size
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from models.common import GenlabError


@dataclass(frozen=True)
class Schedule:
    """A piecewise-constant learning rate over ``stages`` ((passes, lr) of the full schedule),
    compressed into ``epochs`` epochs, with the optimizer's settings."""

    name: str
    stages: tuple  # ((passes, lr), ...) of the full, uncompressed schedule
    epochs: int  # the epochs this (possibly compressed) schedule runs
    batch_size: int
    adam: dict = field(default_factory=dict)  # keyword arguments of torch.optim.Adam besides lr

    @property
    def full_passes(self) -> int:
        return sum(p for p, _ in self.stages)

    def lr_at_pass(self, position: float) -> float:
        """The full schedule's learning rate at ``position`` passes (0 <= position < total)."""
        if not 0 <= position < self.full_passes:
            raise GenlabError(f"pass {position} is outside the schedule's 0..{self.full_passes}")
        done = 0
        for passes, lr in self.stages:
            done += passes
            if position < done:
                return lr
        raise AssertionError("unreachable")

    def lr(self, epoch: int) -> float:
        """Learning rate of epoch ``epoch`` (0-based) of this schedule; past the end, the last
        rate (a run continued beyond its schedule keeps the final rate)."""
        if epoch < 0:
            raise GenlabError(f"epoch index must be non-negative, got {epoch}")
        epoch = min(int(epoch), self.epochs - 1)
        return self.lr_at_pass(math.floor((epoch + 0.5) * self.full_passes / self.epochs))

    def lr_factor(self, epoch: int) -> float:
        """``lr(epoch) / lr(0)``: the multiplier ``torch.optim.lr_scheduler.LambdaLR`` wants."""
        return self.lr(epoch) / self.lr(0)

    def lrs(self) -> list:
        """Every epoch's learning rate."""
        return [self.lr(e) for e in range(self.epochs)]

    def runs(self) -> list:
        """``[(epochs, lr), ...]``: consecutive epochs at the same rate (for display)."""
        out: list = []
        for lr in self.lrs():
            if out and out[-1][1] == lr:
                out[-1] = (out[-1][0] + 1, lr)
            else:
                out.append((1, lr))
        return out

    def describe(self) -> str:
        runs = ", ".join(f"{n}×{lr:.3g}" for n, lr in self.runs())
        kw = ", ".join(f"{k}={v}" for k, v in self.adam.items())
        return (f"{self.name}: {self.epochs} passes (of {self.full_passes}), batch "
                f"{self.batch_size}, Adam({kw}), lr {runs}")


def burda(passes: Optional[int] = None) -> Schedule:
    """Burda et al.'s schedule (3,280 passes), or compressed into ``passes`` epochs."""
    stages = tuple((3**i, 1e-3 * 10 ** (-i / 7)) for i in range(8))
    full = sum(p for p, _ in stages)
    n = full if passes is None else int(passes)
    if n < 1:
        raise GenlabError(f"--passes must be a positive integer, got {passes}")
    return Schedule("burda", stages, n, 20, dict(betas=(0.9, 0.999), eps=1e-4))


#: Name -> constructor ``(passes=None) -> Schedule``.
SCHEDULES = {"burda": burda}


def get_schedule(name: str, passes: Optional[int] = None) -> Schedule:
    """The schedule called ``name``, compressed into ``passes`` epochs when given."""
    if name not in SCHEDULES:
        raise GenlabError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name](passes)
