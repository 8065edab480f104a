"""Shared fixtures: a tiny synthetic dataset and a writer for small training configs."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

# numba's dispatcher finalisers raise KeyError when FFCV's JIT pipelines are garbage-collected; pytest reports
# them as warnings, some at interpreter exit after the summary line, where pyproject's filterwarnings no longer
# applies. Harmless (numba's bug, not ours): silenced here so the suite ends on its summary.
warnings.filterwarnings("ignore", message="Exception ignored in: <finalize object",
                        category=pytest.PytestUnraisableExceptionWarning)

from helpers import LONG, REPO, TINY_DATA, clean_env, stage_dir, write_test_config

@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from data_prep.synthetic import generate

    return generate(tmp_path_factory.mktemp("data") / "synthetic", workers=1, **TINY_DATA)


@pytest.fixture(scope="session")
def tiny_ffcv(tiny_data, tmp_path_factory) -> Path:
    """tiny_data converted to FFCV once per session (seconds of work), for the tests that only read it."""
    from data_helpers import convert

    return convert("ffcv", tiny_data, tmp_path_factory.mktemp("conv") / "ffcv")


@pytest.fixture(scope="session")
def fake_imagenet(tmp_path_factory) -> Path:
    """ImageNet's official layout (tests/fake_imagenet.py), written once per session: treat as read-only."""
    from fake_imagenet import make_fake_imagenet

    return make_fake_imagenet(tmp_path_factory.mktemp("imagenet") / "official")


@pytest.fixture(scope="session")
def fake_imagenet_kaggle(tmp_path_factory) -> Path:
    """The same images in Kaggle's layout (LOC_val_solution.csv, LOC_synset_mapping.txt), read-only."""
    from fake_imagenet import make_fake_imagenet

    return make_fake_imagenet(tmp_path_factory.mktemp("imagenet") / "kaggle", layout="kaggle")


@pytest.fixture
def write_config(tmp_path, tiny_data):
    """Write BASE_CONFIG (+ nested updates) with this test's data root and out_dir; return the path."""

    def write(name: str = "config.yaml", **updates) -> Path:
        return write_test_config(tmp_path / name, tiny_data, tmp_path / f"runs-{Path(name).stem}", **updates)

    return write




@pytest.fixture(scope="session")
def two_rank_reference(tmp_path_factory, tiny_data) -> Path:
    """The dense stage of LONG, uninterrupted, on one node with 2 processes, started the way SLURM starts it
    (`qpm-dist launch --run`) with tests/rank_weights_entry.py, which also saves every rank's parameters
    (`weights.rank<R>.pt`). The reference of the engine's and the multi-node tests' resume checks."""
    directory = tmp_path_factory.mktemp("reference")
    config = write_test_config(directory / "ref.yaml", tiny_data, directory / "runs-ref", **LONG)
    cmd = [sys.executable, "-m", "qpm_dist", "launch", "--run", "--script", str(REPO / "tests" / "rank_weights_entry.py"),
           "--nproc-per-node", "2", str(config), "--stage", "dense"]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = stage_dir(directory / "runs-ref")
    assert json.loads((run / "result.json").read_text())["global_step"] == 48
    return run
