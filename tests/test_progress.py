"""Progress reporting (issue 18, item 5): engine.progress=false silences every pass; in a log file (stderr not a
terminal) progress comes as occasional lines, never as a bar's carriage returns; on a terminal it is a bar."""

from __future__ import annotations

import io
import re

import pytest

from helpers import run_in_process, write_torchvision_weights
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
    monkeypatch.setattr(utils, "PROGRESS_EVERY_S", 0.0, raising=False)
    weights = tmp_path / "backbone.pt"
    write_torchvision_weights(weights, num_classes=4)
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


@pytest.mark.parametrize("fmt", ["wds", "ffcv"])
def test_conversion_and_verify_say_what_their_progress_counts(tiny_data, tmp_path, capfd, monkeypatch, fmt):
    """Issue 14 item 10: to-ffcv drew FFCV's bar without a label (in a log file: nothing between its two lines),
    to-wds's and verify's bars did not say what they count, and verify on FFCV showed 0 % while its worker
    processes imported FFCV (31 s) and said nothing while hashing a .beton: a line comes at once, the hash counts
    MiB, and the workers import when the pool starts."""
    from data_helpers import data_prep

    if fmt == "ffcv":
        pytest.importorskip("ffcv")
    monkeypatch.setattr(utils, "PROGRESS_EVERY_S", 0.0, raising=False)  # a line per update
    out = tmp_path / fmt
    assert data_prep(f"to-{fmt}", out, "--dataset", "synthetic", "--root", tiny_data, "--workers", "1") == 0
    assert data_prep("verify", out, "--workers", "1") == 0
    err = capfd.readouterr().err.splitlines()
    assert "\r" not in "".join(err)
    for expected in [rf"to-{fmt} train: images converted: 128/128 img, 100%.*",
                     rf"to-{fmt} test: images converted: 32/32 img, 100%.*",
                     r"verify train: images decoded: 128/128 img, 100%.*",
                     *([r"verify train: sha256 of train.beton: \d+/\d+ MiB, 100%.*"] if fmt == "ffcv" else [])]:
        assert any(re.fullmatch(expected, line) for line in err), (expected, err)
    first_of_verify = next(line for line in err if line.startswith("verify"))
    importing = "importing FFCV, " if fmt == "ffcv" else ""
    assert first_of_verify == f"verify: {out} ({fmt}): {importing}reading the source labels", err


def test_verify_workers_import_when_the_pool_starts_and_the_wait_is_counted(tiny_data, tmp_path, capfd,
                                                                             monkeypatch):
    """The FFCV 0 % wait: verify's pool gets `import_checkers` as initializer (the imports overlap the main
    process's work instead of delaying the first image), and the first tasks wait for the workers' imports
    with a labelled count. A stand-in pool (threads' queue, the initializer run once per worker) records how
    it was made; a missing FFCV neither raises in the initializer nor withholds its token."""
    import builtins
    import queue

    from data_helpers import convert, data_prep
    from data_prep import verify

    made = []

    class RecordingPool:
        def __init__(self, processes, initializer=None, initargs=()):
            made.append((processes, initializer, initargs[:1]))
            for _ in range(processes if initializer is not None else 0):
                initializer(*initargs)

        imap = staticmethod(map)

        def terminate(self):
            pass

    class Context:
        Pool, Queue = RecordingPool, queue.Queue

    out = convert("wds", tiny_data, tmp_path / "wds")
    monkeypatch.setattr(utils, "PROGRESS_EVERY_S", 0.0, raising=False)
    monkeypatch.setattr(verify.multiprocessing, "get_context", lambda method: Context())
    assert data_prep("verify", out, "--workers", "2") == 0
    assert made == [(2, verify.import_checkers, ("wds",))]
    err = capfd.readouterr().err.splitlines()
    assert err[0] == f"verify: {out} (wds): starting 2 worker processes, reading the source labels", err
    assert re.fullmatch(r"verify: worker processes that imported torch: 2/2 workers, 100%.*", err[2]), err

    real_import = builtins.__import__

    def no_ffcv(name, *args, **kwargs):
        if name.startswith("ffcv"):
            raise ImportError("no ffcv here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ffcv)
    ready = queue.Queue()
    verify.import_checkers("ffcv", ready)
    assert ready.get_nowait() is True
