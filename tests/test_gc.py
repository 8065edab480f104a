"""GC, Grad-CAM consistency training (qpm_dist/methods/gc.py, specs/gc_consistency.md §1, §2, §5, §13): the GMP
head, the loss's gradient paths, the task's step against a hand-written §5, the config checks, and the method run
under 2 processes (DDP, DeepSpeed ZeRO-1) and resumed after a stop."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

from helpers import (REPO, assert_same_weights, clean_env, load_weights, qpm_command, run_in_process, stage_dir,
                     stop_inside_epoch_1_then_resume, write_test_config)

from qpm_dist import gradcam
from qpm_dist.config import ModelConfig, PhaseConfig
from qpm_dist.data.batch import Batch
from qpm_dist.data.composites import in_batch_negatives, quadrants, tile
from qpm_dist.losses.consistency import consistency_loss
from qpm_dist.methods.gc import ConsistencyTask, GCConfig
from qpm_dist.models.net import DenseHead, build_model

CLASSES = 5


def tiny_model(pooling: str = "avg", seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(arch="tiny_resnet", tiny_width=8, reduced_strides=False, dropout=0.0,
                                   pooling=pooling), CLASSES)


def composite_batch(b: int = 6, size: int = 16, seed: int = 0) -> Batch:
    """Positives, labels and in-batch composites, as data.composites builds them."""
    g = torch.Generator().manual_seed(seed)
    images, targets, index = torch.randn(b, 3, size, size, generator=g), torch.arange(b) % CLASSES, torch.arange(b)
    positions, same = in_batch_negatives(targets, index, seed, 0)
    quadrant = quadrants(index, seed, 0)
    return Batch(images=images, targets=targets, index=index, composites=tile(images, images[positions], quadrant),
                 quadrant=quadrant, same_class_negatives=same)


class Bare:
    """The strategy interface the task uses, on one process without a wrapper."""

    def __init__(self, model):
        self.module, self.device = model, torch.device("cpu")

    def prepare(self, images):
        return images

    def autocast(self):
        return contextlib.nullcontext()

    def forward(self, images):
        return self.module(images)


# ---------------------------------------------------------------------------------------------- the GMP head


def test_the_gmp_head_max_pools_and_its_closed_form_equals_autograd():
    model = tiny_model("max").eval()
    images, labels = composite_batch().images, torch.tensor([0, 1, 2, 3, 4, 0])
    out = model(images)
    torch.testing.assert_close(out.features, out.feature_maps.amax(dim=(2, 3)))
    assert gradcam.linear_form(model.head).pooling == "max"
    closed = gradcam.class_maps(model, images, labels, closed=True).maps
    torch.testing.assert_close(closed, gradcam.class_maps(model, images, labels, closed=False).maps, atol=1e-6, rtol=0)
    # the GMP map is not the CAM of the same weights (what a head read as averaging would give)
    cam = gradcam.closed_form(out.feature_maps, model.head.linear.weight, labels, "avg")
    assert not torch.allclose(gradcam.normalise(closed), gradcam.normalise(cam), atol=1e-3)


def test_a_saved_dense_head_without_the_pooling_option_loads_as_average():
    head = DenseHead.from_state({"num_features": 4, "num_classes": 2, "dropout": 0.0}, {})
    assert head.pooling == "avg" and head.options()["pooling"] == "avg"
    assert DenseHead(4, 2, pooling="max").options()["pooling"] == "max"
    with pytest.raises(ValueError, match="pooling must be one of"):
        DenseHead(4, 2, pooling="sum")


# ---------------------------------------------------------------------------------------------- the loss


def test_the_loss_is_zero_when_the_composite_map_is_the_positive_in_its_quadrant():
    g = torch.Generator().manual_seed(0)
    positive = torch.rand(4, 3, 5, generator=g)
    quadrant = torch.tensor([0, 1, 2, 3])
    composite = torch.zeros(4, 6, 10)
    for b, q in enumerate(quadrant.tolist()):  # by hand: rows 3*(q//2).., cols 5*(q%2)..
        composite[b, 3 * (q // 2):3 * (q // 2) + 3, 5 * (q % 2):5 * (q % 2) + 5] = 7 * positive[b]
    assert consistency_loss(positive, composite, quadrant) < 1e-7  # eps only
    assert consistency_loss(positive, composite, quadrant.roll(1)) > 1e-2  # the wrong quadrant is not


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_the_loss_gradient_reaches_fc_weight_through_the_inner_gradient_and_the_positive_branch(pooling):
    """L_GC depends on the head's weight only through the maps' G = d(logit)/dA: with create_graph the weight gets a
    gradient (the second-order term), without it (G detached) none; the closed form gives the same gradient.
    Neither branch is detached: the positives' and the composites' images both get gradients."""
    batch = composite_batch()
    grads = {}
    for path in ("closed", "autograd", "detached"):
        model = tiny_model(pooling).train()
        positives, composites = batch.images.clone().requires_grad_(), batch["composites"].clone().requires_grad_()
        maps = [gradcam.class_maps(model, x, batch.targets, closed=path == "closed",
                                   create_graph=path != "detached").maps for x in (positives, composites)]
        consistency_loss(*maps, batch["quadrant"]).backward()
        grads[path] = model.head.linear.weight.grad
        if path != "detached":
            assert positives.grad.abs().sum() > 0 and composites.grad.abs().sum() > 0
    assert grads["autograd"].abs().max() > 1e-6
    torch.testing.assert_close(grads["closed"], grads["autograd"], atol=1e-6, rtol=1e-4)
    assert grads["detached"] is None or not grads["detached"].any()


# ---------------------------------------------------------------------------------------------- the task's step


def reference_step(model, batch: Batch, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec §5 written out: two train-mode passes, CE on the positives, the element-wise Grad-CAM of the ground
    truth by double backward, normalised (M / (sum + 1e-8) + 1e-8), the positive's map copied into its quadrant of
    a zero target, mean |Q - T|, CE + λ L_GC. Returns (loss, L_GC)."""

    def normalised_map(images):
        out = model(images)
        score = (out.logits * F.one_hot(batch.targets, CLASSES)).sum()
        (grad,) = torch.autograd.grad(score, out.feature_maps, create_graph=True)
        m = (grad * out.feature_maps).sum(1).relu()
        return out.logits, m / (m.sum(dim=(1, 2), keepdim=True) + 1e-8) + 1e-8

    logits, p = normalised_map(batch.images)
    ce = F.cross_entropy(logits, batch.targets)
    _, q = normalised_map(batch["composites"])
    h, w = p.shape[1:]
    target = torch.zeros_like(q)
    for b, quadrant in enumerate(batch["quadrant"].tolist()):
        row, col = quadrant // 2, quadrant % 2
        target[b, row * h:(row + 1) * h, col * w:(col + 1) * w] = p[b]
    gc = (q - target).abs().mean()
    return ce + lam * gc, gc


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_the_task_step_is_spec_section_5(pooling):
    batch = composite_batch(b=8, size=16)
    phase = PhaseConfig(fdl_beta=0.0)
    model = tiny_model(pooling).train()
    expected, expected_gc = reference_step(model, Batch(batch), lam=3.0)
    expected.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert reference["head.linear.weight"].abs().max() > 0
    for closed_form in ("always", "never"):
        model = tiny_model(pooling).train()
        task = ConsistencyTask(GCConfig(lam=3.0, negatives="in_batch", closed_form=closed_form), phase)
        assert task.composites == "in_batch"
        loss, logs = task.step(Batch(batch), Bare(model))
        loss.backward()
        torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(logs["gc"], expected_gc, atol=1e-8, rtol=1e-5)
        assert set(logs) == {"ce", "fdl", "acc", "gc", "same_class_negatives"}
        torch.testing.assert_close(logs["same_class_negatives"], batch["same_class_negatives"].mean())
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.grad, reference[name], atol=1e-6, rtol=1e-4, msg=f"{closed_form}: {name}")


