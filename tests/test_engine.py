"""The training engine end to end, run as users run it (subprocesses, torchrun with 2 gloo ranks)."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from helpers import (BASE_CONFIG, LONG, REPO, assert_same_weights, clean_env, load_weights, qpm_command,
                     run_in_process, run_qpm, stage_dir, wait_for_step, write_test_config)


def out_dir(config: Path) -> Path:
    return Path(yaml.safe_load(config.read_text())["run"]["out_dir"])


def train(nproc: int, config: Path, *overrides: str) -> Path:
    proc = run_qpm(nproc, "run", str(config), "--stage", "dense", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return stage_dir(out_dir(config))


def train_in_process(config: Path, *overrides: str) -> Path:
    """The dense stage of `config` in this process (what a 1-process run computes, bitwise)."""
    _, ctx = run_in_process(config, *overrides, stage="dense")
    return ctx.outputs["dense"]


def test_two_ranks_equal_one_rank_with_the_same_global_batch(write_config):
    """GroupNorm and no dropout: nothing depends on the rank split, so parameters must agree."""
    common = dict(model={"arch": "tiny_resnet", "tiny_width": 8, "norm": "group", "dropout": 0.0})
    one = train_in_process(write_config("one.yaml", **common))
    two = train(2, write_config("two.yaml", **common))
    accum = train_in_process(write_config("accum.yaml", **common), "dense.grad_accum=2")
    w1, w2, wa = (load_weights(d / "model.pt") for d in (one, two, accum))
    assert_same_weights(w1, w2, atol=1e-5)
    assert_same_weights(w1, wa, atol=1e-5)
    steps = [json.loads((d / "result.json").read_text())["global_step"] for d in (one, two, accum)]
    assert steps == [16, 16, 16]  # 128 images / global batch 16 x 2 epochs, whatever the split
    # the runs really trained: the first conv moved away from its (seeded) initialisation
    from qpm_dist.config import load_config
    from qpm_dist.stages.train import build_dense_model

    init_cfg = load_config(None, ["model.arch=tiny_resnet", "model.tiny_width=8", "model.norm=group", "qpm.n_features=6"])
    init = build_dense_model(init_cfg, 4)
    assert not torch.allclose(init.state_dict()["backbone.conv1.weight"], w1["backbone.conv1.weight"])


def epoch_train_stats(run: Path) -> list[dict]:
    """The train_* entries of every epoch record in a stage's metrics.jsonl, in epoch order."""
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = sorted((r for r in records if r["event"] == "epoch"), key=lambda r: r["epoch"])
    return [{k: v for k, v in r.items() if k.startswith("train_") or k == "epoch"} for r in epochs]


def _launch(nproc: int, config: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(qpm_command(nproc, "run", str(config), "--stage", "dense", *overrides), cwd=REPO, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _interrupt(config: Path, at_step: int, sig: signal.Signals = signal.SIGTERM, nproc: int = 1,
               *overrides: str) -> subprocess.CompletedProcess:
    """Start a run, send `sig` once it logged `at_step`, return the finished process."""
    proc = _launch(nproc, config, *overrides)
    wait_for_step(out_dir(config), "dense", at_step, proc)
    if nproc == 1:
        proc.send_signal(sig)
    else:  # a signal reaching one worker only must still stop every rank
        import psutil

        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "qpm_dist" in " ".join(p.cmdline())]
        assert len(workers) == nproc
        workers[-1].send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)



@pytest.fixture(scope="module")
def reference_one_rank(tmp_path_factory, tiny_data) -> Path:
    """An uninterrupted 1-process run of LONG (no loader workers), shared by the resume tests (in process: the
    same computation as a 1-process `qpm-dist run`, bitwise)."""
    tmp = tmp_path_factory.mktemp("ref1")
    return train_in_process(write_test_config(tmp / "ref.yaml", tiny_data, tmp / "runs-ref", **LONG))


