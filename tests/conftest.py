"""Shared fixtures: a tiny synthetic dataset and a writer for small training configs."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

# numba's dispatcher finalisers raise KeyError when FFCV's JIT pipelines are garbage-collected; pytest reports
# them as warnings, some at interpreter exit after the summary line, where pyproject's filterwarnings no longer
# applies. Harmless (numba's bug, not ours): silenced here so the suite ends on its summary.
warnings.filterwarnings("ignore", message="Exception ignored in: <finalize object",
                        category=pytest.PytestUnraisableExceptionWarning)

from helpers import TINY_DATA, write_test_config

@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from data_prep.synthetic import generate

    return generate(tmp_path_factory.mktemp("data") / "synthetic", workers=1, **TINY_DATA)


@pytest.fixture
def write_config(tmp_path, tiny_data):
    """Write BASE_CONFIG (+ nested updates) with this test's data root and out_dir; return the path."""

    def write(name: str = "config.yaml", **updates) -> Path:
        return write_test_config(tmp_path / name, tiny_data, tmp_path / f"runs-{Path(name).stem}", **updates)

    return write