# ---------------------------------------------------------------------------------------------- config checks

GC_RUN = dict(model={"arch": "tiny_resnet", "tiny_width": 8, "norm": "group", "dropout": 0.0,
                     "reduced_strides": False},
              # lr 0.01: at 0.05 with λ 25 on these 4x4 maps training is chaotic: the float rounding by which a 2-rank
              # step differs from a 1-rank one (1e-7) grows ~10x per step (measured: 6.5e-4 after 8 steps; 2.4e-7
              # between grad_accum 1 and 2 in one process, 9e-8 with λ 0), and no tolerance separates it from a bug
              dense={"epochs": 2, "batch_size": 16, "eval_batch_size": 32, "fdl_beta": 0.0,
                     "optim": {"lr": 0.01}},
              gc={"lam": 25.0, "negatives": "dataset"},
              eval={"batch_size": 32})
STEPS_PER_EPOCH = 128 // 16


def gc_config(path, data, **extra):
    cfg = write_test_config(path, data, path.parent / f"runs-{path.stem}", **(GC_RUN | extra))
    text = yaml.safe_load(cfg.read_text())
    text["method"] = "gc"
    del text["qpm"]
    cfg.write_text(yaml.safe_dump(text))
    return cfg


@pytest.mark.parametrize("override,message", [
    ("gc.lam=-1", r"gc\.lam: expected a number >= 0, got -1\.0"),
    ("gc.negatives=random", r"gc\.negatives: expected one of 'dataset', 'in_batch', got 'random'"),
    ("data.img_size=36", r"data\.img_size: 36 is not a multiple of the total stride 8 of model\.arch=tiny_resnet "
                         r".*use 32 or 40"),
    ("gc.layer=backbone.layer9", r"gc\.layer: 'backbone\.layer9' is not a module of model\.arch=tiny_resnet's "
                                 r"backbone \(its top-level modules: backbone\.conv1, .*backbone\.layer3\)"),
    ("gc.closed_form=always gc.layer=backbone.layer2", r"gc\.closed_form: 'always' needs gc\.layer=null"),
    ("dense.epochs=0 model.weights=/x.pth", r"dense\.epochs: GC trains the model"),
])
def test_bad_gc_configs_stop_before_any_work_with_one_line(tmp_path, tiny_data, capsys, override, message):
    """`qpm-dist check` (in process: the config path of `run`, which exits 2 the same way)."""
    from qpm_dist.cli import main

    config = gc_config(tmp_path / "bad.yaml", tiny_data)
    assert main(["check", str(config), *override.split()]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and re.search(message, lines[0]), lines
    assert not (tmp_path / "runs-bad").exists()


def test_max_pooling_is_refused_for_methods_whose_heads_average():
    from qpm_dist.config import ConfigError, load_config

    for method in ("qpm", "sldd", "qsenn"):
        with pytest.raises(ConfigError, match=rf"model\.pooling: 'max' pools the dense head only, but method {method}"):
            load_config(None, [f"method={method}", "model.pooling=max"])
    load_config(None, ["method=gc", "model.pooling=max", "gc.negatives=in_batch", "data.img_size=64",
                       "model.reduced_strides=false"])


# ---------------------------------------------------------------------------------------------- distributed runs


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data):
    """gc_train in this process (1 rank, 1 thread: bitwise a 1-process `qpm-dist run`)."""
    config = gc_config(tmp_path_factory.mktemp("gc") / "one.yaml", tiny_data)
    records, ctx = run_in_process(config, stage="gc_train")
    return config, stage_dir(ctx.cfg.run.out_dir, "gc_train")


