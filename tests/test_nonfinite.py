"""Non-finite training (issue 13, item 2): a diverging phase stops at once with a clear error (exit 3) and saves
nothing; `engine.skip_nonfinite_steps` skips such steps up to a bound; the runner never marks a stage finished
whose weights or results are NaN/inf. In process, one rank: the rank-consistency of the decision comes from the
all-reduced metric window and `dist.any_rank`, the same code paths with one rank."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import load_weights, run_in_process

# One epoch of 8 steps is enough to diverge (lr 1e6 overflows the weights within three steps).
SHORT = {"dense": {"epochs": 1}}
DIVERGE = ("dense.optim.lr=1000000.0", "dense.optim.head_lr=1000000.0")


def nan_loss_at(monkeypatch, calls: set[int]) -> None:
    """Make the classification task's loss NaN at these micro-batch calls (1-based), as a bad batch would."""
    from qpm_dist.engine import task

    original, seen = task.ClassificationTask.step, {"n": 0}

    def step(self, batch, strategy):
        loss, logs = original(self, batch, strategy)
        seen["n"] += 1
        if seen["n"] in calls:
            loss = loss * float("nan")
        return loss, logs

    monkeypatch.setattr(task.ClassificationTask, "step", step)


def test_a_diverging_phase_stops_with_a_clear_error_and_saves_nothing(write_config):
    from qpm_dist.engine.trainer import NonFiniteError

    config = write_config(**SHORT)
    message = r"dense \(stage dense\): non-finite training .*loss=nan.*dense\.optim\.lr"
    with pytest.raises(NonFiniteError, match=message):
        run_in_process(config, *DIVERGE, stage="dense")
    (folder,) = (config.parent / "runs-config" / "t").glob("dense-*")
    assert not (folder / "stage.json").exists() and not (folder / "model.pt").exists()
    assert not list(folder.glob("checkpoints/step_*")), "a diverged model must not be checkpointed"


def test_cli_exits_3_with_one_line_for_a_diverging_run(write_config, capsys):
    from qpm_dist.cli import EXIT_NONFINITE, main

    code = main(["run", str(write_config(**SHORT)), "--stage", "dense", *DIVERGE])
    err = capsys.readouterr().err
    assert code == EXIT_NONFINITE == 3
    assert "qpm-dist: error: dense (stage dense): non-finite training" in err and "Traceback" not in err


@pytest.mark.parametrize("accum, skipped", [(1, [0, 0, 1, 1, 1, 1, 1, 1]), (2, [0, 1, 1, 1, 1, 1, 1, 1])])
def test_one_nan_loss_stops_by_default_and_is_skipped_when_allowed(write_config, monkeypatch, accum, skipped):
    """The third micro-batch's loss is NaN: step 3, or with 2 micro-batches per step step 2, is dropped."""
    from qpm_dist.engine.trainer import NonFiniteError

    nan_loss_at(monkeypatch, {3})
    with pytest.raises(NonFiniteError, match="non-finite training"):
        run_in_process(write_config("stop.yaml", **SHORT), f"dense.grad_accum={accum}", stage="dense")

    monkeypatch.undo()
    nan_loss_at(monkeypatch, {3})
    records, ctx = run_in_process(write_config("skip.yaml", **SHORT), "engine.skip_nonfinite_steps=2",
                                  f"dense.grad_accum={accum}", stage="dense")
    result = records["dense"]["summary"]
    assert result["skipped_steps"] == 1 and result["global_step"] == 8  # the data position still moves on
    assert math.isfinite(result["test"]["loss"])
    weights = load_weights(ctx.outputs["dense"] / "model.pt")  # a step applied with NaN gradients would be NaN
    assert all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point())
    steps = [json.loads(x) for x in (ctx.outputs["dense"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in steps if r["event"] == "step"] == skipped


def test_skipping_more_steps_than_allowed_stops_the_run(write_config, monkeypatch):
    from qpm_dist.engine.trainer import NonFiniteError

    nan_loss_at(monkeypatch, {2, 4, 6})
    with pytest.raises(NonFiniteError, match=r"3 steps skipped, more than engine\.skip_nonfinite_steps=2"):
        run_in_process(write_config(**SHORT), "engine.skip_nonfinite_steps=2", stage="dense")


@pytest.mark.parametrize("overrides, pattern", [
    (["engine.skip_nonfinite_steps=-1"], r"engine\.skip_nonfinite_steps: expected an integer >= 0"),
    (["engine.skip_nonfinite_steps=3", "engine.strategy=deepspeed"], r"not supported with engine\.strategy=deepspeed"),
])
def test_skip_setting_is_checked(overrides, pattern):
    from qpm_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)
