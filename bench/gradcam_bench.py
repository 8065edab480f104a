"""The GC training step with the closed-form Grad-CAM against the same step with the double-backward autograd path.

`gradcam.closed_form` computes the map of a linear head on pooled maps directly (GAP: the CAM; GMP: the class
weight scattered at each channel's arg-max); `gradcam.autograd_map` takes the gradient of the class score w.r.t.
the head's feature maps with create_graph=True, so the outer backward runs a double backward. The spec
(§2, §10.4) expects little difference in time: the inner gradient only crosses pool + fc, the backbone is
traversed by the ordinary backward once either way; the closed form's point is that it works under
torch.compile and activation checkpointing. Measured here for GAP and GMP heads on ResNet-18 and ResNet-50:

* time of the whole step: `gc_bench.gc_step` with closed=True against closed=False, same model (each its own
  copy of the same initial weights), same batch, ABBA order, ratio of the median step times; the two variants'
  losses on the initial weights must agree (the bench stops otherwise: it would compare different computations);
* time of the part that differs: the same `gc_step` on a model whose backbone is the identity, fed the real
  backbone's feature maps of the batch (a leaf that receives the gradient, as the backbone would): the head,
  the Grad-CAM, the loss and their backward, without the backbone's cost that is the same in both;
* memory: the bytes autograd keeps for the backward (tensors saved by the forward and by the inner gradient with
  create_graph, counted once per storage through `torch.autograd.graph.saved_tensors_hooks`); and, with --rss,
  each variant's peak RSS in a fresh subprocess running two steps (coarse: glibc reuses freed blocks, so a few
  MB of difference do not show).

    OMP_NUM_THREADS=1 python bench/gradcam_bench.py [--size 128] [--rounds 2] [--rss] [--out bench/out/gradcam.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import psutil
import torch
from torch import nn

from gc_bench import abba, gc_loss, gc_step, machine, make_batch, make_model, sgd
from qpm_dist.models.net import Classifier

CONFIGS = [("resnet18", 8), ("resnet50", 4)]  # (arch, batch), as in gc_bench
HEADS = ("gap", "gmp")


def make_head_model(arch: str, head: str) -> Classifier:
    """The dense model with global average (GAP) or max (GMP: `model.pooling=max`, the GC paper's `--maxpool`)
    pooling."""
    return make_model(arch, pooling="max" if head == "gmp" else "avg")


def variants(model: Classifier, data: dict[str, torch.Tensor], repeats: int = 1):
    """ABBA step functions of the closed-form and the autograd variant, each with its own copy of `model`."""
    models = {"closed": model, "autograd": copy.deepcopy(model)}
    optimizers = {name: sgd(m) for name, m in models.items()}

    def step(name: str) -> torch.Tensor:
        for _ in range(repeats):
            loss = gc_step(models[name], optimizers[name], data["images"], data["targets"], data["composites"],
                           data["quadrant"], closed=name == "closed")
        return loss

    return models, {name: (lambda name=name: step(name)) for name in models}


def saved_mb(model: Classifier, data: dict[str, torch.Tensor], closed: bool) -> float:
    """MB of the tensors autograd keeps between the forward (Grad-CAM included) and the backward, each storage
    counted once."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        gc_loss(model, data["images"], data["targets"], data["composites"], data["quadrant"], closed=closed)
    return sum(storages.values()) / 2**20


def head_level(model: Classifier, data: dict[str, torch.Tensor], rounds: int, repeats: int = 20) -> dict:
    """ms per step of the part that differs: the backbone replaced by the identity, its feature maps as input."""
    with torch.no_grad():
        maps = {key: model.backbone(data[key]).detach().requires_grad_(True) for key in ("images", "composites")}
    head_model = Classifier(nn.Identity(), copy.deepcopy(model.head))
    _, steps = variants(head_model, {**data, **maps}, repeats)
    times, _ = abba(steps, max(rounds, 5))
    closed, autograd = (1e3 * statistics.median(times[k]) / repeats for k in ("closed", "autograd"))
    return {"head_closed_ms": closed, "head_autograd_ms": autograd, "head_speedup": autograd / closed,
            "feature_maps": list(maps["images"].shape[1:])}


def bench_config(arch: str, head: str, size: int, batch: int, rounds: int) -> dict:
    data = make_batch(batch, size)
    models, steps = variants(make_head_model(arch, head), data)
    times, losses = abba(steps, rounds)
    if not torch.allclose(losses["closed"], losses["autograd"], rtol=1e-4, atol=1e-6):
        raise SystemExit(f"{arch} {head}: the closed form's loss {losses['closed']:.6f} differs from the autograd "
                         f"path's {losses['autograd']:.6f} on the same weights: not the same computation")
    closed, autograd = (1e3 * statistics.median(times[k]) for k in ("closed", "autograd"))
    return {"arch": arch, "head": head, "size": size, "batch": batch, "closed_ms": closed, "autograd_ms": autograd,
            "speedup": autograd / closed, "loss_closed": float(losses["closed"]),
            "loss_autograd": float(losses["autograd"]), "closed_times_s": times["closed"],
            "autograd_times_s": times["autograd"],
            "closed_saved_mb": saved_mb(models["closed"], data, closed=True),
            "autograd_saved_mb": saved_mb(models["autograd"], data, closed=False),
            **head_level(models["closed"], data, rounds)}


def child(arch: str, head: str, size: int, batch: int, variant: str) -> None:
    """Two GC steps of one variant in this fresh process; prints its peak RSS as JSON."""
    model = make_head_model(arch, head)
    optimizer = sgd(model)
    data = make_batch(batch, size)
    setup_mb = psutil.Process().memory_info().rss / 2**20
    for _ in range(2):  # the second step also holds the momentum buffers
        gc_step(model, optimizer, data["images"], data["targets"], data["composites"], data["quadrant"],
                closed=variant == "closed")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": peak_mb, "peak_above_setup_mb": peak_mb - setup_mb}))


def peak_rss(arch: str, head: str, size: int, batch: int) -> dict:
    result = {}
    for variant in ("closed", "autograd"):
        proc = subprocess.run([sys.executable, __file__, "--child", arch, head, variant, "--size", str(size),
                               "--batch", str(batch)], capture_output=True, text=True, check=True)
        for key, value in json.loads(proc.stdout.strip().splitlines()[-1]).items():
            result[f"{variant}_{key}"] = value
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="crop size s (a multiple of 32); composites are 2s")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds per configuration (2 steps each)")
    parser.add_argument("--rss", action="store_true", help="also each variant's peak RSS in a fresh subprocess")
    parser.add_argument("--out", default="bench/out/gradcam.json")
    parser.add_argument("--child", nargs=3, metavar=("ARCH", "HEAD", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child[:2], args.size, args.batch, args.child[2])
        return
    before = machine()
    print(f"threads {before['torch_threads']} (OMP_NUM_THREADS={before['omp_num_threads']}), "
          f"load average {before['load_average']}, s={args.size}", flush=True)
    rows = []
    for arch, batch in CONFIGS:
        for head in HEADS:
            row = bench_config(arch, head, args.size, batch, args.rounds)
            if args.rss:
                row.update(peak_rss(arch, head, args.size, batch))
            rows.append(row)
            line = (f"{arch:9s} {head} B={batch}: closed {row['closed_ms']:6.0f} ms/step, autograd "
                    f"{row['autograd_ms']:6.0f} ms/step, speed-up {row['speedup']:.3f}; the part that differs: "
                    f"{row['head_closed_ms']:.2f} vs {row['head_autograd_ms']:.2f} ms, {row['head_speedup']:.2f}x; "
                    f"saved for backward {row['closed_saved_mb']:.1f} vs {row['autograd_saved_mb']:.1f} MB")
            if args.rss:
                line += (f"; peak RSS closed {row['closed_peak_rss_mb']:.1f} MB "
                         f"({row['closed_peak_above_setup_mb']:.1f} above setup), autograd "
                         f"{row['autograd_peak_rss_mb']:.1f} MB ({row['autograd_peak_above_setup_mb']:.1f})")
            print(line, flush=True)
    after = machine()
    print(f"load average after {after['load_average']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine_before": before, "machine_after": after, "size": args.size,
                               "rounds": args.rounds, "configs": rows}, indent=1))


if __name__ == "__main__":
    main()
