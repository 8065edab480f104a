"""Fault injection for checkpoints (issue 13, item 7): every file of a DDP and of a DeepSpeed checkpoint is
damaged at several offsets (tests/damage.py); `resume=auto` must skip the damaged checkpoint with a warning
naming the file, and the resumed run must end bitwise equal to an uninterrupted one.

One saved run per strategy is the source of every damaged copy and also the uninterrupted reference (saving
checkpoints does not change training). Choosing the checkpoint is checked in process for every damage (cheap:
no training); one resume per strategy then shows that resuming from the fallback ends bitwise equal.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from damage import damaged_copies, flip_byte, truncate
from helpers import BASE_CONFIG, assert_same_weights, load_weights, run_in_process, run_qpm, stage_dir, write_test_config
from qpm_dist.engine.checkpoint import MANIFEST, META, CheckpointManager

# 1 epoch of 16 steps, a checkpoint every 4 steps, the newest 2 kept: step_000000016 (the epoch's end) and
# step_000000012 (mid-epoch) remain
DDP_RUN = dict(dense={"epochs": 1, "batch_size": 8},
               engine={**BASE_CONFIG["engine"], "checkpoint_every_steps": 4, "keep_checkpoints": 2})
# the same with DeepSpeed (2 processes; ZeRO-1 shards the optimizer: one optimizer file per rank)
DS_RUN = dict(dense=DDP_RUN["dense"], engine={**DDP_RUN["engine"], "strategy": "deepspeed"})

DDP_FILES = ["state.pt", META, MANIFEST]
DS_FILES = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt", META, MANIFEST]


@pytest.fixture
def warnings_of_qpm(caplog):
    """caplog, also when the qpm_dist logger does not propagate to the root logger (after `setup_logging`)."""
    logger = logging.getLogger("qpm_dist")
    if logger.propagate:
        yield caplog
        return
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


def _rerunnable(stage: Path) -> None:
    """Make a finished stage folder look interrupted: its checkpoints stay, its results go."""
    for name in ("stage.json", "model.pt", "result.json"):
        (stage / name).unlink(missing_ok=True)


def _assert_falls_back(checkpoints: Path, damaged: str, caplog) -> None:
    """resume=auto (in process) skips the newest checkpoint, naming the damaged file, and takes the previous one."""
    newest, previous = CheckpointManager(checkpoints, keep=2).complete()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qpm_dist"):
        chosen = CheckpointManager(checkpoints, keep=2).find_resumable()
    assert chosen == previous
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping damaged checkpoint")]
    assert len(skipped) == 1 and str(newest) in skipped[0] and f": {damaged}: " in skipped[0], skipped


def _assert_every_damage_detected(checkpoints: Path, files: list[str], tmp_path: Path, caplog) -> None:
    for name in files:
        for damage, copy in damaged_copies(checkpoints, tmp_path / name.replace(".", "_")):
            newest = CheckpointManager(copy, keep=2).complete()[0]
            damage.apply(newest / name)
            try:
                _assert_falls_back(copy, name, caplog)
            except AssertionError as exc:
                raise AssertionError(f"{name}, {damage}: {exc}") from None
            shutil.rmtree(copy)


# ------------------------------------------------------------------------------------------------- DDP
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_data) -> Path:
    """A finished 1-process DDP run with two checkpoints left (in process: bitwise a 1-process run)."""
    tmp = tmp_path_factory.mktemp("ddp")
    _, ctx = run_in_process(write_test_config(tmp / "ddp.yaml", tiny_data, tmp / "runs", **DDP_RUN), stage="dense")
    stage = ctx.outputs["dense"]
    assert [p.name for p in CheckpointManager(stage / "checkpoints", 2).complete()] == ["step_000000016",
                                                                                        "step_000000012"]
    return stage


def test_ddp_every_damaged_file_is_skipped_naming_it(ddp_run, tmp_path, warnings_of_qpm):
    _assert_every_damage_detected(ddp_run / "checkpoints", DDP_FILES, tmp_path, warnings_of_qpm)


def test_ddp_resume_past_a_damaged_checkpoint_is_bitwise_identical(ddp_run, tiny_data, tmp_path, warnings_of_qpm):
    run = tmp_path / "runs"
    shutil.copytree(ddp_run.parents[1], run)
    stage = stage_dir(run)
    _rerunnable(stage)
    flip_byte(lambda size: size // 2).apply(stage / "checkpoints" / "step_000000016" / "state.pt")
    with warnings_of_qpm.at_level(logging.INFO, logger="qpm_dist"):
        run_in_process(write_test_config(tmp_path / "ddp.yaml", tiny_data, run, **DDP_RUN), stage="dense")
    messages = [r.getMessage() for r in warnings_of_qpm.records]
    assert any(m.startswith(f"resumed dense from {stage / 'checkpoints' / 'step_000000012'}") for m in messages)
    assert_same_weights(load_weights(ddp_run / "model.pt"), load_weights(stage / "model.pt"))


def test_every_checkpoint_damaged_starts_fresh_saying_why(ddp_run, tmp_path, warnings_of_qpm):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(ddp_run / "checkpoints", checkpoints)
    truncate(0).apply(checkpoints / "step_000000016" / MANIFEST)
    (checkpoints / "step_000000012" / "state.pt").unlink()
    (checkpoints / "step_000000020.tmp").mkdir()
    with warnings_of_qpm.at_level(logging.WARNING, logger="qpm_dist"):
        assert CheckpointManager(checkpoints, keep=2).find_resumable() is None
    (fresh,) = [r.getMessage() for r in warnings_of_qpm.records if "starting fresh" in r.getMessage()]
    assert fresh.startswith(f"starting fresh: every checkpoint in {checkpoints} is damaged (")
    for reason in ("step_000000020.tmp: its save did not finish", f"step_000000016: {MANIFEST}: unreadable",
                   "step_000000012: state.pt: missing"):
        assert reason in fresh, fresh


def test_ranks_share_the_hashing_and_together_find_every_changed_byte(ddp_run, tmp_path):
    """damage_of(rank, world) hashes every world-th file: over all ranks each file once (the manager gathers
    the ranks' findings, so every rank sees all of them)."""
    from qpm_dist.engine.checkpoint import damage_of

    for name in ("state.pt", META):
        checkpoint = tmp_path / name / "step_000000016"
        shutil.copytree(ddp_run / "checkpoints" / "step_000000016", checkpoint)
        flip_byte(lambda size: size // 2).apply(checkpoint / name)
        found = [damage_of(checkpoint, rank, 2) for rank in range(2)]
        assert sorted(len(f) for f in found) == [0, 1] and f"{name}: sha256 differs" in sum(found, [])[0], found
        assert len(damage_of(checkpoint)) == 1  # one process hashes everything


def test_explicit_resume_of_a_damaged_checkpoint_names_the_file(ddp_run, tmp_path):
    checkpoint = tmp_path / "step_000000016"
    shutil.copytree(ddp_run / "checkpoints" / "step_000000016", checkpoint)
    truncate(lambda size: size - 1).apply(checkpoint / "state.pt")
    with pytest.raises(ValueError, match=r"run.resume: checkpoint .*step_000000016 is damaged: state.pt: \d+ bytes"):
        CheckpointManager(tmp_path, keep=2).require_intact(checkpoint)


def test_run_with_a_damaged_resume_checkpoint_exits_2_naming_the_file(ddp_run, tiny_data, tmp_path, capsys):
    from qpm_dist.cli import main

    checkpoint = tmp_path / "step_000000016"
    shutil.copytree(ddp_run / "checkpoints" / "step_000000016", checkpoint)
    flip_byte(lambda size: size // 2).apply(checkpoint / "state.pt")
    config = write_test_config(tmp_path / "ddp.yaml", tiny_data, tmp_path / "runs", **DDP_RUN)
    assert main(["run", str(config), "--stage", "dense", f"run.resume={checkpoint}"]) == 2
    err = capsys.readouterr().err
    assert f"qpm-dist: error: run.resume: checkpoint {checkpoint} is damaged: state.pt: sha256 differs" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------------- DeepSpeed
@pytest.mark.slow
def test_deepspeed_damaged_shards_are_skipped_and_resume_is_bitwise_identical(tiny_data, tmp_path, warnings_of_qpm):
    """Two 2-process runs (1-3 minutes on 2 busy cores): the saved reference, then one resume past a damaged
    ZeRO shard of rank 1 (the issue: only the model states were checked, so it was chosen, then failed on every
    rerun). The damage keeps the size, and the shard is one that rank 1 hashes (every 2nd file in name order):
    rank 0 alone would find nothing, so this also shows that the ranks agree on the verdict."""
    config = write_test_config(tmp_path / "ds.yaml", tiny_data, tmp_path / "runs", **DS_RUN)
    proc = run_qpm(2, "run", str(config), "--stage", "dense")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage = stage_dir(tmp_path / "runs")
    checkpoints = stage / "checkpoints"
    assert [p.name for p in CheckpointManager(checkpoints, 2).complete()] == ["step_000000016", "step_000000012"]
    reference = load_weights(stage / "model.pt")

    pristine = tmp_path / "pristine"
    shutil.copytree(checkpoints, pristine, ignore=shutil.ignore_patterns("*.py"))  # zero_to_fp32.py & co.
    _assert_every_damage_detected(pristine, DS_FILES, tmp_path / "copies", warnings_of_qpm)

    _rerunnable(stage)
    flip_byte(lambda size: size // 2).apply(checkpoints / "step_000000016" / DS_FILES[2])
    resumed = run_qpm(2, "run", str(config), "--stage", "dense")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipping damaged checkpoint {checkpoints / 'step_000000016'}: {DS_FILES[2]}: " in resumed.stderr
    assert f"resumed dense from {checkpoints / 'step_000000012'}" in resumed.stderr
    assert_same_weights(reference, load_weights(stage / "model.pt"))


class _RunsCode:
    """A pickle that, when unpickled without weights_only, creates the file `marker` (stands for any code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_deepspeed_checkpoint_files_are_read_without_unpickling_code(tmp_path):
    """A manifest is not a signature: a file planted together with a matching manifest must still not run code.
    DeepSpeed's own engine loads with weights_only=False; ours refuses, naming the file."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    from qpm_dist.engine.deepspeed_checkpoints import use_weights_only_checkpoints

    marker, planted = tmp_path / "code_ran", tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": _RunsCode(marker)}, planted)
    engine = SimpleNamespace(checkpoint_engine=TorchCheckpointEngine(), _config=None)
    reader = use_weights_only_checkpoints(engine)
    assert engine.checkpoint_engine is reader
    with pytest.raises(ValueError, match=f"{planted}: refused to load"):
        reader.load(str(planted), map_location="cpu")
    assert not marker.exists()
    torch.save({"module": {"w": torch.ones(2)}, "global_steps": 3}, planted)  # tensors and plain data load
    assert reader.load(str(planted), map_location="cpu")["global_steps"] == 3


def test_a_file_that_cannot_be_read_is_reported_not_raised(ddp_run, tmp_path, monkeypatch):
    """An I/O error while hashing (a bad sector) must become this rank's finding: raised, it would leave the
    other ranks waiting for its verdict."""
    from qpm_dist.engine import checkpoint

    def bad_sector(path):
        raise OSError(5, "Input/output error", str(path))

    shutil.copytree(ddp_run / "checkpoints" / "step_000000016", tmp_path / "step_000000016")
    monkeypatch.setattr(checkpoint, "file_sha256", bad_sector)
    assert checkpoint.damage_of(tmp_path / "step_000000016") == [f"{META}: unreadable (Input/output error)"]
