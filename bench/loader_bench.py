"""Loader throughput: decode + RandomResizedCrop(224) + horizontal flip to uint8 tensors, images/s.

Pipelines, all over the same ImageNet-like JPEGs (synthetic generator, 375-500 px sides, natural-looking
clutter, ~70 KB), batch 32, `--workers` loader processes (FFCV: threads):
  folder+PIL      torchvision ImageFolder + PIL transforms: the usual PyTorch pipeline, the baseline
  folder+decode   ours, data.backend=folder (the default): torchvision.io.decode_jpeg + transforms.v2
  folder+PIL(ours) the same loader with data.decoder=pil
  wds             ours, data.backend=wds, exact mode, shards of 100 samples
  ffcv            ours, data.backend=ffcv, jpg mode q90, FFCV's RandomResizedCrop decoder + flip; and the
                  same with ffcv-imagenet's ResNet-50 storage (proportion mode: half the images raw pixels)
  decode-only     read + decode_jpeg of every file in `--workers` processes, nothing else: the ceiling
                  of any pipeline that has to decode full JPEGs
Each pipeline also runs as the trainer uses it ("train" rows: augment=imagenet adds ColorJitter and the
output is normalised float32) for information. One untimed warm-up epoch each (FFCV compiles), then
`--rounds` rounds of one timed epoch per pipeline (the baseline, the default loader and the ceiling twice,
in ABC...CBA order). Ratios are computed within each round and their median over rounds is reported, so a
change of machine load between rounds does not enter them; the rates are medians over rounds.

Before that, `stage_costs` times each step of the per-sample pipeline in one process (and what each of our
speed-ups replaced), so the table can say where the time goes.

    python bench/loader_bench.py [--images 1000] [--rounds 7] [--workers 2] [--out bench/out/loader.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

BATCH = 32


def prepare_data(folder: Path, images: int, workers: int) -> dict[str, Path]:
    """Generate the JPEGs once, convert them once (all cached under `folder`)."""
    from data_prep.__main__ import main as data_prep
    from data_prep.synthetic import generate

    classes = 10
    src = generate(folder / "jpeg", workers=workers, classes=classes, parts=16, min_size=375, max_size=500,
                   train_per_class=images // classes, test_per_class=1, progress=True)
    common = ["--dataset", "synthetic", "--root", str(src), "--workers", str(workers), "--quiet"]
    if data_prep(["to-wds", str(folder / "wds"), *common, "--samples-per-shard", "100"]) != 0:
        raise SystemExit("to-wds failed")
    paths = {"jpeg": src, "wds": folder / "wds"}
    try:
        import ffcv  # noqa: F401

        if data_prep(["to-ffcv", str(folder / "ffcv"), *common, "--write-mode", "jpg", "--jpeg-quality", "90"]) != 0:
            raise SystemExit("to-ffcv failed")
        # ffcv-imagenet's ResNet-50 recipe: half the images stored raw (no decode), half JPEG
        if data_prep(["to-ffcv", str(folder / "ffcv-proportion"), *common, "--write-mode", "proportion",
                      "--compress-probability", "0.5", "--max-side", "500", "--jpeg-quality", "90"]) != 0:
            raise SystemExit("to-ffcv failed")
        paths["ffcv"], paths["ffcv-proportion"] = folder / "ffcv", folder / "ffcv-proportion"
    except ImportError:
        print("FFCV is not installed: its rows are skipped")
    return paths


# ----------------------------------------------------------------------------------------- pipelines
class DecodeOnly(Dataset):
    """Read and decode one file; return only its size, so nothing but decoding costs time."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from qpm_dist.data.decode import read_image

        return torch.tensor(read_image(self.files[i]).shape)


def rrc_flip():
    """The geometry of our `imagenet` recipe (qpm_dist.data.transforms), uint8 out."""
    from torchvision.transforms import v2

    from qpm_dist.data.transforms import RandomResizedCrop

    return v2.Compose([RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()])


