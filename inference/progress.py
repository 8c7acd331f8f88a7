"""Progress of long jobs: a bar on a terminal, one line with an ETA every so often in a log.

``progress(total, desc, enabled)`` returns an object with ``update(n)``, ``set_postfix_str``
and ``close`` (tqdm's interface).  On a terminal it is tqdm's bar.  When stderr is not a
terminal (a piped log, ``nohup``), tqdm would print nothing useful, so a line such as

    vae epoch 3/50: 120/391 steps (31 %), 14 s elapsed, ETA 31 s

is written every ``GENLAB_PROGRESS_SECONDS`` seconds (default 30) and once at the end.
``enabled=False`` silences both.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

from tqdm import tqdm


def _seconds(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


class LineProgress:
    """tqdm's interface, printing one line with an ETA every ``every`` seconds."""

    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0,
                 every: Optional[float] = None, stream=None):
        self.total, self.desc, self.unit, self.n = int(total), desc, unit, int(initial)
        self.start_n = self.n
        self.every = float(os.environ.get("GENLAB_PROGRESS_SECONDS", 30) if every is None else every)
        self.stream = stream or sys.stderr
        self.t0 = self.last = time.monotonic()
        self.postfix = ""
        self.printed = self.n

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        done = self.n - self.start_n
        pct = 100.0 * self.n / self.total if self.total else 100.0
        eta = elapsed / done * (self.total - self.n) if done > 0 else float("nan")
        eta_s = _seconds(eta) if eta == eta else "?"
        tail = f", {self.postfix}" if self.postfix else ""
        return (f"{self.desc}: {self.n}/{self.total} {self.unit} ({pct:.0f} %), "
                f"{_seconds(elapsed)} elapsed, ETA {eta_s}{tail}")

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last, self.printed = now, self.n
            print(self.line(), file=self.stream, flush=True)

    def set_postfix_str(self, s: str) -> None:
        self.postfix = s

    def close(self) -> None:
        # the last line, unless it was just printed; short jobs stay quiet
        if time.monotonic() - self.t0 >= self.every and self.printed != self.n:
            print(self.line(), file=self.stream, flush=True)


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, desc: str, enabled: Optional[bool] = True, unit: str = "it",
             initial: int = 0):
    """A progress reporter for ``total`` units (see the module docstring)."""
    if enabled is False:
        return _Silent()
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False)
    return LineProgress(total, desc, unit, initial)
