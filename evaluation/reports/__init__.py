"""Per-system reports: ``python -m evaluation RUN_DIR --report`` draws the system's figures.

Each module here defines ``report(run_dir, cfg, system, data, options) -> list[Path]`` and
may define ``compare(run_dirs, options) -> list[Path]`` for ``python -m evaluation compare``.
Adding a system's report means one module and one row in ``REPORTS``.
"""

from __future__ import annotations

import importlib

from models.common import GenlabError

REPORTS = {  # system name -> module under evaluation.reports
    "dirichlet": "dirichlet",
    "hetero": "hetero",
    "meta": "meta",
    "pixelrnn": "pixelrnn",
    "vae": "vae",
    "cvae": "cvae",
}


def get_report(system: str):
    if system not in REPORTS:
        raise GenlabError(f"there is no report for system {system!r} yet")
    return importlib.import_module(f"evaluation.reports.{REPORTS[system]}")
