"""Grad-CAM consistency (GC) training step against a plain training step on the same model and batch.

The spec (specs/gc_consistency.md §10.1) estimates a GC step at about 5x a plain step on ResNet-50: every sample
costs one s px pass plus one 2s px pass (4x the pixels), forward and backward; the Grad-CAM itself (closed form,
or a double backward that only crosses pool + fc) should add little. Measured here:

* plain step: the dense phase's `ClassificationTask.step` (forward, cross-entropy) + backward + SGD step on B
  positives of s x s px;
* GC step (`gc_step`): `methods.gc.ConsistencyTask.step` — forward of the positives (s px) and of their 2x2
  composites (2s px), CE on the positives, Grad-CAM of the label class on both, the consistency loss, CE + 25
  L_GC — then backward, SGD step.

Both on torchvision-layout ResNets of our `qpm_dist.models` (random init, no dropout, 1000 classes, train mode);
each variant has its own copy of the same initial weights and the same batch. Steps of the two alternate in ABBA
order, so machine noise hits both alike; the ratio is of the median step times. The composites are built once per
batch before timing, as the data pipeline does (`CompositeLoader`); what `tile` costs is reported separately.
Crop sizes must be multiples of the total stride 32 (quadrant borders on map cells): 128 and 224.

    OMP_NUM_THREADS=1 python bench/gc_bench.py [--rounds 3] [--out bench/out/gc_step.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from qpm_dist.config import ModelConfig, PhaseConfig
from qpm_dist.data.batch import Batch
from qpm_dist.data.composites import in_batch_negatives, quadrants, tile
from qpm_dist.engine.task import ClassificationTask
from qpm_dist.methods.gc import ConsistencyTask, GCConfig
from qpm_dist.models.net import Classifier, ModelOutput, build_model

LAMBDA = 25.0  # the ImageNet README's λ (spec §5.7)
CLASSES = 1000
SPEC_ESTIMATE = 5.0  # spec §10.1: one s px plus one 2s px pass, forward and backward
# (arch, crop size s, batch B): B small enough for a CPU; ResNet-50 at 224 px with B = 4
CONFIGS = [("resnet18", 128, 8), ("resnet18", 224, 8), ("resnet50", 128, 4), ("resnet50", 224, 4)]


class OneProcess:
    """The strategy interface the training tasks use (module, device, prepare, autocast, forward), as
    `engine.strategy.DDPStrategy` provides it on one CPU process in fp32: no wrapper, no casts."""

    def __init__(self, model: Classifier) -> None:
        self.module, self.device = model, torch.device("cpu")

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def forward(self, images: torch.Tensor) -> ModelOutput:
        return self.module(images)


PLAIN = ClassificationTask(PhaseConfig(fdl_beta=0.0))  # cross-entropy only, as the reference


def consistency_task(closed: bool = True, lam: float = LAMBDA) -> ConsistencyTask:
    """The production GC task (`methods.gc`), with the closed form or the double-backward autograd path."""
    return ConsistencyTask(GCConfig(lam=lam, negatives="in_batch", closed_form="always" if closed else "never"),
                           PhaseConfig(fdl_beta=0.0))


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def plain_step(model: Classifier, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               targets: torch.Tensor) -> torch.Tensor:
    """The baseline: the dense phase's task step (forward, CE), backward, SGD step."""
    loss, _ = PLAIN.step(Batch(images=images, targets=targets), OneProcess(model))
    return optimizer_step(loss, optimizer)


def gc_loss(model: Classifier, images: torch.Tensor, targets: torch.Tensor, composites: torch.Tensor,
            quadrant: torch.Tensor, closed: bool = True, lam: float = LAMBDA) -> torch.Tensor:
    """CE on the positives + lam * L_GC, computed by `ConsistencyTask.step` as training does: Grad-CAM of the label
    class on the positives and on their composites (two forward passes in train mode, BN statistics per pass, as
    the reference), by the head's closed form or (closed=False) the double-backward autograd path."""
    batch = Batch(images=images, targets=targets, composites=composites, quadrant=quadrant,
                  same_class_negatives=torch.zeros_like(targets, dtype=torch.bool))
    loss, _ = consistency_task(closed, lam).step(batch, OneProcess(model))
    return loss


