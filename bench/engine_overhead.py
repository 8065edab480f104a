"""Engine overhead: our Trainer's training epoch against a minimal hand-written DDP loop.

Both loops train the same model (same initial weights) on the same in-memory data with the same
global batch, optimizer, LR schedule and loss (CE + FDL), under the same process group. Epochs of the two
loops alternate in ABBA order, so machine noise hits both alike; the ratio of the median epoch times is
reported. In-memory data keeps the loader cheap, so the ratio shows what the engine itself adds per step
(sampler, metric accumulation, the stop-signal all-reduce, scheduler, logging).

    torchrun --standalone --nproc-per-node 2 bench/engine_overhead.py [--epochs 6] [--out bench/out/engine.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from qpm_dist import dist
from qpm_dist.config import load_config
from qpm_dist.data.loaders import TrainLoader, eval_loader
from qpm_dist.engine.optim import build_optimizer, build_scheduler, classifier_param_groups
from qpm_dist.engine.preemption import StopRequest
from qpm_dist.engine.task import ClassificationTask
from qpm_dist.engine.trainer import Trainer, TrainerSetup
from qpm_dist.losses import feature_diversity_loss
from qpm_dist.stages.train import build_dense_model


class InMemoryImages(Dataset):
    """Pre-generated image tensors; accepts the engine's (index, epoch) keys and plain indices."""

    def __init__(self, n: int, size: int, classes: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, key):
        i = key[0] if isinstance(key, tuple) else key
        return self.x[i], int(self.y[i])


class InMemorySource:
    """The engine's DataSource interface over InMemoryImages (no workers: the loader stays cheap)."""

    num_classes, class_names, fingerprint = 20, [str(i) for i in range(20)], "in-memory"

    def __init__(self, data: InMemoryImages) -> None:
        self.data = data

    def train_loader(self, micro_batch, global_batch, rank, world_size, pin_memory=False, return_index=False):
        return TrainLoader(self.data, micro_batch, global_batch, rank, world_size, seed=0, num_workers=0)

    def eval_loader(self, split, batch_size, rank, world_size, pin_memory=False):
        return eval_loader(self.data, batch_size, rank, world_size, num_workers=0)


def baseline_epoch(ddp, loader, sampler, optimizer, scheduler, epoch: int, beta: float) -> float:
    """The loop one would write by hand: DistributedSampler, DDP, CE + FDL, SGD, per-step schedule."""
    sampler.set_epoch(epoch)
    ddp.train()
    start = time.perf_counter()
    for images, targets in loader:
        out = ddp(images)
        loss = F.cross_entropy(out.logits, targets) + feature_diversity_loss(
            out.feature_maps, out.logits, getattr(ddp, "module", ddp).head.class_weights(), beta)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    dist.barrier()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--out", default="bench/out/engine_overhead.json")
    args = parser.parse_args()

    info = dist.init("cpu")
    cfg = load_config(None, ["model.arch=tiny_resnet", "model.tiny_width=16", "engine.precision=fp32",
                             "engine.progress=false", "engine.log_every_steps=20", f"dense.batch_size={args.batch}",
                             f"dense.epochs={2 * args.epochs}", "dense.optim.lr=0.01", "data.num_workers=0"])
    data = InMemoryImages(args.images, args.size, classes=20)
    micro = args.batch // info.world_size
    beta = cfg.dense.fdl_beta

    # ours
    with tempfile.TemporaryDirectory() as tmp:
        setup = TrainerSetup(phase="dense", cfg=cfg.dense, engine=cfg.engine, wandb=cfg.wandb, stage_dir=Path(tmp),
                             run_name="bench", resume="never")
        trainer = Trainer(setup, build_dense_model(cfg, 20), ClassificationTask(cfg.dense), InMemorySource(data), info)
        from qpm_dist.engine.monitor import MetricsLogger

        trainer.logger = MetricsLogger(Path(tmp) / "m.jsonl", info.is_main, cfg.wandb, "x", "b", "b", "dense", {},
                                       Path(tmp))

        # baseline: same model init, same optimizer groups and schedule
        model = build_dense_model(cfg, 20)
        ddp = DistributedDataParallel(model) if info.world_size > 1 else model
        optimizer = build_optimizer(classifier_param_groups(model, cfg.dense.optim), cfg.dense.optim)
        sampler = DistributedSampler(data, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=0,
                                     drop_last=True)
        loader = DataLoader(data, batch_size=micro, sampler=sampler, drop_last=True)
        scheduler = build_scheduler(optimizer, cfg.dense.schedule, len(loader), cfg.dense.epochs)

        def ours_epoch() -> float:
            dist.barrier()
            start = time.perf_counter()
            trainer.train_epoch(stop)
            dist.barrier()
            trainer.progress.epoch += 1
            trainer.progress.step_in_epoch = 0
            return time.perf_counter() - start

        ours, base = [], []
        with StopRequest() as stop:
            for epoch in range(args.epochs + 1):  # epoch 0 warms up both
                # ABBA order: neither loop always runs first (caches, thermal state, background load)
                if epoch % 2:
                    t_base = baseline_epoch(ddp, loader, sampler, optimizer, scheduler, epoch, beta)
                    t_ours = ours_epoch()
                else:
                    t_ours = ours_epoch()
                    t_base = baseline_epoch(ddp, loader, sampler, optimizer, scheduler, epoch, beta)
                if epoch > 0:
                    ours.append(t_ours)
                    base.append(t_base)
        trainer.logger.close()

    if info.is_main:
        steps = trainer.steps_per_epoch
        result = {
            "world_size": info.world_size, "model": "tiny_resnet(16)", "image_size": args.size,
            "global_batch": args.batch, "steps_per_epoch": steps, "epochs_timed": args.epochs,
            "ours_step_ms": 1000 * statistics.median(ours) / steps,
            "baseline_step_ms": 1000 * statistics.median(base) / steps,
        }
        result["ratio"] = result["ours_step_ms"] / result["baseline_step_ms"]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"engine step {result['ours_step_ms']:.1f} ms vs hand-written DDP {result['baseline_step_ms']:.1f} ms "
              f"-> ratio {result['ratio']:.3f} ({info.world_size} ranks, {steps} steps/epoch, median of "
              f"{args.epochs} epochs)")
    dist.shutdown()


if __name__ == "__main__":
    main()