@pytest.fixture(scope="module")
def launch(tmp_path_factory, tiny_data):
    """One torchrun launch with 2 processes (tests/gc_ddp_probe.py): the step-level DDP check, then gc_train under
    DDP and under DeepSpeed ZeRO-1. Returns (probe result, {strategy: gc_train folder})."""
    from helpers import BASE_CONFIG

    tmp = tmp_path_factory.mktemp("gc-launch")
    engines = {"ddp": dict(BASE_CONFIG["engine"], strategy="ddp"),
               "zero1": dict(BASE_CONFIG["engine"], strategy="deepspeed",
                             deepspeed_config=str(REPO / "configs" / "deepspeed" / "zero1.json"))}
    configs = {name: gc_config(tmp / f"{name}.yaml", tiny_data, engine=engine) for name, engine in engines.items()}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(REPO / "tests" / "gc_ddp_probe.py"), str(tmp / "probe.json"),
               *(f"{config} --stage gc_train" for config in configs.values())]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, env=clean_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return (json.loads((tmp / "probe.json").read_text()),
            {name: stage_dir(tmp / f"runs-{name}", "gc_train") for name in configs})


def test_one_ddp_step_with_two_forwards_equals_one_process(launch):
    """Positives and composites through the DDP module, one backward: the averaged gradient is the one-process
    gradient of the two halves, on every rank, for the closed form and for double backward, GAP and GMP."""
    probe, _ = launch
    assert set(probe) == {"always-avg", "always-max", "never-avg", "never-max"}
    for name, diff in probe.items():
        assert diff["gradient_norm"] > 1e-3, name
        assert diff["vs_one_process"] < 1e-6 * max(1.0, diff["gradient_norm"]), (name, diff)
        assert diff["across_ranks"] == 0.0, (name, diff)


