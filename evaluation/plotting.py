"""The shared plotting helpers: titles that say what produced a figure, image grids, saving.

Every figure genlab draws goes through :func:`save` into ``RUN_DIR/figures/<name>.png`` and
carries a title from :func:`run_title` (system, size, data, estimator settings).  :func:`save`
never overwrites an earlier figure: one of the same name is first moved into
``figures/old/<name>.<its time>.png`` (:func:`take_moved` lists them, for the command line).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

if not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from evaluation.api import short  # noqa: E402

OLD = "old"  # the subfolder that receives figures a newer one of the same name replaced
_moved: list = []


def run_title(cfg, extra: str = "") -> str:
    """'vae d=20 h=[400] relu · mnist/dynamic · Trace_ELBO k=1 · <extra>'; data options other
    than the data set and its binarization are named (``alpha=[1.3, 1.3] symbols=20``)."""
    a = cfg.system_args
    parts = [cfg.system]
    if "latent_dim" in a:
        parts.append(f"d={a['latent_dim']}")
    if "hidden" in a:
        parts.append(f"h={a['hidden']}")
    if a.get("activation"):
        parts.append(str(a["activation"]))
    bits = [" ".join(parts)]
    d = cfg.data_args
    data = "/".join(str(d[k]) for k in ("dataset", "binarization") if d.get(k) is not None)
    others = [f"{k}={short(v)}" for k, v in d.items()
              if k not in ("dataset", "binarization") and v is not None]
    data = " ".join(([data] if data else []) + others)
    if data:
        bits.append(data)
    bits.append(f"{cfg.loss} k={cfg.k}")
    if extra:
        bits.append(extra)
    return " · ".join(bits)


def save(fig, run_dir, name: str, subdir: str = "figures") -> Path:
    """Write ``fig`` to ``RUN_DIR/figures/<name>.png`` (atomically) and close it.

    An earlier figure of that name is kept: moved to ``figures/old/<name>.<time>.png``, its
    modification time in the name (see :func:`take_moved`).
    """
    folder = Path(run_dir) / subdir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    tmp = folder / f".{name}.tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    if path.exists():
        _move_aside(path)
    os.replace(tmp, path)
    plt.close(fig)
    return path


def _move_aside(path: Path) -> Path:
    old = path.parent / OLD
    old.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    target, i = old / f"{path.stem}.{stamp}.png", 1
    while target.exists():
        i += 1
        target = old / f"{path.stem}.{stamp}-{i}.png"
    os.replace(path, target)
    _moved.append(target)
    return target


def take_moved() -> list:
    """The earlier figures :func:`save` moved aside since the last call (then forgets them)."""
    out = list(_moved)
    _moved.clear()
    return out


def image_rows(
    rows: Sequence[np.ndarray],
    row_labels: Sequence[str],
    title: str,
    col_labels: Optional[Sequence[str]] = None,
    shape=(28, 28),
    size: float = 0.9,
):
    """A juxtaposed grid: one row per array of images ``(n_cols, 784)`` in [0, 1], labelled."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(size * n_cols + 1.6, size * n_rows + 0.7),
                             squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j < len(row):
                ax.imshow(np.asarray(row[j]).reshape(shape), cmap="gray_r", vmin=0, vmax=1,
                          interpolation="nearest")
            if j == 0:
                ax.set_ylabel(row_labels[i], rotation=0, ha="right", va="center", fontsize=8)
            if i == 0 and col_labels is not None and j < len(col_labels):
                ax.set_title(col_labels[j], fontsize=8)
    fig.suptitle(title, fontsize=9)
    return fig
