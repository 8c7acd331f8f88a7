"""The house rules that keep genlab extensible: imports run one way, every system is complete,
and every system trains and evaluates with its defaults from the command line."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation.reports import REPORTS, get_report
from inference.systems import SYSTEMS

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"models": 0, "inference": 1, "evaluation": 2}


def _imports(path: Path) -> list:
    """(line, top-level package) of every import in a file, function-level ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


@pytest.mark.parametrize("package", ["models", "inference"])
def test_imports_run_downhill(package):
    """models <- inference <- evaluation: no module imports from a layer above its own."""
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, mod in _imports(path):
            if mod in LAYERS and LAYERS[mod] > LAYERS[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, bad


def test_importing_inference_loads_no_evaluation_module():
    code = ("import sys, inference, inference.cli, inference.runner, inference.importance, "
            "inference.losses, inference.systems, inference.data; "
            "print([m for m in sys.modules if m.split('.')[0] == 'evaluation'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_every_system_is_complete():
    """Adding a system is what inference/systems.py says: model file, row, report, doc,
    notebook (and its builder) and tests."""
    for name, spec in SYSTEMS.items():
        assert (ROOT / "models" / spec.model_file).exists(), name
        report = get_report(spec.report or name)
        assert callable(report.report), name
        assert (ROOT / "docs" / spec.doc).exists(), name
        nb = ROOT / "notebooks" / spec.notebook
        assert nb.exists(), name
        assert (ROOT / "notebooks" / f"build_{nb.stem}.py").exists(), name
        tests = ROOT / "tests" / f"test_{name}.py"
        assert tests.exists() and name in tests.read_text(), name
        assert set(spec.inputs) <= {"x", "y"}, name
    assert set(REPORTS) == set(SYSTEMS)


#: The smallest command lines that still use each system's defaults for everything else.
SMALL = {
    "vae": ["--limit", "64", "--valid-limit", "64"],
    "vae2": ["--limit", "64", "--valid-limit", "64"],
    "cvae": ["--limit", "64", "--valid-limit", "64"],
    "pixelrnn": ["--limit", "16", "--valid-limit", "8", "--batch-size", "8"],
    "hetero": [],
    "dirichlet": [],
    "meta": ["--sequences", "256", "--valid-sequences", "64", "--test-sequences", "64"],
}


@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_every_system_trains_and_evaluates_with_its_defaults(name, tmp_path, data_dir):
    from evaluation.cli import main as eval_main
    from inference.cli import main as train_main

    out = tmp_path / name
    argv = [name, "--epochs", "1", "--out", str(out), "--data-dir", data_dir, "--quiet",
            *SMALL[name]]
    assert train_main(argv) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["system"] == name and cfg["epochs"] == 1
    assert eval_main([str(out), "--k", "1,2", "--limit", "8", "--json"]) == 0


@pytest.mark.parametrize("loss,k", [("Trace_ELBO", 2), ("TraceMeanField_ELBO", 1), ("IWAE", 2)])
def test_pixelrnn_trains_with_every_loss_its_help_offers(loss, k, tmp_path, data_dir):
    from inference.cli import main as train_main

    argv = ["pixelrnn", "--epochs", "1", "--out", str(tmp_path / "r"), "--data-dir", data_dir,
            "--quiet", "--loss", loss, "--k", str(k), "--hidden", "4", "--head", "4",
            *SMALL["pixelrnn"]]
    assert train_main(argv) == 0


def test_one_spread_formula_picks_the_same_images_everywhere():
    import torch

    from evaluation.reports.pixelrnn import spread
    from inference.data import Split

    x = torch.arange(103.0).unsqueeze(-1)
    for n in (1, 7, 50, 103, 500):
        assert torch.equal(spread(x, n), Split(x).spread(n).x)
