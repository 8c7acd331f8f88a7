"""Seeded tests (as in Pyro's own tests/conftest.py); data from $GENLAB_DATA or ../shared/data."""

import os
from pathlib import Path

import pyro
import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    env = os.environ.get("GENLAB_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data"


def pytest_configure(config):
    os.environ.setdefault("GENLAB_SMOKE", "1")


@pytest.fixture(autouse=True)
def seeded(tmp_path_factory, monkeypatch):
    """Every test starts from seed 0, an empty param store, and a private cache folder."""
    cache = tmp_path_factory.getbasetemp() / "genlab-cache"
    monkeypatch.setenv("GENLAB_CACHE", str(cache))
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def data_dir() -> str:
    d = shared_data()
    if not (d / "MNIST" / "raw").exists():
        pytest.skip(f"MNIST is not at {d}; set GENLAB_DATA")
    return str(d)
