"""Patch the committed, executed notebooks without re-executing them.

``python notebooks/nbpatch.py sources [NAME.ipynb ...]``
    copy every cell's source from its ``build_*.py`` into the executed notebook, keeping the
    outputs (the builders themselves write unexecuted notebooks); the cells must still
    correspond one to one (same number, same kinds).
``python notebooks/nbpatch.py clean [NAME.ipynb ...]``
    strip what the executing machine left in the outputs: its absolute paths (the repository
    root becomes ``..``, relative to ``notebooks/``, and temporary folders ``<tmp>``) and the
    TqdmWarning about ipywidgets; everything else is kept.

Without names, every notebook in ``notebooks/``.
"""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path

import nbbuild

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: ``/tmp/...``-like folders an execution may print (pytest's and tempfile's)
TMP = re.compile(r"/(?:tmp|var/folders)/[^\s'\")]*")
#: the two lines tqdm.auto prints when ipywidgets is missing
TQDM = re.compile(r"^.*TqdmWarning: IProgress not found.*\n(?:\s+from \.autonotebook import .*\n)?",
                  re.MULTILINE)


def built_cells(builder: Path):
    """(cells, notebook name) a builder would write, without writing it."""
    got = {}
    write = nbbuild.write_notebook
    nbbuild.write_notebook = lambda cells, name: got.update(cells=list(cells), name=name)
    try:
        runpy.run_path(str(builder), run_name="__main__")
    finally:
        nbbuild.write_notebook = write
    return got["cells"], got["name"]


def _lines(text: str) -> list:
    return text.splitlines(keepends=True)


def sources(names=None) -> None:
    sys.path.insert(0, str(HERE))
    for builder in sorted(HERE.glob("build_*.py")):
        cells, name = built_cells(builder)
        if names and name not in names:
            continue
        path = HERE / name
        nb = json.loads(path.read_text())
        if [c.cell_type for c in cells] != [c["cell_type"] for c in nb["cells"]]:
            raise SystemExit(f"{name}: the builder's cells no longer match the notebook's; "
                             "re-execute it instead")
        changed = 0
        for new, old in zip(cells, nb["cells"]):
            if "".join(old["source"]) != new.source:
                old["source"] = _lines(new.source)
                changed += 1
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        print(f"{name}: {changed} cell source(s) updated, outputs kept")


def clean_text(text: str) -> str:
    text = TQDM.sub("", text)
    text = text.replace(str(ROOT) + "/", "../").replace(str(ROOT), "..")
    return TMP.sub("<tmp>", text)


def clean(names=None) -> None:
    for path in sorted(HERE.glob("*.ipynb")):
        if names and path.name not in names:
            continue
        nb = json.loads(path.read_text())
        n = 0
        for cell in nb["cells"]:
            kept = []
            for out in cell.get("outputs", []):
                if "text" in out:
                    text = clean_text("".join(out["text"]))
                    n += text != "".join(out["text"])
                    out["text"] = _lines(text)
                    if out.get("output_type") == "stream" and not text:
                        continue  # nothing left of it
                for key, value in out.get("data", {}).items():
                    if key.startswith("text/"):
                        text = clean_text("".join(value))
                        n += text != "".join(value)
                        out["data"][key] = _lines(text)
                kept.append(out)
            if "outputs" in cell:
                cell["outputs"] = kept
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        print(f"{path.name}: {n} output(s) cleaned")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("sources", "clean"):
        raise SystemExit(__doc__)
    {"sources": sources, "clean": clean}[sys.argv[1]](set(sys.argv[2:]))
