"""Per-system reports: ``python -m evaluation RUN_DIR --report`` draws the system's figures.

Each module here defines

* ``Options``, a dataclass extending :class:`evaluation.api.EvalOptions` with the report's own
  options (the command line generates their flags and help from it; notebooks construct it);
* ``report(run_dir, cfg, system, data, estimate, options: Options) -> list[Path]``;
* optionally ``CompareOptions`` and ``compare(run_dirs, options) -> list[Path]`` for
  ``python -m evaluation compare``.

A system's report is the module named by its row in :mod:`inference.systems` (``report``,
by default the system's name).
"""

from __future__ import annotations

from evaluation.reports import cvae, dirichlet, hetero, meta, pixelrnn, vae, vae2
from inference.systems import SYSTEMS, get_system
from models.common import GenlabError

#: module name -> report module
MODULES = {m.__name__.rsplit(".", 1)[1]: m for m in (cvae, dirichlet, hetero, meta, pixelrnn, vae, vae2)}

#: system name -> report module (every system of inference.systems that has one)
REPORTS = {name: MODULES[spec.report or name] for name, spec in SYSTEMS.items()
           if (spec.report or name) in MODULES}


def get_report(system: str):
    if system not in REPORTS:
        get_system(system)  # an unknown system: its own clear message
        raise GenlabError(f"there is no report for system {system!r} yet")
    return REPORTS[system]

