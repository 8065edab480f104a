"""SPG by one distance transform per image (ours) against the reference's per-sample meshgrids, and the whole
pointing-metric pass.

The reference's stochastic pointing game (spec §7.3; `evaluate_imagenet_gradcam_stochastic_pointinggame.py`)
draws 100 pixels from H, the class's Grad-CAM as a distribution over the original image's pixels, and for each
one builds a full-image meshgrid of squared distances to it and tests whether any box pixel is closer than 15 px:
O(100·H·W) per image. Ours (`qpm_dist.metrics.pointing`, spec §10.6) computes the expectation of that score
exactly, the mass of H within 15 px of the mask, from one Euclidean distance transform per image and class.

Part 1, same heatmaps and masks for both, ImageNet-like sizes (sides 333–500 px, boxes covering 10–60 % of the
image, one or two per image, heatmaps a bilinear upsampling of random 7 x 7 to 16 x 16 Grad-CAM-like maps):
* throughput, images/s: ours (`near_mask` + `stochastic_pointing`) against the reference re-implemented in torch
  as it is written (the draw with `np.random.choice`, then 100 meshgrids), whole passes over the images in ABBA
  order, ratio of the medians; and our complete per-image scoring (`score_image`: PG, exact and sampled SPG, CH);
* agreement: the reference's hit for every drawn point equals our dilated mask at that point (exact), and the
  reference's mean over the images (a Monte-Carlo estimate) is within 3 σ of our exact mean (the bench stops
  otherwise).
Part 2, the whole metric pass `pointing_metrics` (tiny ResNet, 224 px test transform) on synthetic JPEGs of
375–500 px with their object boxes, against a plain forward pass over the same loader (what the scoring adds).

    OMP_NUM_THREADS=1 python bench/pointing_bench.py [--images 100] [--rounds 2] [--out bench/out/pointing.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from gc_bench import machine
from qpm_dist.metrics import pointing as P

SAMPLES = 100
TOLERANCE = 15


def random_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(heatmap H x W summing to 1, boxes N x 4 as x, y, w, h) of an ImageNet-like validation image."""
    height, width = (int(v) for v in rng.choice([333, 375, 400, 450, 500], size=2))
    h, w = (int(v) for v in rng.integers(7, 17, size=2))
    cam = torch.from_numpy(rng.gamma(0.5, 1.0, size=(h, w)))
    heatmap = P.source_heatmap(cam, height, width, (0, 0, width, height))
    boxes = []
    for _ in range(int(rng.integers(1, 3))):
        area = rng.uniform(0.1, 0.6) * height * width
        aspect = rng.uniform(0.5, 2.0)
        bw, bh = min(width, np.sqrt(area * aspect)), min(height, np.sqrt(area / aspect))
        boxes.append([rng.uniform(0, width - bw), rng.uniform(0, height - bh), bw, bh])
    return heatmap, np.array(boxes)


def ours(heatmap: np.ndarray, boxes: np.ndarray) -> float:
    """The exact SPG of one image: one distance transform."""
    return P.stochastic_pointing(heatmap, P.near_mask(P.box_mask(boxes, *heatmap.shape), TOLERANCE))


def reference(heatmap: np.ndarray, boxes: np.ndarray, rng: np.random.Generator) -> tuple[float, np.ndarray,
                                                                                         np.ndarray]:
    """The reference's SPG of one image as it is written: 100 draws from H, for each a full-image meshgrid of
    squared distances (float32) and a hit if any mask pixel is closer than the tolerance. Returns the score,
    the drawn flat indices and their hits."""
    h, w = heatmap.shape
    gt_mask = torch.from_numpy(P.box_mask(boxes, h, w))  # the reference's mask is a torch bool tensor too
    drawn = rng.choice(np.arange(h * w), SAMPLES, p=heatmap.ravel())
    hits = np.zeros(SAMPLES, dtype=bool)
    for n, index in enumerate(drawn):
        row, col = np.unravel_index(index, (h, w))
        v, u = torch.meshgrid((torch.arange(h, dtype=torch.float32) - row) ** 2,
                              (torch.arange(w, dtype=torch.float32) - col) ** 2, indexing="ij")
        hits[n] = bool((gt_mask & ((v + u) < TOLERANCE ** 2)).view(-1).any())
    return float(hits.mean()), drawn, hits


