"""Run under torchrun by test_pixpnet_method.py (or imported, for the one-process run): two PixPNet training steps
(a warm-up step with the backbone frozen, then a joint step) of the same seeded tiny model on the same global batch
of 8 synthetic images, each rank its half (DDP, gloo), through `PixPNetTask.step` and the DDP strategy; writes every
parameter's gradient of each step and the parameters after it to OUT.rank<R>.pt.

The model uses GroupNorm: BatchNorm's train-mode statistics are per rank by design, GroupNorm's per sample.

    torchrun --nproc-per-node 2 tests/pixpnet_train_probe.py DATA_ROOT OUT
"""

import sys

import torch

from qpm_dist import dist
from qpm_dist.config import DataConfig, OptimConfig, PhaseConfig, ScheduleConfig
from qpm_dist.data.batch import Batch
from qpm_dist.data.sources import read_splits
from qpm_dist.engine.optim import build_optimizer, build_scheduler
from qpm_dist.engine.strategy import DDPStrategy
from qpm_dist.methods.pixpnet import PixPNetConfig, PixPNetTask
from qpm_dist.models.net import Classifier
from qpm_dist.models.protonet import PrototypeHead
from qpm_dist.models.truncation import truncated_backbone

GLOBAL_BATCH = 8


def train_steps(root: str, info) -> dict:
    data = read_splits(DataConfig(dataset="synthetic", root=root, img_size=32, num_workers=0, augment="none"))
    images, labels = next(iter(data.eval_loader("train", GLOBAL_BATCH, 0, 1)))  # the same 8 images on every rank
    torch.manual_seed(0)
    backbone = truncated_backbone("tiny_resnet", "layer2", reduced_strides=False, norm="group", tiny_width=8)
    model = Classifier(backbone, PrototypeHead(backbone.num_features, data.num_classes, prototypes_per_class=2, dim=8))
    phase = PhaseConfig(epochs=2, batch_size=GLOBAL_BATCH, optim=OptimConfig(name="adam", lr=1e-3, weight_decay=1e-3),
                        schedule=ScheduleConfig(name="constant"), fdl_beta=0.0)
    pix = PixPNetConfig(warmup_epochs=1, cluster=0.5, separation=0.1, train=phase)  # every loss term on
    task = PixPNetTask(pix, phase)
    optimizer = build_optimizer(task.param_groups(model), phase.optim)
    strategy = DDPStrategy(model, optimizer, build_scheduler(optimizer, phase.schedule, 1, 2), info, "fp32",
                           channels_last=False, grad_accum=1, clip_grad_norm=None,
                           find_unused_parameters=task.unused_parameters)
    share = GLOBAL_BATCH // info.world_size
    mine = slice(info.rank * share, (info.rank + 1) * share)
    out = {}
    for epoch in (0, 1):  # 0: warm-up (backbone frozen), 1: joint
        for p in strategy.module.backbone.parameters():
            p.requires_grad_(not task.warm_up(epoch))
        loss, logs = task.step(Batch.of((images[mine], labels[mine])), strategy)
        strategy.backward(loss)
        out[f"grads{epoch}"] = {n: None if p.grad is None else p.grad.clone()
                                for n, p in strategy.module.named_parameters()}
        strategy.step(True)
        out[f"params{epoch}"] = {n: p.detach().clone() for n, p in strategy.module.named_parameters()}
    return out


if __name__ == "__main__":
    root, out = sys.argv[1:3]
    info = dist.init("cpu")
    try:
        torch.save(train_steps(root, info), f"{out}.rank{info.rank}.pt")
    finally:  # exiting with a live gloo group aborts now and then
        dist.shutdown()