def test_sigterm_mid_epoch_then_resume_is_bitwise_identical(write_config, reference_one_rank):
    """Interrupted and resumed with a loader worker; equal to the reference that used none (the worker
    count never changes the data)."""
    reference = reference_one_rank
    config = write_config("int.yaml", **LONG)
    stopped = _interrupt(config, 5, signal.SIGTERM, 1, "data.num_workers=1")
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    run = stage_dir(out_dir(config))
    assert not (run / "model.pt").exists()
    (ckpt,) = list((run / "checkpoints").glob("step_*"))
    meta = json.loads((ckpt / "meta.json").read_text())
    assert (f"stopped by SIGTERM during stage dense: stopped at a checkpoint at step {meta['global_step']} ({ckpt})"
            in stopped.stderr), stopped.stderr[-3000:]
    assert 5 <= meta["global_step"] < 48 and meta["step_in_epoch"] % 16 != 0, meta  # really mid-epoch
    resumed = run_qpm(1, "run", str(config), "--stage", "dense", "data.num_workers=1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed dense from {ckpt}" in resumed.stderr
    assert_same_weights(load_weights(reference / "model.pt"), load_weights(run / "model.pt"))
    steps = [json.loads(x)["global_step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["event"] == "step"]
    assert steps == list(range(1, 49))  # every step logged exactly once across the two processes
    assert epoch_train_stats(run) == epoch_train_stats(reference)  # the resumed epoch's record covers all of it


def test_resume_auto_skips_corrupt_and_partial_checkpoints(write_config, reference_one_rank):
    reference = reference_one_rank
    config = write_config("int.yaml", **LONG, engine={**yaml.safe_load(write_config("x.yaml").read_text())["engine"],
                                                      "checkpoint_every_steps": 2, "keep_checkpoints": 3})
    stopped = _interrupt(config, 12)
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    ckpts = sorted((stage_dir(out_dir(config)) / "checkpoints").glob("step_*"))
    assert len(ckpts) == 3
    newest = ckpts[-1]
    state = newest / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # torn write / disk corruption
    cut = state.stat().st_size
    (newest.parent / "step_999999999.tmp").mkdir()  # a save that never finished
    resumed = run_qpm(1, "run", str(config), "--stage", "dense")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipping damaged checkpoint {newest}: state.pt: {cut} bytes, " in resumed.stderr
    assert "skipping partial checkpoint" in resumed.stderr
    assert f"resumed dense from {ckpts[-2]}" in resumed.stderr
    assert_same_weights(load_weights(reference / "model.pt"), load_weights(stage_dir(out_dir(config)) / "model.pt"))


def test_two_ranks_signal_to_one_worker_then_resume_is_bitwise_identical(write_config, two_rank_reference):
    reference = two_rank_reference
    config = write_config("int.yaml", **LONG)
    stopped = _interrupt(config, 6, signal.SIGUSR1, 2)
    assert stopped.returncode != 0
    assert stopped.stderr.count("exitcode  : 75") == 2 or "exitcode: 75" in stopped.stderr, stopped.stderr[-3000:]
    resumed = run_qpm(2, "run", str(config), "--stage", "dense")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(load_weights(reference / "model.pt"), load_weights(stage_dir(out_dir(config)) / "model.pt"))
    assert epoch_train_stats(stage_dir(out_dir(config))) == epoch_train_stats(reference)  # each rank's sums restored


def test_deepspeed_zero1_two_ranks_trains_saves_and_resumes(write_config):
    ds = dict(engine={**yaml.safe_load(write_config("x.yaml").read_text())["engine"], "strategy": "deepspeed"})
    reference = train(2, write_config("ref.yaml", **LONG, **ds))
    result = json.loads((reference / "result.json").read_text())
    assert result["strategy"] == "deepspeed" and result["global_step"] == 48
    assert (reference / "checkpoints").glob("step_*/zero_pp_rank_1_mp_rank_00_optim_states.pt")
    config = write_config("int.yaml", **LONG, **ds)
    stopped = _interrupt(config, 6, signal.SIGUSR1, 2)
    assert stopped.returncode != 0
    run = stage_dir(out_dir(config))
    (ckpt,) = list((run / "checkpoints").glob("step_*"))
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("zero_pp")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    resumed = run_qpm(2, "run", str(config), "--stage", "dense")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(load_weights(reference / "model.pt"), load_weights(run / "model.pt"))
    assert epoch_train_stats(run) == epoch_train_stats(reference)  # the sums travel in DeepSpeed's client state
    trained = json.loads((run / "result.json").read_text())
    assert trained["test"]["acc"] > 25.0 + 15.0  # 4 classes: chance is 25%


def test_wandb_offline_resume_continues_the_same_run(write_config):
    engine = {**yaml.safe_load(write_config("x.yaml").read_text())["engine"]}
    config = write_config("wb.yaml", **LONG, engine=engine, wandb={"mode": "offline", "project": "qpm-test"})
    stopped = _interrupt(config, 4)
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    resumed = run_qpm(1, "run", str(config), "--stage", "dense", "wandb.mode=offline")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = sorted((stage_dir(out_dir(config)) / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs
    ids = {r.name.rsplit("-", 1)[1] for r in runs}
    assert len(ids) == 1, f"resumed into a different wandb run: {runs}"
    assert all(list(r.glob("run-*.wandb")) for r in runs)


def test_deepspeed_clips_gradients_only_when_the_phase_asks(tmp_path):
    """DeepSpeed clips at 1.0 by default; DDP does not clip unless <phase>.clip_grad_norm is set. Left to its
    default, DeepSpeed's first update was 0.76 of DDP's (the gradient norm was 1.31)."""
    from qpm_dist.engine.strategy import DeepSpeedStrategy

    zero1 = str(REPO / "configs" / "deepspeed" / "zero1.json")
    resolve = lambda clip: DeepSpeedStrategy.resolve_config(zero1, 8, 1, 2, "fp32", clip)  # noqa: E731
    assert resolve(None)["gradient_clipping"] == 0.0 and resolve(2.5)["gradient_clipping"] == 2.5
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 1}, "gradient_clipping": 1.0}))
    with pytest.raises(ValueError, match="remove 'gradient_clipping'"):
        DeepSpeedStrategy.resolve_config(str(own), 8, 1, 2, "fp32", None)


def test_a_finished_stage_extended_to_more_epochs_equals_the_longer_run(write_config, reference_one_rank):
    """A step schedule does not depend on the total: 2 epochs, then 3 in the same folder from its last checkpoint,
    equal bitwise to 3 epochs in one go. Fewer epochs than a folder holds are refused, naming both numbers."""
    from qpm_dist.errors import TrainedTooLong

    config = write_config("ext.yaml", **LONG)  # 3 epochs
    short = train_in_process(config, "dense.epochs=2")
    assert json.loads((short / "result.json").read_text())["global_step"] == 32
    extended = train_in_process(config)
    assert extended == short  # trained on in place
    record = json.loads((extended / "stage.json").read_text())
    assert record["summary"]["epochs"] == 3 and record["summary"]["global_step"] == 48
    assert_same_weights(load_weights(reference_one_rank / "model.pt"), load_weights(extended / "model.pt"))
    assert epoch_train_stats(extended) == epoch_train_stats(reference_one_rank)
    with pytest.raises(TrainedTooLong, match=f"dense.epochs=2: stage dense in {extended} was trained for 3 epochs"):
        train_in_process(config, "dense.epochs=2")
    (extended / "stage.json").unlink()  # as if interrupted after its last epoch: the checkpoint is past 2 epochs
    with pytest.raises(TrainedTooLong, match="dense.epochs=2: the checkpoint .* is past it .epoch 3, step 0"):
        train_in_process(config, "dense.epochs=2")


def test_a_schedule_that_depends_on_the_total_starts_fresh_and_says_why(write_config, caplog):
    config = write_config("cos.yaml", dense={**BASE_CONFIG["dense"], "schedule": {"name": "cosine"}})
    one = train_in_process(config, "dense.epochs=1")
    logger = logging.getLogger("qpm_dist")
    logger.addHandler(caplog.handler)  # also when qpm_dist's logger does not propagate (after setup_logging)
    try:
        with caplog.at_level(logging.INFO, logger="qpm_dist"):
            two = train_in_process(config, "dense.epochs=2", "dense.optim.lr=0.02")
    finally:
        logger.removeHandler(caplog.handler)
    assert two != one and json.loads((two / "result.json").read_text())["global_step"] == 16
    assert (f"stage dense: starting fresh in {two.name}; the folder {one.name} differs in dense.epochs: 1 -> 2 "
            f"(dense.schedule.name=cosine depends on the total number of epochs, so a run with other epochs cannot "
            f"be extended); dense.optim.lr: 0.05 -> 0.02") in caplog.text, caplog.text


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory, tiny_data) -> Path:
    """LONG in process, with a checkpoint at step 20 (epoch 1, step 4 of it) kept."""
    tmp = tmp_path_factory.mktemp("ckpt20")
    engine = {**BASE_CONFIG["engine"], "checkpoint_every_steps": 20, "keep_checkpoints": 5}
    return train_in_process(write_test_config(tmp / "c.yaml", tiny_data, tmp / "runs-c", **LONG, engine=engine))


