"""Execute a committed notebook in place, on real runs: ``python notebooks/run.py vae_mnist``.

``make notebook NB=vae_mnist`` installs what this needs (the ``notebooks`` extra) and calls it.
Runs are read from ``$GENLAB_RUNS`` (default ``runs/``) and data from ``$GENLAB_DATA``; a run
the notebook needs and does not find is trained first.  What the kernel prints (training
progress, one line with an ETA every 30 s) is echoed on this terminal as it happens, with the
cell being executed, so a long training is never silent.  ``GENLAB_SMOKE=1`` runs the tiny
setting the test suite uses.  The notebook is written back only when every cell succeeded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbclient
import nbformat

HERE = Path(__file__).resolve().parent


class EchoingClient(nbclient.NotebookClient):
    """nbclient's client, echoing every stream the kernel prints to this process's stderr."""

    def output(self, outs, msg, display_id, cell_index):
        if msg["msg_type"] == "stream":
            sys.stderr.write(msg["content"]["text"])
            sys.stderr.flush()
        return super().output(outs, msg, display_id, cell_index)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="the notebook, e.g. vae_mnist (notebooks/<name>.ipynb)")
    ap.add_argument("--timeout", type=int, default=None, help="seconds per cell (default: none)")
    ap.add_argument("--out", help="write the executed notebook here instead of in place")
    a = ap.parse_args(argv)
    path = HERE / f"{Path(a.name).stem}.ipynb"
    if not path.exists():
        have = ", ".join(sorted(p.stem for p in HERE.glob("*.ipynb")))
        print(f"run.py: error: no notebook {path.name} (there are {have})", file=sys.stderr)
        return 2
    os.environ.setdefault("GENLAB_RUNS", str(HERE.parent / "runs"))
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ["PYTHONPATH"] = str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")
    print(f"executing {path.name}: runs in {os.environ['GENLAB_RUNS']}, data in "
          f"{os.environ.get('GENLAB_DATA', '(the user cache)')}", file=sys.stderr)
    nb = nbformat.read(path, as_version=4)
    t0 = time.monotonic()

    def announce(cell, cell_index, **_):
        if cell.cell_type == "code":
            first = (cell.source.strip().splitlines() or [""])[0][:70]
            print(f"[cell {cell_index}, {time.monotonic() - t0:.0f} s] {first}", file=sys.stderr)

    client = EchoingClient(nb, timeout=a.timeout, kernel_name="python3",
                           resources={"metadata": {"path": str(HERE)}}, on_cell_execute=announce)
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        print(f"run.py: error: a cell failed; {path.name} was not rewritten\n{e}", file=sys.stderr)
        return 1
    out = Path(a.out) if a.out else path
    nbformat.write(nb, out)
    print(f"wrote {out} ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
