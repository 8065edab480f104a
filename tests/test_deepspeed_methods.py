"""Every training stage of every method under DeepSpeed ZeRO 0, 1 and 2 with 2 processes equals DDP (issue 14,
item 1: QPM's fine-tuning crashed in `deepspeed.initialize` because the sparse head's weight was saved
non-contiguous; the DeepSpeed tests covered only the dense stage).

Tolerance: none, bitwise. On CPU (gloo, fp32) with 2 ranks DeepSpeed and DDP compute the same numbers: both
sum the two ranks' gradients (a + b == b + a) and halve them (exact for a power of two), ZeRO 1/2 only
partition where the sum happens, clipping is off in both (`DeepSpeedStrategy.resolve_config`), and the optimizer
is the same torch SGD. Measured: every model.pt equal bit for bit for ZeRO 0, 1 and 2. (On GPUs, with NCCL's
reduction order, more ranks or bf16/fp16 this no longer holds and a tolerance would be needed.)

Cost: the whole matrix (4 strategies x 3 methods) is ONE torchrun launch (tests/runs_in_one_group.py): starting
torch, DeepSpeed and the process group costs ~25 s per launch on 2 loaded cores, more than a tiny run. Measured:
28 s at load 2, 61 s at load 7 on the 2-core machine. Each strategy has its own run folder, shared by the three
methods: one dense stage per strategy (the dense key holds no method; it holds engine.strategy but not the ZeRO
config, so ZeRO 0/1/2 in one folder would reuse each other's stages). Every phase trains 1 epoch of the tiny
data; Q-SENN has 2 rounds, so round 1's features come from a model fine-tuned under the same strategy. Runs
stop after the last fine-tuning (evaluation and report do not train).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (BASE_CONFIG, REPO, assert_contiguous, assert_same_weights, clean_env, load_weights, stage_dir,
                     write_test_config)

SETTINGS = dict(
    model={"arch": "tiny_resnet", "tiny_width": 8, "norm": "group", "dropout": 0.0},
    dense={"epochs": 1},
    finetune={"epochs": 1, "batch_size": 16, "eval_batch_size": 32, "optim": {"lr": 0.01, "momentum": 0.95}},
    qpm={"n_features": 6, "n_per_class": 2, "solver": {"time_limit": 60}},
    sldd={"n_features": 6, "n_per_class": 2},
    qsenn={"n_features": 6, "n_per_class": 2, "round_epochs": [1, 1]},
    glm={"solver": "fast", "fit": {"path_points": 30}},
)
METHODS = ["qpm", "sldd", "qsenn"]
DEEPSPEED = ["zero0", "zero1", "zero2"]
LAST_TRAINING = {"qpm": "qpm_finetune", "sldd": "sldd_finetune", "qsenn": "qsenn_finetune1"}
TRAINED = {"qpm": ["dense", "qpm_finetune"], "sldd": ["dense", "sldd_finetune"],
           "qsenn": ["dense", "qsenn_finetune0", "qsenn_finetune1"]}
MODELS = {"qpm": ["dense", "qpm_sparse", "qpm_finetune"], "sldd": ["dense", "sldd_sparse", "sldd_finetune"],
          "qsenn": ["dense", "qsenn_sparse0", "qsenn_finetune0", "qsenn_sparse1", "qsenn_finetune1"]}


def strategy_engine(strategy: str) -> dict:
    """"ddp" or "zero<N>" (DeepSpeed with configs/deepspeed/zero<N>.json) as the engine section."""
    engine = dict(BASE_CONFIG["engine"], strategy="ddp" if strategy == "ddp" else "deepspeed")
    if strategy != "ddp":
        engine["deepspeed_config"] = str(REPO / "configs" / "deepspeed" / f"{strategy}.json")
    return engine


def run_in_one_launch(tmp: Path, data: Path, strategies: list[str]) -> tuple[dict[str, Path], str]:
    """Each method under each strategy, with 2 processes, up to its last fine-tuning, in one launch:
    ({strategy: run.out_dir}, the launch's log)."""
    commands, outs = [], {}
    for strategy in strategies:
        outs[strategy] = tmp / f"runs-{strategy}"
        for method in METHODS:
            config = write_test_config(tmp / f"{strategy}-{method}.yaml", data, outs[strategy], **SETTINGS,
                                       engine=strategy_engine(strategy))
            config.write_text(config.read_text() + f"method: {method}\n")
            commands.append(f"{config} --stage {LAST_TRAINING[method]}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(REPO / "tests" / "runs_in_one_group.py"), *commands]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, env=clean_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return outs, proc.stderr


def assert_equals_ddp(ddp: Path, ds: Path) -> None:
    """Every model file, every training result and the solvers' selections of the DeepSpeed run folder `ds` are
    those of the DDP run folder `ddp`, bit for bit."""
    for method in METHODS:
        for stage in MODELS[method]:
            assert_same_weights(load_weights(stage_dir(ddp, stage) / "model.pt"),
                                load_weights(stage_dir(ds, stage) / "model.pt"))
        for stage in TRAINED[method]:
            ours, theirs = (json.loads((stage_dir(out, stage) / "result.json").read_text()) for out in (ds, ddp))
            assert (ours["strategy"], theirs["strategy"], ours["world_size"]) == ("deepspeed", "ddp", 2), stage
            assert ours["global_step"] == theirs["global_step"] == 8, stage  # 128 images / 16 per step, 1 epoch
            assert ours["test"] == theirs["test"], stage  # accuracy, top-5 and loss
        # each fine-tuning trained: its model left its sparse starting point (else equality would prove little)
        for stage in TRAINED[method][1:]:
            start = load_weights(stage_dir(ds, stage.replace("finetune", "sparse")) / "model.pt")
            end = load_weights(stage_dir(ds, stage) / "model.pt")
            assert not torch.equal(start["backbone.conv1.weight"], end["backbone.conv1.weight"]), stage
    # the dense models match, so QPM's solve and SLDD/Q-SENN's selection must choose the same features
    ours, theirs = (np.load(stage_dir(out, "qpm_solve") / "result.npz") for out in (ds, ddp))
    assert ours["selected"].tolist() == theirs["selected"].tolist()
    assert np.array_equal(ours["assignment"], theirs["assignment"])
    ours, theirs = (json.loads((stage_dir(out, "glm_select") / "selection.json").read_text())["selected"]
                    for out in (ds, ddp))
    assert ours == theirs


def assert_every_saved_tensor_contiguous(out: Path) -> int:
    files = sorted(out.rglob("*.pt"))
    for path in files:
        assert_contiguous(path)
    return len(files)


def test_the_contiguity_check_finds_a_transposed_tensor_in_a_nested_file(tmp_path):
    """The check the matrix applies to every .pt: the QPM head's weight came from a transposed array."""
    path = tmp_path / "state.pt"
    torch.save({"model": {"head.weight": torch.zeros(4, 6).t()}, "optimizer": [{"step": torch.ones(2)}]}, path)
    with pytest.raises(AssertionError, match="/model/head.weight"):
        assert_contiguous(path)
    torch.save({"model": {"head.weight": torch.zeros(4, 6).t().contiguous()}}, path)
    assert_contiguous(path)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, tiny_data) -> tuple[dict[str, Path], str]:
    """QPM, SLDD and Q-SENN, each under DDP and ZeRO 0, 1 and 2, in one launch: ({strategy: run.out_dir}, log)."""
    return run_in_one_launch(tmp_path_factory.mktemp("matrix"), tiny_data, ["ddp", *DEEPSPEED])


@pytest.mark.parametrize("strategy", DEEPSPEED)
def test_every_training_stage_of_every_method_equals_ddp(matrix, strategy):
    outs, _ = matrix
    assert_equals_ddp(outs["ddp"], outs[strategy])


@pytest.mark.parametrize("strategy", ["ddp", *DEEPSPEED])
def test_the_methods_of_a_strategy_share_its_one_dense_stage(matrix, strategy):
    """The dense key holds no method: SLDD and Q-SENN reuse the dense model QPM's run trained."""
    outs, log = matrix
    dense = stage_dir(outs[strategy], "dense")  # exactly one
    assert log.count(f"stage dense: finished earlier, reusing {dense}") == 2


@pytest.mark.parametrize("strategy", DEEPSPEED)
def test_the_deepspeed_fine_tune_started_from_the_deepspeed_dense_model(matrix, strategy):
    """Not from a DDP dense model: QPM's (the first method's) fine-tune inputs chain (stage.json upstream keys)
    ends at the DeepSpeed run's own dense stage, which DeepSpeed trained (its result and its checkpoint), and
    the dense keys of DDP and DeepSpeed differ, so neither could have reused the other's dense model."""
    outs, _ = matrix
    ds = outs[strategy]
    record = lambda stage: json.loads((stage_dir(ds, stage) / "stage.json").read_text())  # noqa: E731
    # a stage's record names the key later stages see (`output_key`: its folder key plus, for training stages,
    # the epochs trained), and they record it as their input's
    assert record("qpm_finetune")["upstream"]["qpm_sparse"] == record("qpm_sparse")["output_key"]
    assert record("qpm_sparse")["upstream"]["dense"] == record("dense")["output_key"]
    dense = stage_dir(ds, "dense")
    assert json.loads((dense / "result.json").read_text())["strategy"] == "deepspeed"
    assert [p.name for p in (dense / "checkpoints").glob("step_*/mp_rank_00_model_states.pt")]  # DeepSpeed's format
    assert dense.name != stage_dir(outs["ddp"], "dense").name


def test_every_saved_tensor_is_contiguous(matrix):
    """Model files and checkpoints (DDP's state.pt, DeepSpeed's model states and every rank's ZeRO shard)."""
    outs, _ = matrix
    counts = {strategy: assert_every_saved_tensor_contiguous(out) for strategy, out in outs.items()}
    # 9 model.pt; 5 trainings with one checkpoint each: DDP 1 file, ZeRO-0 1 file, ZeRO-1/2 3 files (2 shards)
    assert counts == {"ddp": 9 + 5, "zero0": 9 + 5, "zero1": 9 + 15, "zero2": 9 + 15}, counts