def edited_checkpoint_20(run: Path, into: Path, edit) -> Path:
    """A copy of `run`'s step-20 checkpoint whose client state `edit` changed (manifest rewritten to match)."""
    from qpm_dist.engine.checkpoint import MANIFEST, record_files, write_manifest

    ckpt = Path(shutil.copytree(run / "checkpoints" / "step_000000020", into / "step_000000020"))
    state = torch.load(ckpt / "state.pt", weights_only=True)
    edit(state["client"])
    torch.save(state, ckpt / "state.pt")
    write_manifest(ckpt, record_files(ckpt, [p for p in ckpt.iterdir() if p.name != MANIFEST]))
    return ckpt


def resume_logged(config: Path, ckpt: Path, caplog) -> Path:
    logger = logging.getLogger("qpm_dist")
    logger.addHandler(caplog.handler)  # also when qpm_dist's logger does not propagate (after setup_logging)
    try:
        with caplog.at_level(logging.INFO, logger="qpm_dist"):
            return train_in_process(config, f"run.resume={ckpt}")
    finally:
        logger.removeHandler(caplog.handler)


def test_a_checkpoint_without_metric_sums_still_resumes_and_says_what_the_epoch_record_covers(
        write_config, checkpointed_run, tmp_path, caplog):
    """Checkpoints written before the metric sums were saved: the resume works, with a note."""
    ckpt = edited_checkpoint_20(checkpointed_run, tmp_path, lambda client: client.pop("metric_sums"))
    resumed = resume_logged(write_config("old.yaml", **LONG), ckpt, caplog)
    assert ("dense: the checkpoint holds no metric sums of the interrupted epoch 1: its train_* record covers only "
            "the 12 steps after the resume") in caplog.text
    assert_same_weights(load_weights(checkpointed_run / "model.pt"), load_weights(resumed / "model.pt"))
    assert [r["epoch"] for r in epoch_train_stats(resumed)] == [1, 2]


def test_metric_sums_of_two_ranks_resumed_by_one_give_the_same_epoch_record(write_config, checkpointed_run, tmp_path):
    """Another world size: rank 0 carries every saved rank's sums, equal up to float64 summation order."""
    def as_two_ranks(client):
        (one,) = client["metric_sums"]
        halves = []
        for share in (0.25, 0.75):
            halves.append({part: {"sums": {n: v * share for n, v in one[part]["sums"].items()},
                                  "count": one[part]["count"] * share} for part in ("epoch", "window")})
        client["metric_sums"] = halves

    ckpt = edited_checkpoint_20(checkpointed_run, tmp_path, as_two_ranks)
    resumed = train_in_process(write_config("two.yaml", **LONG), f"run.resume={ckpt}")
    (expected,), (got,) = ([r for r in epoch_train_stats(run) if r["epoch"] == 1] for run in (checkpointed_run, resumed))
    assert got == pytest.approx(expected, rel=1e-12, abs=0)
