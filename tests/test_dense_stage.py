"""The dense phase learns the synthetic task far above chance; with `dense.epochs=0` it is the named weights.

Both run in this process: what is tested is the stage, not the process group (tests/test_engine.py runs the
trainer with 2 processes)."""

import json

import pytest
import torch

from helpers import load_weights, run_in_process, stage_dir, write_torchvision_weights


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from data_prep.synthetic import generate

    return generate(tmp_path_factory.mktemp("small") / "synthetic", workers=1, classes=8, parts=8, parts_per_class=3,
                    min_size=48, max_size=64, train_per_class=48, test_per_class=16, seed=0)


def test_dense_phase_far_above_chance(write_config, small_data, tmp_path):
    config = write_config("dense.yaml", data={"root": str(small_data), "img_size": 48},
                          model={"arch": "tiny_resnet", "tiny_width": 16},
                          dense={"epochs": 16, "batch_size": 32, "eval_every_epochs": 4,
                                 "schedule": {"name": "cosine"}})
    run_in_process(config, stage="dense", threads=2)  # the work of two 1-thread ranks
    result = json.loads((stage_dir(tmp_path / "runs-dense") / "result.json").read_text())
    assert result["test"]["count"] == 8 * 16  # every test image evaluated exactly once
    chance = 100 / 8
    assert result["test"]["acc"] >= 3.6 * chance, result  # measured: 70.3% after 16 epochs (66.4% on 2 ranks)


def test_zero_dense_epochs_use_the_named_weights_and_evaluate_them(write_config, tiny_data, tmp_path):
    """dense.epochs=0 (the ImageNet configs): the dense model is model.weights as given, evaluated on the test set."""
    weights = tmp_path / "backbone.pt"
    backbone, head = write_torchvision_weights(weights, num_classes=4)  # the data's 4 classes
    config = write_config("pretrained.yaml", model={"weights": str(weights)}, dense={"epochs": 0})
    run_in_process(config, stage="dense")
    out = stage_dir(tmp_path / "runs-pretrained")
    result = json.loads((out / "result.json").read_text())
    assert result["epochs"] == 0 and result["weights"] == str(weights) and result["test"]["count"] == 32
    saved = load_weights(out / "model.pt")
    for key, value in backbone.state_dict().items():
        assert torch.equal(saved[f"backbone.{key}"], value), key
    assert torch.equal(saved["head.linear.weight"], head.weight.detach())