def gc_step(model: Classifier, optimizer: torch.optim.Optimizer, images: torch.Tensor, targets: torch.Tensor,
            composites: torch.Tensor, quadrant: torch.Tensor, closed: bool = True,
            lam: float = LAMBDA) -> torch.Tensor:
    """One GC training step: `gc_loss` (the production task's step), backward, SGD step."""
    return optimizer_step(gc_loss(model, images, targets, composites, quadrant, closed, lam), optimizer)


def make_model(arch: str, seed: int = 0, pooling: str = "avg") -> Classifier:
    """torchvision layout (output stride 32: 7 x 7 maps at 224 px), no dropout (the reference has none, and the
    closed form is then also the train-mode map), random init; train mode."""
    torch.manual_seed(seed)
    return build_model(ModelConfig(arch=arch, reduced_strides=False, dropout=0.0, pooling=pooling), CLASSES).train()


def make_batch(batch: int, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """B random positives with random labels, and their composites with in-batch negatives (spec §10.3)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    targets = torch.randint(0, CLASSES, (batch,), generator=g)
    index = torch.arange(batch)
    positions, _ = in_batch_negatives(targets, index, seed, epoch=0)
    quadrant = quadrants(index, seed, epoch=0)
    return {"images": images, "targets": targets, "negatives": images[positions], "quadrant": quadrant,
            "composites": tile(images, images[positions], quadrant)}


def sgd(model: Classifier) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)


def abba(steps: dict[str, Callable[[], object]], rounds: int) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Seconds of each call of the two step functions, in A B B A order per round, after one warm-up call each;
    and what the warm-up calls returned (both on their initial weights: comparable)."""
    (a, step_a), (b, step_b) = steps.items()
    warm_up = {a: step_a(), b: step_b()}
    times: dict[str, list[float]] = {a: [], b: []}
    for _ in range(rounds):
        for name, step in ((a, step_a), (b, step_b), (b, step_b), (a, step_a)):
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times, warm_up


def machine() -> dict:
    """What the numbers depend on: threads, load average (1, 5, 15 min), CPU, versions, date (UTC)."""
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "python": platform.python_version()}


def tile_ms(data: dict[str, torch.Tensor], repeats: int = 5) -> float:
    """Median ms of building the composites of one batch (`tile`), what the data pipeline adds per batch."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tile(data["images"], data["negatives"], data["quadrant"])
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def bench_config(arch: str, size: int, batch: int, rounds: int) -> dict:
    model = make_model(arch)
    models = {"plain": model, "gc": copy.deepcopy(model)}
    optimizers = {name: sgd(m) for name, m in models.items()}
    data = make_batch(batch, size)
    steps = {
        "plain": lambda: plain_step(models["plain"], optimizers["plain"], data["images"], data["targets"]),
        "gc": lambda: gc_step(models["gc"], optimizers["gc"], data["images"], data["targets"], data["composites"],
                              data["quadrant"]),
    }
    times, _ = abba(steps, rounds)
    plain, gc = (1e3 * statistics.median(times[k]) for k in ("plain", "gc"))
    return {"arch": arch, "size": size, "batch": batch, "plain_ms": plain, "gc_ms": gc, "ratio": gc / plain,
            "tile_ms": tile_ms(data), "plain_times_s": times["plain"], "gc_times_s": times["gc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="ABBA rounds per configuration (2 steps each)")
    parser.add_argument("--out", default="bench/out/gc_step.json")
    args = parser.parse_args()
    before = machine()
    print(f"threads {before['torch_threads']} (OMP_NUM_THREADS={before['omp_num_threads']}), "
          f"load average {before['load_average']}", flush=True)
    rows = []
    for arch, size, batch in CONFIGS:
        row = bench_config(arch, size, batch, args.rounds)
        rows.append(row)
        print(f"{arch:9s} s={size:3d} B={batch}: plain {row['plain_ms']:7.0f} ms/step, GC {row['gc_ms']:7.0f} "
              f"ms/step, ratio {row['ratio']:.2f} (spec ≈{SPEC_ESTIMATE:.0f}); tile {row['tile_ms']:.1f} ms/batch",
              flush=True)
    after = machine()
    print(f"load average after {after['load_average']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine_before": before, "machine_after": after, "lambda": LAMBDA,
                               "spec_estimate": SPEC_ESTIMATE, "rounds": args.rounds, "configs": rows}, indent=1))


if __name__ == "__main__":
    main()
