"""The one notebook writer the ``build_*.py`` scripts share (run them from anywhere)."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

KERNEL = {"name": "python3", "display_name": "Python 3", "language": "python"}


def md(text: str):
    """A markdown cell (surrounding blank lines stripped)."""
    return new_markdown_cell(text.strip())


def code(text: str):
    """A code cell (surrounding blank lines stripped)."""
    return new_code_cell(text.strip())


def write_notebook(cells, name: str) -> Path:
    """Write ``cells`` to ``notebooks/<name>`` (unexecuted) and return its path."""
    path = Path(__file__).resolve().parent / name
    nbformat.write(new_notebook(cells=list(cells), metadata={"kernelspec": KERNEL}), path)
    print(path)
    return path