def build_pipelines(paths: dict[str, Path], workers: int) -> dict[str, object]:
    """name -> an object whose iteration is one epoch of (images, labels) batches."""
    import torchvision
    from torchvision import transforms as T

    from qpm_dist.config import DataConfig
    from qpm_dist.data.sources import build_datasets
    from qpm_dist.data.loaders import TrainLoader
    from qpm_dist.data.wds_loader import TrainStream, WebDatasetSource, WebDatasetTrainLoader

    def cfg(**kw) -> DataConfig:
        return DataConfig(**{**dict(dataset="synthetic", root=str(paths["jpeg"]), img_size=224, augment="imagenet",
                                    num_workers=workers), **kw})

    folder = build_datasets(cfg(), seed=0)
    pipes: dict[str, object] = {}
    pil = torchvision.datasets.ImageFolder(
        str(paths["jpeg"] / "images"),
        transform=T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.PILToTensor()]))
    pipes["folder+PIL (baseline)"] = DataLoader(pil, batch_size=BATCH, shuffle=True, drop_last=True,
                                                num_workers=workers, persistent_workers=workers > 0)

    def folder_loader(decoder: str, transform=None) -> TrainLoader:
        data = build_datasets(cfg(decoder=decoder), seed=0).dataset("train", augment=True)
        if transform is not None:
            data.transform = transform
        return TrainLoader(data, BATCH, BATCH, 0, 1, seed=0, num_workers=workers)

    pipes["folder+decode_jpeg (ours, default)"] = folder_loader("torchvision", rrc_flip())
    pipes["folder+PIL (ours, data.decoder=pil)"] = folder_loader("pil", rrc_flip())
    wds_cfg = cfg(backend="wds", converted=str(paths["wds"]))
    urls, counts = WebDatasetSource(wds_cfg, 0).shards("train")
    pipes["wds (ours, exact mode)"] = WebDatasetTrainLoader(
        TrainStream(urls, counts, BATCH, BATCH, 0, 1, workers, 0, rrc_flip(), wds_cfg), workers)
    if "ffcv" in paths:
        from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
        from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage

        for name, folder_name in (("ffcv (ours, jpg q90)", "ffcv"),
                                  ("ffcv-proportion (ours, 50% raw, 50% jpg q90)", "ffcv-proportion")):
            ffcv_source = build_datasets(cfg(backend="ffcv", converted=str(paths[folder_name])), seed=0)
            loader = ffcv_source.train_loader(BATCH, BATCH, 0, 1)
            ops = [RandomResizedCropRGBImageDecoder((224, 224)), RandomHorizontalFlip(), ToTensor(), ToTorchImage()]
            loader.loader = type(loader.loader)(  # same file, order and threads; uint8 output like the others
                ffcv_source.files["train"], batch_size=BATCH, num_workers=max(1, workers), order=loader.order,
                indices=ffcv_source.rows["train"], pipelines={"image": ops, "index": None}, drop_last=True)
            pipes[name] = loader
    files = [paths["jpeg"] / "images" / p for p in folder.train_split.paths]
    pipes["decode only (ceiling)"] = DataLoader(DecodeOnly(files), batch_size=BATCH, num_workers=workers,
                                                persistent_workers=workers > 0)
    # as the trainer receives them: augment=imagenet (+ColorJitter), normalised float32
    pipes["train: folder+decode_jpeg"] = build_datasets(cfg(), seed=0).train_loader(BATCH, BATCH, 0, 1)
    pipes["train: wds"] = build_datasets(wds_cfg, seed=0).train_loader(BATCH, BATCH, 0, 1)
    if "ffcv" in paths:
        pipes["train: ffcv"] = build_datasets(cfg(backend="ffcv", converted=str(paths["ffcv"])), 0).train_loader(
            BATCH, BATCH, 0, 1)
    return pipes


def stage_costs(files: list[Path], reps: int = 5) -> dict[str, float]:
    """Single-process cost of each step, microseconds per image (median of `reps` passes over 200 images):
    what the per-sample pipeline spends where, and the effect of each speed-up against what it replaced."""
    from torchvision.io import decode_jpeg
    from torchvision.transforms import v2

    from qpm_dist.data.datasets import seeded_cpu_rng
    from qpm_dist.data.decode import read_bytes
    from qpm_dist.data.loaders import collate
    from qpm_dist.data.transforms import RandomResizedCrop

    files = files[:200]
    raw = [read_bytes(f) for f in files]
    images = [decode_jpeg(torch.from_numpy(r)) for r in raw]
    theirs, ours = v2.RandomResizedCrop(224, antialias=True), RandomResizedCrop(224, antialias=True)
    torch.manual_seed(0)
    params = [theirs.make_params([im]) for im in images]  # the same crops for both
    crops = [ours.transform(im, p) for im, p in zip(images, params)]
    floats = [v2.ToDtype(torch.float32, scale=True)(c) for c in crops]
    jitter = v2.ColorJitter(0.1, 0.1, 0.1)

    def old_seeding(i):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(i)

    def new_seeding(i):
        with seeded_cpu_rng(i):
            pass

    steps = {
        "read file": lambda i: read_bytes(files[i]),
        "decode_jpeg": lambda i: decode_jpeg(torch.from_numpy(raw[i])),
        "RandomResizedCrop 224, torchvision v2": lambda i: theirs.transform(images[i], params[i]),
        "RandomResizedCrop 224, ours (channels-last crop)": lambda i: ours.transform(images[i], params[i]),
        "horizontal flip": lambda i: crops[i].flip(-1),
        "collate (per image, batches of 32)": lambda i: collate([(c, 0) for c in crops[i:i + 32]]) if i % 32 == 0 else None,
        "per-sample seeding: fork_rng + torch.manual_seed (before)": old_seeding,
        "per-sample seeding: seeded_cpu_rng (now)": new_seeding,
        "ColorJitter(0.1, 0.1, 0.1) on uint8 (before)": lambda i: jitter(crops[i]),
        "ColorJitter(0.1, 0.1, 0.1) on float32 (now)": lambda i: jitter(floats[i]),
    }
    costs: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            start = time.perf_counter()
            for i in range(len(files)):
                step(i)
            costs[name].append((time.perf_counter() - start) / len(files) * 1e6)
    return {name: round(statistics.median(v), 1) for name, v in costs.items()}


