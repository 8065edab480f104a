"""The distributed prototype push (qpm_dist.methods.pixpnet_push): wall time on 2 processes vs 1, and its peak
memory at two dataset sizes (issue 16: "push time with 2 processes vs 1 on the demo data (ratio), and the push's
peak memory at two dataset sizes (it must not grow with the dataset)").

Demo-sized problem (configs/demo.yaml): 20 classes x 100 training images of 64 px, the tiny ResNet of width 16
with reduced strides (16 x 16 latent grid, 64 channels), 10 prototypes per class (P = 200), D = 64. The images
are generated per batch from their index (seeded), never held in memory, so the process's memory is the model,
one batch and the push's own buffers; the loader shards rows rank, rank + W, ... as eval_loader does.

Every measurement runs in a fresh process group started by this script (`torchrun --nproc-per-node W ... --worker`):
* time: a warm-up push, then `--rounds` pushes, median wall time per push (the same prototypes are pushed each
  round: the model is rebuilt before each); 1 and 2 processes, ratio of the medians. Both runs must end with the
  same prototype tensor (sha256), or the bench stops;
* memory (1 process, `--memory-sizes`, default 2000 and 8000 images): the push's peak resident memory above the
  process's high-water mark before it (ru_maxrss after the warm-up push of a 1-batch dataset), and the exact
  bytes of the per-rank candidate buffers (P x M x (D + 3) numbers).

    OMP_NUM_THREADS=1 python bench/pixpnet_push_bench.py [--images 2000] [--rounds 3]
        [--out bench/out/pixpnet_push.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gc_bench import machine
from qpm_dist import dist
from qpm_dist.methods.pixpnet_push import push_prototypes
from qpm_dist.models.backbones import TinyResNet
from qpm_dist.models.net import Classifier
from qpm_dist.models.protonet import PrototypeHead

CLASSES, PER_CLASS, DIM, SIZE, WIDTH = 20, 10, 64, 64, 16


class GeneratedShard:
    """This rank's rows (rank, rank + W, ...) of `n` images made per batch from their index: (images, labels,
    indices) batches like DatasetBundle.eval_loader(..., return_index=True), without holding the images."""

    def __init__(self, n: int, batch: int, rank: int, world: int) -> None:
        self.rows = torch.arange(rank, n, world)
        self.batch = batch

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch)

    def __iter__(self):
        for start in range(0, len(self.rows), self.batch):
            rows = self.rows[start:start + self.batch]
            images = torch.stack([torch.randn(3, SIZE, SIZE, generator=torch.Generator().manual_seed(int(i)))
                                  for i in rows])
            yield images, rows % CLASSES, rows


def demo_model() -> Classifier:
    torch.manual_seed(0)
    backbone = TinyResNet(width=WIDTH, reduced_strides=True)
    return Classifier(backbone, PrototypeHead(backbone.num_features, CLASSES, PER_CLASS, dim=DIM)).eval()


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(args: argparse.Namespace) -> None:
    """One process of a measurement: pushes under the process group torchrun set up; rank 0 writes the JSON."""
    info = dist.init("cpu")
    try:
        model = demo_model()
        push_prototypes(model, GeneratedShard(args.batch, args.batch, info.rank, info.world_size), args.batch)
        before_mb = max_rss_mb()  # the high-water mark after a one-batch push (allocator pools warm)
        times, record = [], None
        for _ in range(args.rounds):
            model = demo_model()
            dist.barrier()
            start = time.perf_counter()
            record = push_prototypes(model, GeneratedShard(args.images, args.batch, info.rank, info.world_size),
                                     args.batch)
            times.append(time.perf_counter() - start)
        peaks = dist.all_gather_object(max_rss_mb() - before_mb)
        digest = hashlib.sha256(model.head.prototypes.detach().numpy().tobytes()).hexdigest()
        item_bytes = {"distances": 4, "samples": 8, "cells": 8, "vectors": 4}  # fp32, int64, int64, fp32
        buffer_bytes = sum(item_bytes[name] * torch.Size(shape).numel()
                           for name, shape in record.candidate_shapes.items())
        if info.rank == 0:
            Path(args.out).write_text(json.dumps({
                "world_size": info.world_size, "images": args.images, "batch_per_rank": args.batch,
                "push_seconds": times, "median_seconds": statistics.median(times),
                "push_peak_rss_above_before_mb_per_rank": peaks, "candidate_buffer_bytes": buffer_bytes,
                "candidate_shapes": record.candidate_shapes, "prototypes_sha256": digest,
                "kept_prototypes": len(record.kept)}))
    finally:
        dist.shutdown()


def measure(world: int, images: int, rounds: int, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", __file__,
               "--worker", "--images", str(images), "--rounds", str(rounds), "--batch", str(batch), "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"push bench worker (W={world}, N={images}) failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=CLASSES * 100, help="training images of the timing runs")
    parser.add_argument("--memory-sizes", type=int, nargs=2, default=(2000, 8000))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="push batch per rank (the same for every W)")
    parser.add_argument("--out", default="bench/out/pixpnet_push.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    one = measure(1, args.images, args.rounds, args.batch)
    two = measure(2, args.images, args.rounds, args.batch)
    if one["prototypes_sha256"] != two["prototypes_sha256"]:
        raise SystemExit("push bench: 2 processes pushed other prototypes than 1 process")
    small, large = (measure(1, n, 1, args.batch) for n in args.memory_sizes)
    result = {
        "machine": machine(),
        "problem": {"classes": CLASSES, "prototypes": CLASSES * PER_CLASS, "dim": DIM, "image_px": SIZE,
                    "latent_grid": 16, "backbone": f"tiny_resnet width {WIDTH}"},
        "time": {"one_process": one, "two_processes": two,
                 "speedup_two_vs_one": one["median_seconds"] / two["median_seconds"],
                 "same_prototypes": True},
        "memory": {"small": small, "large": large,
                   "peak_growth_mb": large["push_peak_rss_above_before_mb_per_rank"][0]
                   - small["push_peak_rss_above_before_mb_per_rank"][0],
                   "same_candidate_buffers": small["candidate_shapes"] == large["candidate_shapes"]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({"speedup_two_vs_one": round(result["time"]["speedup_two_vs_one"], 3),
                      "one_s": one["median_seconds"], "two_s": two["median_seconds"],
                      "peak_mb": [small["push_peak_rss_above_before_mb_per_rank"][0],
                                  large["push_peak_rss_above_before_mb_per_rank"][0]],
                      "buffer_bytes": small["candidate_buffer_bytes"], "load": result["machine"]["load_average"]}))


if __name__ == "__main__":
    main()
