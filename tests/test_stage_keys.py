"""Stage keys hold exactly what changes a stage's output (the rule in qpm_dist/stages/runner.py), for every stage
of every method: computed from configs, nothing trained."""

from __future__ import annotations

import pytest

from qpm_dist import dist, methods
from qpm_dist.config import load_config
from qpm_dist.stages.runner import RunContext, output_key, stage_key


class FakeData:
    fingerprint = "fake-dataset-1"


def keys(method: str, *overrides: str) -> dict[str, tuple[str, str]]:
    """{stage: (folder key, key later stages see)} of `method` under the default config + overrides."""
    cfg = load_config(None, [f"method={method}", *overrides])
    ctx = RunContext(cfg=cfg, info=dist.init("cpu"), run_dir=None, data=FakeData())
    found = {}
    for stage in methods.get(method).stages(cfg):
        key = stage_key(stage, ctx)
        ctx.keys[stage.name] = output_key(stage, key, cfg)
        found[stage.name] = (key, ctx.keys[stage.name])
    return found


METHODS = ("qpm", "sldd", "qsenn")

# Fields that change no stage's output: evaluation batch sizes and cadence of training phases (BatchNorm
# evaluates with running statistics; later stages read only the weights), the loader's workers and page cache,
# the digest check, WebDataset settings on the folder backend, logging, progress, checkpoints, resume, wandb;
# which state dict of a weights file is read when there is none; val_classes (the fingerprint covers its effect).
NO_EFFECT = ["dense.eval_batch_size=7", "finetune.eval_batch_size=7", "dense.eval_every_epochs=3",
             "finetune.eval_every_epochs=3", "data.ffcv_os_cache=false", "data.digests=off", "data.num_workers=5",
             "data.wds_mode=resampled", "data.wds_shuffle_buffer=17", "engine.progress=false",
             "engine.log_every_steps=3", "engine.checkpoint_every_steps=9", "engine.keep_checkpoints=4",
             "engine.timeout_s=60", "run.resume=never", "wandb.mode=offline", "wandb.project=other",
             "model.weights_key=model_ema", "data.val_classes=train"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("override", NO_EFFECT)
def test_fields_that_change_no_output_leave_every_key_unchanged(method, override):
    assert keys(method, override) == keys(method)


# Fields that change the dense stage's output, hence every stage's key.
CHANGES_DENSE = ["dense.optim.lr=0.1", "data.augment=none", "data.decoder=pil", "data.on_corrupt=skip",
                 "data.img_size=96", "model.dropout=0.1", "run.seed=3", "engine.strategy=deepspeed",
                 "engine.precision=fp32"]


@pytest.mark.parametrize("override", CHANGES_DENSE)
def test_fields_that_change_the_dense_model_change_every_key(override):
    before, after = keys("qpm"), keys("qpm", override)
    assert all(before[name] != after[name] for name in before), override


def test_wds_reading_settings_count_on_the_wds_backend_only():
    wds = ("data.backend=wds", "data.converted=/somewhere")
    assert keys("qpm", *wds, "data.wds_mode=resampled")["dense"] != keys("qpm", *wds)["dense"]
    assert keys("qpm", *wds, "data.wds_shuffle_buffer=17")["dense"] != keys("qpm", *wds)["dense"]
    assert keys("qpm", *wds)["dense"] != keys("qpm")["dense"]  # the backend itself decodes differently


def test_epochs_leave_the_folder_key_of_a_step_schedule_but_not_what_later_stages_see():
    """40 -> 50 epochs: the same dense folder (trained on in place), but every later stage is recomputed."""
    before, after = keys("qpm", "dense.epochs=40"), keys("qpm", "dense.epochs=50")
    assert after["dense"][0] == before["dense"][0] and after["dense"][1] != before["dense"][1]
    assert all(after[name] != before[name] for name in before if name != "dense")
    fine_before, fine_after = keys("qpm", "finetune.epochs=40"), keys("qpm", "finetune.epochs=50")
    assert fine_after["qpm_finetune"][0] == fine_before["qpm_finetune"][0]
    assert fine_after["qpm_evaluate"] != fine_before["qpm_evaluate"]


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_epochs_stay_in_the_key_of_a_schedule_that_depends_on_the_total(schedule):
    before = keys("qpm", f"dense.schedule.name={schedule}", "dense.epochs=40")
    after = keys("qpm", f"dense.schedule.name={schedule}", "dense.epochs=50")
    assert after["dense"][0] != before["dense"][0]


def test_dense_epochs_zero_takes_the_weights_as_given_a_different_output_than_training(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"weights")
    given = f"model.weights={weights}"
    assert keys("qpm", given, "dense.epochs=0")["dense"][0] != keys("qpm", given, "dense.epochs=1")["dense"][0]