def spg_comparison(images: int, rounds: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    cases = [random_case(rng) for _ in range(images)]
    # agreement first (one reference pass with its draws kept)
    exact = np.array([ours(heatmap, boxes) for heatmap, boxes in cases])
    sampled, mismatched, drawn_total = [], 0, 0
    for (heatmap, boxes), rng_case in zip(cases, np.random.default_rng(seed + 1).spawn(images)):
        score, drawn, hits = reference(heatmap, boxes, rng_case)
        near = P.near_mask(P.box_mask(boxes, *heatmap.shape), TOLERANCE)
        mismatched += int((near.ravel()[drawn] != hits).sum())
        drawn_total += len(drawn)
        sampled.append(score)
    sigma = float(np.sqrt((exact * (1 - exact)).sum() / SAMPLES) / images)  # σ of the Monte-Carlo mean
    difference = float(np.mean(sampled) - exact.mean())
    if mismatched or abs(difference) >= 3 * sigma:
        raise SystemExit(f"ours and the reference disagree: {mismatched} of {drawn_total} drawn points scored "
                         f"differently; mean exact {exact.mean():.5f} vs sampled {np.mean(sampled):.5f} "
                         f"(difference {difference:+.5f}, 3σ = {3 * sigma:.5f})")
    # throughput: whole passes over the images, ABBA
    score_rng = np.random.default_rng(seed + 2)
    passes = {
        "ours": lambda: [ours(heatmap, boxes) for heatmap, boxes in cases],
        "reference": lambda: [reference(heatmap, boxes, score_rng) for heatmap, boxes in cases],
        "ours_score_image": lambda: [P.score_image(heatmap, boxes, score_rng) for heatmap, boxes in cases],
    }
    times: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(rounds):
        for name in ("ours", "reference", "reference", "ours", "ours_score_image"):
            start = time.perf_counter()
            passes[name]()
            times[name].append(time.perf_counter() - start)
    rate = {name: images / statistics.median(t) for name, t in times.items()}
    return {"images": images, "mean_pixels": float(np.mean([c[0].size for c in cases])),
            "mean_box_fraction": float(np.mean([P.box_mask(b, *h.shape).mean() for h, b in cases])),
            "exact_mean": float(exact.mean()), "reference_mean": float(np.mean(sampled)), "difference": difference,
            "three_sigma": 3 * sigma, "drawn_points": drawn_total, "mismatched_points": mismatched,
            "ours_images_per_s": rate["ours"], "reference_images_per_s": rate["reference"],
            "score_image_images_per_s": rate["ours_score_image"], "speedup": rate["ours"] / rate["reference"],
            "times_s": times}


def metric_pass(root: Path, rounds: int) -> dict:
    """images/s of `pointing_metrics` against a forward-only pass over the same loader, tiny ResNet, 1 process."""
    from data_prep.synthetic import generate
    from qpm_dist import dist
    from qpm_dist.config import DataConfig, ModelConfig
    from qpm_dist.data.sources import read_splits
    from qpm_dist.engine.streaming import model_outputs
    from qpm_dist.models.net import build_model

    generate(root, workers=1, classes=10, parts=16, min_size=375, max_size=500, train_per_class=1,
             test_per_class=10)
    data = read_splits(DataConfig(dataset="synthetic", root=str(root), img_size=224, num_workers=0))
    info = dist.init("cpu")
    try:
        torch.manual_seed(0)
        model = build_model(ModelConfig(arch="tiny_resnet", tiny_width=16), data.num_classes)
        images = len(data.test_split.paths)

        def forward_only():
            loader = data.eval_loader("test", 16, info.rank, info.world_size, return_index=True)
            with torch.no_grad():
                for _ in model_outputs(model, loader, info, contextlib.nullcontext):
                    pass

        passes = {"forward": forward_only,
                  "pointing": lambda: P.pointing_metrics(model, data, info, contextlib.nullcontext, batch_size=16)}
        times: dict[str, list[float]] = {name: [] for name in passes}
        result = passes["pointing"]()  # warm-up, and the numbers it gives
        for _ in range(rounds):
            for name in ("forward", "pointing", "pointing", "forward"):
                start = time.perf_counter()
                passes[name]()
                times[name].append(time.perf_counter() - start)
    finally:
        dist.shutdown()
    forward, pointing = (images / statistics.median(times[k]) for k in ("forward", "pointing"))
    return {"images": images, "forward_images_per_s": forward, "pointing_images_per_s": pointing,
            "pointing_vs_forward_time": forward / pointing, "times_s": times,
            "metrics": {k: result[k] for k in ("pointing_game", "stochastic_pointing",
                                               "stochastic_pointing_sampled", "content_heatmap",
                                               "pointing_images")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100, help="heatmap/box cases of part 1")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds")
    parser.add_argument("--data", type=Path, default=Path("bench/out/pointing_data"),
                        help="where part 2's synthetic JPEGs are generated once")
    parser.add_argument("--out", default="bench/out/pointing.json")
    args = parser.parse_args()
    before = machine()
    print(f"threads {before['torch_threads']} (OMP_NUM_THREADS={before['omp_num_threads']}), "
          f"load average {before['load_average']}", flush=True)
    spg = spg_comparison(args.images, args.rounds)
    print(f"SPG on {spg['images']} images of {spg['mean_pixels'] / 1e3:.0f}k px on average (boxes "
          f"{100 * spg['mean_box_fraction']:.0f} %): ours {spg['ours_images_per_s']:.1f} images/s, reference "
          f"meshgrids {spg['reference_images_per_s']:.2f} images/s, speed-up {spg['speedup']:.0f}x; our whole "
          f"per-image scoring (PG, SPG exact + sampled, CH) {spg['score_image_images_per_s']:.1f} images/s", flush=True)
    print(f"agreement: {spg['mismatched_points']} of {spg['drawn_points']} drawn points scored differently; mean "
          f"exact {spg['exact_mean']:.4f} vs reference {spg['reference_mean']:.4f} (difference "
          f"{spg['difference']:+.4f}, 3σ = {spg['three_sigma']:.4f})", flush=True)
    passes = metric_pass(args.data, args.rounds)
    print(f"metric pass on {passes['images']} synthetic test images: pointing_metrics "
          f"{passes['pointing_images_per_s']:.1f} images/s, forward only {passes['forward_images_per_s']:.1f} "
          f"images/s ({passes['pointing_vs_forward_time']:.2f}x the time)", flush=True)
    after = machine()
    print(f"load average after {after['load_average']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine_before": before, "machine_after": after, "rounds": args.rounds,
                               "spg": spg, "metric_pass": passes}, indent=1))


if __name__ == "__main__":
    main()