def test_a_two_process_gc_run_equals_the_one_process_run(launch, reference):
    _, runs = launch
    config, one = reference
    negatives = yaml.safe_load(config.read_text())["gc"]["negatives"]
    if negatives == "in_batch":
        pytest.skip("in-batch negatives come from each rank's micro-batch, so they depend on the world size; the "
                    "step-level check above covers DDP with them")
    assert_same_weights(load_weights(one / "model.pt"), load_weights(runs["ddp"] / "model.pt"), atol=1e-5)


def test_deepspeed_zero1_gc_run_equals_ddp(launch):
    """Bitwise, as every method's training under ZeRO-1 (test_deepspeed_methods.py: gloo, fp32, 2 ranks)."""
    _, runs = launch
    assert_same_weights(load_weights(runs["ddp"] / "model.pt"), load_weights(runs["zero1"] / "model.pt"))
    ddp, ds = (json.loads((runs[name] / "result.json").read_text()) for name in ("ddp", "zero1"))
    assert (ddp["strategy"], ds["strategy"], ds["world_size"], ds["global_step"]) == ("ddp", "deepspeed", 2,
                                                                                       2 * STEPS_PER_EPOCH)
    assert ddp["test"] == ds["test"]
    records = [json.loads(x) for x in (runs["zero1"] / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r.get("event") == "epoch"]
    assert len(epochs) == 2 and all(0 < r["train_gc"] < 2 / 16 for r in epochs)  # the loss was on: 2/(4 h w) at most


@pytest.mark.slow
def test_a_resumed_gc_run_is_bitwise_the_uninterrupted_one(reference, tiny_data, tmp_path):
    """Stopped by SIGTERM inside epoch 1 (after the quadrants and negatives of epoch 0), resumed: the same model."""
    _, one = reference
    config = gc_config(tmp_path / "stopped.yaml", tiny_data)
    command = qpm_command(1, "run", str(config), "--stage", "gc_train")
    run, ckpt, resumed = stop_inside_epoch_1_then_resume(command, clean_env(), tmp_path / "runs-stopped", "gc_train",
                                                         STEPS_PER_EPOCH)
    assert f"resumed gc_train from {ckpt}" in resumed.stderr
    assert_same_weights(load_weights(one / "model.pt"), load_weights(run / "model.pt"))


def test_stage_keys_pooling_changes_the_baseline_lambda_only_the_gc_model():
    """GMP is a different baseline; λ is not (the dense stage is the λ-free baseline, shared with QPM)."""
    from qpm_dist.stages.train import model_key
    from qpm_dist.config import load_config
    from test_stage_keys import keys

    extra = ()
    base = keys("gc", *extra)
    assert keys("qpm")["dense"] == base["dense"]
    assert "pooling" not in model_key(load_config(None, ["method=gc", *extra]))  # avg keys are those of before
    gmp = keys("gc", *extra, "model.pooling=max")
    assert all(gmp[name] != base[name] for name in base)
    lam = keys("gc", *extra, "gc.lam=1")
    assert lam["dense"] == base["dense"] and lam["gc_train"] != base["gc_train"]
    assert keys("gc", *extra, "gc.closed_form=never")["gc_train"] != base["gc_train"]
