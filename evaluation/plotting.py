"""The shared plotting helpers: titles that say what produced a figure, image grids, saving.

Every figure genlab draws goes through :func:`save` into ``RUN_DIR/figures/<name>.png`` and
carries a title from :func:`run_title` (system, size, data, estimator settings).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

if not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def run_title(cfg, extra: str = "") -> str:
    """'vae d=20 h=[400] relu · mnist/dynamic · Trace_ELBO k=1 · <extra>'."""
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
    named = [str(d[k]) for k in ("dataset", "binarization") if d.get(k) is not None]
    named += [f"{k}={v}" for k, v in d.items() if k not in ("dataset", "binarization") and v is not None]
    data = "/".join(named[:2]) + (" " + " ".join(named[2:]) if len(named) > 2 else "")
    if data:
        bits.append(data)
    bits.append(f"{cfg.loss} k={cfg.k}")
    if extra:
        bits.append(extra)
    return " · ".join(bits)


def save(fig, run_dir, name: str, subdir: str = "figures") -> Path:
    """Write ``fig`` to ``RUN_DIR/figures/<name>.png`` (atomically) and close it."""
    folder = Path(run_dir) / subdir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    tmp = folder / f".{name}.tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    plt.close(fig)
    return path


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
