"""Shared fixtures: a tiny synthetic dataset and a writer for small training configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers import REPO

# Small enough for seconds per run on 2 CPU cores, large enough for several steps per epoch.
TINY_DATA = dict(classes=4, parts=6, parts_per_class=2, min_size=32, max_size=40, train_per_class=32,
                 test_per_class=8, seed=0)

BASE_CONFIG = {
    "run": {"name": "t", "seed": 0},
    "data": {"dataset": "synthetic", "img_size": 32, "num_workers": 0, "augment": "light"},
    "model": {"arch": "tiny_resnet", "tiny_width": 8, "dropout": 0.2},
    "dense": {"epochs": 2, "batch_size": 16, "eval_batch_size": 32, "eval_every_epochs": 1,
              "optim": {"lr": 0.05, "head_lr": 0.1}, "schedule": {"name": "step", "step_epochs": 1, "gamma": 0.5}},
    "engine": {"precision": "fp32", "progress": False, "log_every_steps": 1,
               "deepspeed_config": str(REPO / "configs/deepspeed/zero1.json")},
    "wandb": {"mode": "disabled"},
}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from data_prep.synthetic import generate

    return generate(tmp_path_factory.mktemp("data") / "synthetic", workers=1, **TINY_DATA)


@pytest.fixture
def write_config(tmp_path, tiny_data):
    """Write BASE_CONFIG (+ nested updates) with this test's data root and out_dir; return the path."""

    def write(name: str = "config.yaml", **updates) -> Path:
        cfg = json.loads(json.dumps(BASE_CONFIG))
        cfg["data"]["root"] = str(tiny_data)
        cfg["run"]["out_dir"] = str(tmp_path / f"runs-{Path(name).stem}")
        for section, values in updates.items():
            cfg.setdefault(section, {}).update(values)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg))
        return path

    return write