def run_epoch(pipe, epoch: int) -> tuple[int, float]:
    if hasattr(pipe, "set_epoch"):
        pipe.set_epoch(epoch)
    count, start = 0, time.perf_counter()
    for batch in pipe:
        count += len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch)
    return count, time.perf_counter() - start


BASELINE, DEFAULT, CEILING = "folder+PIL (baseline)", "folder+decode_jpeg (ours, default)", "decode only (ceiling)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("bench/out/loader_data"))
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/out/loader.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    paths = prepare_data(args.data, args.images, args.workers)
    files = sorted((paths["jpeg"] / "images").rglob("*.jpg"))
    costs = stage_costs(files)
    pipes = build_pipelines(paths, args.workers)
    for pipe in pipes.values():  # warm-up: worker start, FFCV's JIT compilation
        run_epoch(pipe, 0)
    # Each round: the three pipelines of the targets in ABC order, every other pipeline, then CBA; the
    # targets' ratios are taken within a round (the other developers' jobs on this machine change the
    # available CPU from minute to minute, so only ratios measured close together are meaningful).
    key = [CEILING, BASELINE, DEFAULT]
    order = key + [k for k in pipes if k not in key] + key[::-1]
    load_before = os.getloadavg()
    rates: dict[str, list[float]] = {name: [] for name in pipes}
    round_ratios: dict[str, list[float]] = {"default_vs_baseline": [], "default_vs_ceiling": []}
    for r in range(args.rounds):
        this: dict[str, list[float]] = {}
        for name in order:
            count, seconds = run_epoch(pipes[name], r + 1)
            this.setdefault(name, []).append(count / seconds)
        for name, values in this.items():
            rates[name].append(statistics.mean(values))
        mean = {k: statistics.mean(v) for k, v in this.items()}
        round_ratios["default_vs_baseline"].append(mean[DEFAULT] / mean[BASELINE])
        round_ratios["default_vs_ceiling"].append(mean[DEFAULT] / mean[CEILING])
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k.split(' (')[0]} {v:.0f}" for k, v in mean.items())
              + f" | default/baseline {round_ratios['default_vs_baseline'][-1]:.2f}, "
                f"default/ceiling {round_ratios['default_vs_ceiling'][-1]:.2f}", flush=True)
    median = {k: statistics.median(v) for k, v in rates.items()}
    per_round = {k: [rates[k][i] / rates[BASELINE][i] for i in range(args.rounds)] for k in rates}
    per_round_ceiling = {k: [rates[k][i] / rates[CEILING][i] for i in range(args.rounds)] for k in rates}
    result = {
        "command": "python bench/loader_bench.py " + " ".join(
            f"--{k} {v}" for k, v in (("images", args.images), ("rounds", args.rounds), ("workers", args.workers))),
        "machine": {"cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "load_avg_before": [round(x, 2) for x in load_before],
                    "load_avg_after": [round(x, 2) for x in os.getloadavg()]},
        "images": args.images, "batch": BATCH, "workers": args.workers,
        "stage_costs_us_per_image": costs,
        "rates_per_round": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "median_images_per_s": {k: round(v, 1) for k, v in median.items()},
        "median_ratio_vs_baseline": {k: round(statistics.median(v), 3) for k, v in per_round.items()},
        "median_ratio_vs_ceiling": {k: round(statistics.median(v), 3) for k, v in per_round_ceiling.items()},
        "targets": {"default_vs_baseline": {"per_round": [round(x, 3) for x in round_ratios["default_vs_baseline"]],
                                            "median": round(statistics.median(round_ratios["default_vs_baseline"]), 3),
                                            "target": 1.4},
                    "default_vs_ceiling": {"per_round": [round(x, 3) for x in round_ratios["default_vs_ceiling"]],
                                           "median": round(statistics.median(round_ratios["default_vs_ceiling"]), 3),
                                           "target": 0.7}},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\n| pipeline | images/s (median of {args.rounds} rounds) | vs folder+PIL | vs decode-only |")
    print("|---|---:|---:|---:|")
    for name in pipes:
        print(f"| {name} | {median[name]:.0f} | {result['median_ratio_vs_baseline'][name]:.2f}x | "
              f"{100 * result['median_ratio_vs_ceiling'][name]:.0f}% |")
    print("\n(ratios: median over rounds of the ratio within each round)")
    print("\n| step (one process) | us per image |\n|---|---:|")
    for name, cost in costs.items():
        print(f"| {name} | {cost:.0f} |")
    for name, t in result["targets"].items():
        print(f"{name}: median {t['median']:.2f} (target {t['target']}), per round {t['per_round']}")
    print(f"load average before/after: {result['machine']['load_avg_before']} / {result['machine']['load_avg_after']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
