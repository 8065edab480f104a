"""Progress reporting (issue 18, item 5): engine.progress=false silences every pass; in a log file (stderr not a
terminal) progress comes as occasional lines, never as a bar's carriage returns; on a terminal it is a bar."""

from __future__ import annotations

import io
import re

import pytest
import torch

from helpers import run_in_process
from qpm_dist import utils

FEW_BATCHES = {"dense": {"epochs": 1}, "qpm": {"n_features": 6, "n_per_class": 2, "stats_batch_size": 16}}


def test_progress_false_silences_the_training_and_statistics_passes(write_config, capfd, caplog):
    config = write_config(**FEW_BATCHES, engine={"progress": False})
    with caplog.at_level("INFO", logger="qpm_dist"):
        run_in_process(config, stage="stats")
    err = capfd.readouterr().err
    assert "stats: train" not in err and "\r" not in err and "%|" not in err, err[-2000:]
    assert not [r for r in caplog.records if re.search(r"\d+/\d+ (batches|steps)", r.getMessage())]


def test_in_a_log_file_progress_is_lines_without_carriage_returns(write_config, capfd, caplog, monkeypatch):
    monkeypatch.setattr(utils, "PROGRESS_EVERY_S", 0.0, raising=False)  # a line per batch, so this tiny run shows some
    config = write_config(**FEW_BATCHES, engine={"progress": True})
    with caplog.at_level("INFO", logger="qpm_dist"):
        run_in_process(config, stage="stats")
    err = capfd.readouterr().err  # pytest's capture is not a terminal, like a SLURM log file
    assert "\r" not in err and "%|" not in err, err[-2000:]
    lines = [r.getMessage() for r in caplog.records]
    assert any(re.fullmatch(r"stats: train: 8/8 batches, 100%, [\d.]+ it/s, eta 0 s", m) for m in lines), lines
    assert any(re.match(r"dense epoch 1/1: \d+/8 steps, \d+%", m) for m in lines), lines


def test_every_model_pass_of_a_run_reports_labelled_progress(write_config, tmp_path, caplog, monkeypatch):
    """Issue 14 item 10: the dense model's evaluation with dense.epochs=0, the evaluation after a training epoch,
    the metrics' part localisation and the report's example images and class figures each say what they count
    (they ran silently: minutes on ImageNet with nothing in the log)."""
    from qpm_dist.config import ModelConfig
    from qpm_dist.models.backbones import build_backbone

    monkeypatch.setattr(utils, "PROGRESS_EVERY_S", 0.0, raising=False)
    weights = tmp_path / "backbone.pt"
    torch.save(build_backbone("tiny_resnet", ModelConfig().reduced_strides, "batch", 8).state_dict(), weights)
    config = write_config(**{**FEW_BATCHES, "dense": {"epochs": 0}}, model={"weights": str(weights)},
                          finetune={"epochs": 1}, engine={"progress": True})
    with caplog.at_level("INFO", logger="qpm_dist"):
        run_in_process(config)
    lines = [r.getMessage() for r in caplog.records]
    for expected in [r"dense \(model.weights\): test set: 1/1 batches, 100%.*",
                     r"finetune epoch 1/1: test set: 1/1 batches, 100%.*",
                     r"metrics: part localisation: 1/1 batches, 100%.*",
                     r"report: example images: 32/64 images, 50%.*",  # 8 test images of the 16 wanted per class
                     r"report: class figures: 4/4 classes, 100%.*"]:
        assert any(re.fullmatch(expected, m) for m in lines), (expected, [m for m in lines if ": " in m])


def test_progress_lines_are_occasional_and_a_terminal_gets_a_bar():
    emitted = []
    lines = utils.ProgressLines(100, "metrics: test set", every_s=3600, emit=emitted.append)
    for _ in range(100):
        lines.update()
    assert emitted == []  # a fast pass in a log file: no line at all
    lines = utils.ProgressLines(None, "features: train", every_s=0, emit=emitted.append)
    lines.set_postfix({"loss": "0.5"})
    lines.update(3)
    assert re.fullmatch(r"features: train: 3 batches, [\d.]+ it/s, loss 0.5", emitted[-1])

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    from tqdm import tqdm

    terminal = Terminal()
    bar = utils.progress(5, "stats: train", stream=terminal)
    assert isinstance(bar, tqdm)
    bar.update(5)
    bar.close()
    assert "\r" in terminal.getvalue()
    with utils.progress_enabled(False):
        assert not isinstance(utils.progress(5, "stats: train", stream=terminal), (tqdm, utils.ProgressLines))
    assert isinstance(utils.progress(5, "x", stream=io.StringIO()), utils.ProgressLines)


@pytest.mark.parametrize("fmt", ["wds", pytest.param("ffcv", marks=pytest.mark.slow)])  # ffcv: ~10 s
def test_a_conversion_into_a_log_file_draws_no_bar(tiny_data, tmp_path, capfd, monkeypatch, fmt):
    from data_helpers import data_prep

    if fmt == "ffcv":
        pytest.importorskip("ffcv")
    monkeypatch.setattr(utils, "PROGRESS_EVERY_S", 0.0, raising=False)
    assert data_prep(f"to-{fmt}", tmp_path / fmt, "--dataset", "synthetic", "--root", tiny_data, "--workers", "1") == 0
    err = capfd.readouterr().err  # not --quiet, but stderr is not a terminal
    assert "\r" not in err and "%|" not in err, err[-2000:]
    assert f"to-{fmt} train: " in err
