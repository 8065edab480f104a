"""Stop signals outside training (issue 13, item 6): SIGTERM/SIGUSR1 during a non-training stage (here QPM's
statistics pass) stops at the next batch boundary with exit 75, marks nothing finished, and the rerun redoes the
stage and ends bitwise equal to an uninterrupted run. In process, one rank (the signal is sent to this process
from inside the pass, so it arrives at a known batch)."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

from helpers import run_in_process

# Four batches in the statistics pass, so a signal after the first one lands in the middle of it.
STATS = {"dense": {"epochs": 1}, "qpm": {"n_features": 6, "n_per_class": 2, "stats_batch_size": 32}}


def signal_during_pass(monkeypatch, sig: signal.Signals, after_batches: int = 1) -> None:
    """Send `sig` to this process after `after_batches` batches of the training-set pass."""
    from qpm_dist.stages import train_pass

    original = train_pass.model_outputs

    def outputs(*args, **kwargs):
        for i, item in enumerate(original(*args, **kwargs)):
            if i == after_batches:
                os.kill(os.getpid(), sig)
            yield item

    monkeypatch.setattr(train_pass, "model_outputs", outputs)


@pytest.fixture(scope="module")
def uninterrupted_stats(tmp_path_factory, tiny_data):
    from helpers import write_test_config

    tmp = tmp_path_factory.mktemp("stats-ref")
    _, ctx = run_in_process(write_test_config(tmp / "ref.yaml", tiny_data, tmp / "runs", **STATS), stage="stats")
    return ctx.outputs["stats"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_in_a_non_training_stage_exits_75_and_the_rerun_redoes_it(write_config, monkeypatch, capsys, sig,
                                                                          uninterrupted_stats):
    from qpm_dist.cli import main
    from qpm_dist.engine.preemption import PREEMPTED_EXIT_CODE

    config = write_config(**STATS)
    signal_during_pass(monkeypatch, sig)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as run_in_process and a 1-process run under torchrun: the reference's arithmetic
    try:
        assert main(["run", str(config), "--stage", "stats"]) == PREEMPTED_EXIT_CODE
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert f"stopped by {sig.name} during stage stats; no checkpoint for this stage, it restarts on rerun" in err
    assert "stopped at a checkpoint" not in err
    run_dir = config.parent / "runs-config" / "t"
    assert list(run_dir.glob("dense-*/stage.json")) and not list(run_dir.glob("stats-*/stage.json"))
    assert not list(run_dir.glob("stats-*/*.npz")), "nothing half-done is written"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handlers are gone after it

    monkeypatch.undo()
    _, ctx = run_in_process(config, stage="stats")
    for name in ("sums.npz", "constants.npz"):  # bitwise equal arrays (a zip's bytes hold its write time)
        with np.load(ctx.outputs["stats"] / name) as got, np.load(uninterrupted_stats / name) as want:
            assert got.files == want.files
            for key in want.files:
                assert got[key].dtype == want[key].dtype and got[key].tobytes() == want[key].tobytes(), (name, key)


def test_a_signal_between_stages_keeps_the_finished_ones(write_config, monkeypatch):
    """The signal lands after the last batch of the pass: the stage completes and is kept; the run stops
    before the next stage."""
    from qpm_dist.engine.preemption import Preempted

    config = write_config(**STATS)
    signal_during_pass(monkeypatch, signal.SIGTERM, after_batches=3)  # 4 batches: sent while the last is used
    with pytest.raises(Preempted, match="stopped by a stop signal before stage qpm_solve; finished stages are kept"):
        run_in_process(config, stage="qpm_solve")
    run_dir = config.parent / "runs-config" / "t"
    assert list(run_dir.glob("stats-*/stage.json")) and not list(run_dir.glob("qpm_solve-*"))


def test_a_signal_during_the_trainers_evaluation_stops_at_the_next_step_with_a_checkpoint(write_config, monkeypatch):
    """Inside a training stage the trainer owns the stop: its evaluation pass is not cut short, the next step
    checkpoints and the message names that checkpoint."""
    from qpm_dist.engine import evaluate
    from qpm_dist.engine.preemption import Preempted

    original, calls = evaluate.model_outputs, []

    def outputs(*args, **kwargs):
        calls.append(1)
        for i, item in enumerate(original(*args, **kwargs)):
            if i == 0 and len(calls) == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            yield item

    monkeypatch.setattr(evaluate, "model_outputs", outputs)
    config = write_config(dense={"epochs": 2})
    with pytest.raises(Preempted, match=r"during stage dense: stopped at a checkpoint at step 9 \(.*step_000000009\)"):
        run_in_process(config, stage="dense")
    (folder,) = (config.parent / "runs-config" / "t").glob("dense-*")
    assert sorted(p.name for p in folder.glob("checkpoints/step_*")) == ["step_000000008", "step_000000009"]


@pytest.mark.slow
def test_two_ranks_stopped_in_a_non_training_stage_exit_75_and_the_rerun_redoes_it(write_config):
    """Under torchrun with 2 ranks, each rank receiving the signal mid-pass: both leave with 75, the stage is
    not marked finished; the rerun computes it, bitwise as a run that was never stopped."""
    import shutil
    import subprocess

    from helpers import REPO, clean_env, qpm_command, run_qpm, stage_dir

    config = write_config(**STATS)
    out = config.parent / "runs-config"
    env = clean_env()
    env["PYTHONPATH"] = f"{REPO / 'tests'}:{env['PYTHONPATH']}"
    stopped = subprocess.run(qpm_command(2, "run", str(config), "--stage", "stats", "--plugin", "stop_in_pass_plugin"),
                             capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert stopped.returncode != 0
    assert stopped.stderr.count("no checkpoint for this stage, it restarts on rerun") == 2, stopped.stderr[-3000:]
    assert "exitcode  : 75" in stopped.stderr or "exitcode: 75" in stopped.stderr, stopped.stderr[-3000:]
    assert (stage_dir(out, "dense") / "stage.json").is_file() and not (stage_dir(out, "stats") / "stage.json").exists()

    resumed = run_qpm(2, "run", str(config), "--stage", "stats")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    stats = stage_dir(out, "stats")
    first = {name: dict(np.load(stats / name)) for name in ("sums.npz", "constants.npz")}
    shutil.rmtree(stats)
    again = run_qpm(2, "run", str(config), "--stage", "stats")  # never stopped, on the same dense model
    assert again.returncode == 0, again.stderr[-3000:]
    for name, arrays in first.items():
        with np.load(stats / name) as want:
            assert all(arrays[k].tobytes() == want[k].tobytes() for k in want.files), name
