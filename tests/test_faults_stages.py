"""Fault injection into the files a finished stage hands to the next (issue 13): the dense stage's model and
result, QPM's statistics, and each stage's record (`stage.json`), each damaged in the standard ways
(tests/damage.py). The rerun must report the damaged file by name (the runner checks the sha256 recorded for
every output when the stage was marked finished) or end bitwise as without the damage; it never hands a
damaged file to the next stage."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from damage import standard_damages
from helpers import load_weights, run_in_process, write_test_config

STATS = {"dense": {"epochs": 1}, "qpm": {"n_features": 6, "n_per_class": 2, "stats_batch_size": 64}}
ARTEFACTS = [("dense", "model.pt"), ("dense", "result.json"), ("dense", "stage.json"),
             ("stats", "sums.npz"), ("stats", "constants.npz"), ("stats", "stage.json")]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_data) -> Path:
    """A config whose dense and stats stages have finished (its out_dir is copied per damage)."""
    tmp = tmp_path_factory.mktemp("faults-stages")
    config = write_test_config(tmp / "run.yaml", tiny_data, tmp / "runs", **STATS)
    run_in_process(config, stage="stats")
    return config


def same_outputs(a: Path, b: Path) -> bool:
    """Bitwise equal arrays and weights of two copies of a stage folder."""
    for file in a.iterdir():
        if file.suffix == ".npz":
            with np.load(file) as x, np.load(b / file.name) as y:
                if x.files != y.files or any(x[k].tobytes() != y[k].tobytes() for k in x.files):
                    return False
        elif file.name == "model.pt":
            wa, wb = load_weights(file), load_weights(b / file.name)
            if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
                return False
    return True


@pytest.mark.parametrize("stage, name", ARTEFACTS, ids=[f"{s}/{n}" for s, n in ARTEFACTS])
def test_a_damaged_stage_output_is_reported_by_name(finished_run, tmp_path, stage, name):
    from qpm_dist.stages.artifacts import DamagedOutput

    source = finished_run.parent / "runs"
    for i, damage in enumerate(standard_damages()):
        out = tmp_path / str(i)
        shutil.copytree(source, out)
        (target,) = out.glob(f"t/{stage}-*/{name}")
        damage.apply(target)
        try:
            _, ctx = run_in_process(finished_run, f"run.out_dir={out}", stage="stats")
        except DamagedOutput as exc:
            assert str(target) in str(exc), (damage, str(exc))
            continue
        # not detected: then it must not have mattered
        for done in ("dense", "stats"):
            (reference,) = source.glob(f"t/{done}-*")
            assert same_outputs(reference, ctx.outputs[done]), f"{damage} of {name}: silently different outputs"


def test_a_missing_output_is_reported_by_name(finished_run, tmp_path):
    from qpm_dist.stages.artifacts import DamagedOutput

    out = tmp_path / "runs"
    shutil.copytree(finished_run.parent / "runs", out)
    (model,) = out.glob("t/dense-*/model.pt")
    model.unlink()
    with pytest.raises(DamagedOutput, match=f"{model}: missing"):
        run_in_process(finished_run, f"run.out_dir={out}", stage="stats")


def test_the_cli_exits_2_naming_the_damaged_file(finished_run, tmp_path, capsys):
    from damage import flip_byte
    from qpm_dist.cli import EXIT_BAD_INPUT, main

    out = tmp_path / "runs"
    shutil.copytree(finished_run.parent / "runs", out)
    (sums,) = out.glob("t/stats-*/sums.npz")
    flip_byte(lambda size: size // 2).apply(sums)
    assert main(["run", str(finished_run), "--stage", "stats", f"run.out_dir={out}"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"qpm-dist: error: {sums}: differs from what the stage wrote" in err and "Traceback" not in err
