"""Shared fixtures: one Spark session per test run, the smoke experiment, reference data."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_REFERENCE = ROOT.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def spark():
    from fedlab.spark import get_spark

    session = get_spark(app_name="fedlab-tests")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not SHARED_REFERENCE.is_dir():
        pytest.skip(f"reference data not found at {SHARED_REFERENCE} (only present beside the project checkout)")
    return SHARED_REFERENCE


@pytest.fixture()
def smoke_experiment(tmp_path: Path):
    """The smoke config with its data and reports redirected into a temporary folder."""
    from fedlab.config import load_experiment

    configs = tmp_path / "configs"
    configs.mkdir()
    shutil.copy(ROOT / "configs" / "smoke.yaml", configs / "smoke.yaml")
    return load_experiment(configs / "smoke.yaml")


@pytest.fixture(scope="module")
def tff():
    """TFF with fedlab's seeds, op determinism and exit hook; seeded again for every test module."""
    from fedlab.tffctx import init_tff

    return init_tff(0)
