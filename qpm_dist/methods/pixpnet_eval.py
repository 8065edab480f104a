"""PixPNet's evaluation and report stages (specs/pixpnet.md §1.5, §4, §4.6; issue 16 items 4 and 5).

`pixpnet_evaluate` (`PixPNetEvaluateStage`) writes metrics.json {"pixpnet": {...}} (plus {"dense": {...}} when a
baseline stage is given) with, for the prototype model:

* the generic metrics every classifier gets (metrics.collect.evaluate_model): accuracy, top-5, diversity@k / SID@k
  over each class's prototypes (k up to the prototypes per class), class independence, correlation, dependence,
  contrastiveness (prototypes = features; skipped above eval.gmm_max_features as for any model), and the pointing
  game / SPG / content heatmap of the true class's Grad-CAM (the autograd path: the prototype head has no closed
  form; its similarity maps are the "feature maps" on the path to the logits). On the synthetic data also the
  part localisation of each prototype's peak (metrics.parts, features matched to parts by localisation).
  Left out on purpose, because the `proto` read-out's class_weights() is the fixed one-hot prototype -> class
  identity, so they measure the configuration, not the training: structural grounding (the one-hot rows of two
  classes never share a prototype: Q = 0 for every pair), the class-part links read from weights (part_recovery,
  precision, F1, negative links, and part_links_by_localisation: a prototype belongs to one class, so it can
  recover at most one class per part). `NFfeatures` / `PerClass` stay: the number of prototypes and prototypes
  per class, what the comparison shows as the model's size next to a sparse head's features.
* consistency and stability (§4.3, §4.4; metrics.prototypes.prototype_part_scores) of the true class's prototypes
  for three pixel-space mappings of the argmin cell: `ours` (the centre of its receptive-field box,
  models.receptive_fields), `upsample` (ProtoPNet's naive cell centre), `random` (a uniform point): keys
  consistency_soft_<m>, consistency_hard_<m>, stability_soft_<m>, stability_hard_<m>, plus part_images,
  consistency_prototypes, stability_prototypes (what the scores are over). Needs part annotations
  (metrics.prototypes.split_parts: CUB keypoints, the synthetic data's part boxes or keypoints, `synthetic_parts`)
  and the test split's image list (the folder backend); otherwise skipped, with the reason logged and stored as
  `prototype_parts_skipped`.
* the relevance ordering test (§4.5; metrics.prototypes.relevance_ordering_test) of the same three mappings'
  relevance maps (`ours`: models.pixel_maps.rf_heat_maps, the max combination; `upsample`: bicubic upsampling of
  the similarity map; `random`: U[0, 1) maps) on the first `rot_samples` test images (loader order, the
  reference's notebook), each with its true class's prototypes, from the spec's N(0, 1) baseline (seed
  `rot_seed`): keys rot_area_<m>, rot_pct_<m> (% of pixels at which the curve first reaches its end value, lower
  is better), rot_curve_<m> (list), rot_pct_pixels (list), rot_pairs.

Distributed as the metric functions are: every rank scores its shard of the test set (the loader's rank::world
split; ROT: the ranks' shares of the first `rot_samples` images) and one all-reduce per table combines them, so every
rank holds the same results. The forwards of the consistency/stability pass always have `batch_size` images (a short
batch is padded with copies of its last image, as the push does, methods.pixpnet_push): an image's argmin cells
then do not depend on the world size (CPU kernels pick algorithms by shape). ROT's forwards are per image and per
chunk of steps, the same on any world size.

`pixpnet_report` (`PixPNetReportStage`, or `ReportStage` with `pixpnet_report_sections`) shows, per class (up to
report.max_classes), each prototype: the training image it was pushed to (the head's `source_sample` /
`source_cell` buffers) with the receptive-field box of that cell drawn, the box's crop (the prototype "patch"),
and the max heat map (rf_heat_maps) of the class's best test image (report.sparse.best_examples) with the box of
the test image's own best-matching cell. One figure per prototype. The push scans the un-augmented training split
(data.eval_loader("train", ...)), so `data.dataset("train", augment=False)[sample]` is the exact input it saw;
backends without random access (ffcv, wds) get the heat maps without the source patches, and a note.

API for the method module (pixpnet.py):
* `PixPNetEvalConfig` — the settings below; nest it in the `pixpnet:` section (e.g. `pixpnet.eval`), and call
  `check_settings(cfg.pixpnet.eval, cfg.data.img_size, "pixpnet.eval")` from the method's `validate`;
* `PixPNetEvaluateStage(final_stage, settings, k, baseline=None, load=artifacts.load_model)` — `settings(cfg)` ->
  PixPNetEvalConfig, `k(cfg)` -> prototypes per class; `load(ctx, stage)` reads a stage's model (pass the method's
  loader while models.io does not rebuild truncated backbones);
* `evaluate_pixpnet(model, data, info, cfg, settings, autocast)` -> the metrics dict of one prototype model;
* `prototype_metrics(model, data, info, data_cfg, settings, autocast, seed)` -> the consistency/stability/ROT part
  (`rot_metrics` the ROT alone);
* `prototype_distances(model, images, ids)`, `cell_locator`, `rot_similarity`, `mapping_relevance` — the model
  callables the metric functions of metrics.prototypes take, computing only the prototypes asked for;
* `PixPNetReportStage(final_stage, k, load=...)` and `pixpnet_report_sections(inputs)` (MethodSpec.report_sections);
* `HEADLINE` — the method's headline keys.
"""

from __future__ import annotations

import contextlib
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import numpy as np
import torch
from torch import nn

from qpm_dist.config import Config, ConfigError, DataConfig, bounded, to_dict
from qpm_dist.dist import DistInfo
from qpm_dist.methods.pixpnet_push import padded_batch
from qpm_dist.metrics import prototypes as PM
from qpm_dist.metrics.collect import attributes_root, evaluate_model, ground_truth_class_similarity
from qpm_dist.metrics.interpretability import finite_or_none
from qpm_dist.metrics.parts import part_boxes_available, part_localisation
from qpm_dist.models.pixel_maps import rf_boxes, rf_heat_maps, upsample_maps
from qpm_dist.models.protonet import PrototypeHead, nearest_cells
from qpm_dist.models.receptive_fields import ReceptiveFields, receptive_fields
from qpm_dist.stages.artifacts import METRICS, load_model, write_json
from qpm_dist.stages.evaluate import EvaluateStage
from qpm_dist.stages.report import ReportStage
from qpm_dist.stages.runner import RunContext
from qpm_dist.utils import log

Autocast = Callable[[], contextlib.AbstractContextManager]

# accuracy, then the prototype metrics of the paper (our mapping; the others are next to them in the table), then
# the Grad-CAM metrics every classifier has (shared with GC, so the comparison can plot them side by side)
HEADLINE = ("accuracy", "consistency_hard_ours", "stability_hard_ours", "rot_area_ours", "pointing_game",
            "stochastic_pointing", "content_heatmap")

# metrics.collect keys computed from class_weights(), constant for the one-hot `proto` read-out (module docstring)
WEIGHT_ONLY_METRICS = ("structural_grounding", "structural_grounding_positive", "part_recovery",
                       "part_recovery_random", "part_precision", "part_f1", "negative_links",
                       "negative_links_on_absent_parts", "feature_part_matching", "part_links_by_localisation")


@dataclass
class PixPNetEvalConfig:
    # Per-rank images per forward of the consistency/stability pass, the same on every world size (module docstring).
    batch_size: int = bounded(32, ge=1, le=1024)
    # Stability's Gaussian noise in normalised input space (Huang et al.: 0.2) and the hard-consistency threshold.
    noise_std: float = bounded(PM.NOISE_STD, ge=0, le=10)
    consistency_threshold: float = bounded(PM.CONSISTENCY_THRESHOLD, ge=0, le=1)
    # The RF heat map's Gaussian: sigma = largest RF side x sigma_factor (spec §1.5; the reference's 1.0).
    sigma_factor: float = bounded(1.0, gt=0, le=100)
    # ROT: the first rot_samples test images (0 skips ROT; the reference's notebook: 50), pixels added back in chunks
    # of rot_step_fraction of the image up to rot_prop_pixels of it (at most PM.MAX_ROT_STEPS steps), rot_batch_size
    # perturbed images per forward, the N(0, 1) baseline drawn with rot_seed (the reference's 4). Work:
    # rot_samples x prototypes per class x (steps + 1) images per mapping, three mappings.
    rot_samples: int = bounded(50, ge=0, le=PM.MAX_ROT_SAMPLES)
    rot_step_fraction: float = bounded(0.01, gt=0, le=1)
    rot_prop_pixels: float = bounded(1.0, gt=0, le=1)
    rot_batch_size: int = bounded(64, ge=1, le=PM.MAX_ROT_BATCH)
    rot_seed: int = bounded(4, ge=0, le=2_000_000_000)
    # The synthetic data's part annotations for consistency/stability (metrics.prototypes.split_parts): "boxes"
    # (every drawn part's box, distractors included) or "keypoints" (each own class part's centre: CUB's protocol,
    # spec §4.1). CUB always uses its keypoints.
    synthetic_parts: Literal["boxes", "keypoints"] = "boxes"



def check_settings(settings: PixPNetEvalConfig, img_size: int, key: str) -> None:
    """For the method's `validate` (it needs data.img_size): ROT's number of steps at this input size is within
    PM.MAX_ROT_STEPS, so a bad setting is refused before training, not at the evaluation."""
    if settings.rot_samples == 0:
        return
    try:
        PM.rot_pixel_counts((img_size, img_size), settings.rot_step_fraction, settings.rot_prop_pixels)
    except PM.PrototypeMetricError as exc:
        raise ConfigError(f"{key}.rot_step_fraction / rot_prop_pixels at data.img_size={img_size}: {exc}") from None


# ---------------------------------------------------------------------------------------------------------------
# Model access: the prototype head's pieces, restricted to the prototypes asked for


def prototype_head(model: nn.Module) -> PrototypeHead:
    head = getattr(model, "head", None)
    if not isinstance(head, PrototypeHead):
        raise TypeError(f"PixPNet evaluation needs a Classifier with a PrototypeHead, got head {type(head).__name__}")
    return head


def class_prototype_ids(head: PrototypeHead) -> torch.Tensor:
    """C x M: the prototype ids of each class (prototype j belongs to class j // M)."""
    return torch.arange(head.num_prototypes).view(head.num_classes, head.per_class)


def input_receptive_fields(model: nn.Module, size: int) -> ReceptiveFields:
    """The receptive fields of the model's own backbone at the test input size (traced, not run: milliseconds)."""
    return receptive_fields(model.backbone, size, size)


def prototype_distances(model: nn.Module, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """B x P' x Hz x Wz distances (fp32) of the prototypes `ids` only (P' ids for all images, or B x P' per image):
    the other prototypes' distances are never computed (spec §7.2)."""
    head = prototype_head(model)
    latent = head.latent(model.backbone(images))
    return head.distances(latent, head.prototypes[ids.to(head.prototypes.device)])


def cell_locator(model: nn.Module, batch_size: int, autocast: Autocast
                 ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`locate(images, ids B x P')` -> B x P' x 2 argmin cells (h, w), for prototype_part_scores; every forward has
    exactly `batch_size` images."""

    @torch.no_grad()
    def locate(images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        cells = []
        for start in range(0, len(images), batch_size):
            part, part_ids = images[start:start + batch_size], ids[start:start + batch_size]
            n = len(part)
            padded_ids = torch.cat([part_ids, part_ids[-1:].expand(batch_size - n, -1)])
            with autocast():
                distances = prototype_distances(model, padded_batch(part, batch_size), padded_ids)[:n]
            cells.append(nearest_cells(distances)[1].cpu())
        flat = torch.cat(cells)
        width = distances.shape[-1]
        return torch.stack([flat // width, flat % width], dim=-1)

    return locate


def rot_similarity(model: nn.Module, autocast: Autocast) -> Callable[[torch.Tensor, list[int]], torch.Tensor]:
    """similarity(images, ids) -> B x len(ids) max similarities (sim of the min distance: the activations decrease)."""
    head = prototype_head(model)

    @torch.no_grad()
    def similarity(images: torch.Tensor, ids: list[int]) -> torch.Tensor:
        with autocast():
            distances = prototype_distances(model, images, torch.tensor(ids))
        return head.similarity(nearest_cells(distances)[0])

    return similarity


def mapping_relevance(model: nn.Module, rf: ReceptiveFields, mapping: str, sigma_factor: float, seed: int,
                      autocast: Autocast) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """relevance(image, ids, index) -> P' x H x W maps of one mapping (ours: RF heat map, max; upsample: bicubic;
    random: seeded U[0, 1))."""
    if mapping == "random":
        return PM.random_relevance(seed)
    if mapping not in ("ours", "upsample"):
        raise ValueError(f"unknown mapping {mapping!r}; expected one of {PM.MAPPINGS}")

    @torch.no_grad()
    def relevance(image: torch.Tensor, ids: torch.Tensor, index: int) -> torch.Tensor:
        with autocast():
            sims = prototype_head(model).similarity(prototype_distances(model, image[None], ids))[0]
        if mapping == "ours":
            return rf_heat_maps(sims, rf, sigma_factor).max
        return upsample_maps(sims, rf.input_size)

    return relevance


# ---------------------------------------------------------------------------------------------------------------
# The metrics


def _test_batches(loader: Iterable, device: torch.device, limit: int | None = None) -> Iterator[tuple]:
    """(images on the device, labels, indices) of a loader with return_index; with `limit`, only the images whose
    index is below it (the first `limit` test images in loader order), stopping at the first batch without one (a
    rank's shard comes in ascending index order: eval_loader's rank::world)."""
    for images, labels, indices in loader:
        if limit is not None:
            keep = indices < limit
            if not keep.any():
                break
            images, labels, indices = images[keep], labels[keep], indices[keep]
        yield images.to(device, non_blocking=True), labels, indices


def _renamed(scores: dict, mappings=PM.MAPPINGS) -> dict:
    """prototype_part_scores' "<mapping>_<metric>_<kind>" keys -> "<metric>_<kind>_<mapping>"."""
    out = {}
    for key, value in scores.items():
        mapping = next((m for m in mappings if key.startswith(f"{m}_")), None)
        out[key if mapping is None else f"{key[len(mapping) + 1:]}_{mapping}"] = value
    return out


def prototype_metrics(model: nn.Module, data, info: DistInfo, data_cfg: DataConfig, settings: PixPNetEvalConfig,
                      autocast: Autocast, seed: int = 0) -> dict[str, Any]:
    """Consistency, stability and ROT of the three mappings (module docstring); every rank calls it, every rank gets
    the same dict."""
    model.eval()
    head = prototype_head(model)
    size = data_cfg.img_size
    rf = input_receptive_fields(model, size)
    classes = class_prototype_ids(head)
    result: dict[str, Any] = {}
    split = getattr(data, "test_split", None)
    try:
        if split is None:
            raise PM.PrototypeMetricError(f"data.backend={data_cfg.backend}: the test split's image list (to join part "
                                          f"annotations on) is read from the folder backend only")
        num_parts, parts_of = PM.split_parts(data_cfg, split, settings.synthetic_parts)
    except PM.PrototypeMetricError as exc:
        log.info("evaluate: consistency and stability skipped: %s", exc)
        result["prototype_parts_skipped"] = str(exc)
    else:
        log.info("evaluate: prototype consistency and stability (%d parts)", num_parts)
        loader = data.eval_loader("test", settings.batch_size, info.rank, info.world_size, return_index=True)
        scores = PM.prototype_part_scores(
            _test_batches(loader, info.device), cell_locator(model, settings.batch_size, autocast), classes,
            torch.as_tensor(rf.bounds), parts_of, num_parts, seed=seed, noise_std=settings.noise_std,
            threshold=settings.consistency_threshold, device=info.device)
        result.update(_renamed(scores))
    if settings.rot_samples > 0:
        result.update(rot_metrics(model, data, info, rf, classes, settings, autocast, seed))
    return result


def rot_metrics(model: nn.Module, data, info: DistInfo, rf: ReceptiveFields, classes: torch.Tensor,
                settings: PixPNetEvalConfig, autocast: Autocast, seed: int = 0) -> dict[str, Any]:
    """ROT of every mapping on the first rot_samples test images, each rank those of its shard."""
    n = min(settings.rot_samples, data.num_samples("test"))
    shape = (3, *rf.input_size)
    baseline = PM.rot_baseline(shape, settings.rot_seed)
    similarity = rot_similarity(model, autocast)
    result: dict[str, Any] = {}
    for mapping in PM.MAPPINGS:
        log.info("evaluate: relevance ordering test, %s mapping (%d images)", mapping, n)
        loader = data.eval_loader("test", settings.batch_size, info.rank, info.world_size, return_index=True)
        batches = ((images, classes[labels.long()], indices.tolist())
                   for images, labels, indices in _test_batches(loader, info.device, limit=n))
        summary = PM.relevance_ordering_test(
            batches, similarity, mapping_relevance(model, rf, mapping, settings.sigma_factor, seed, autocast),
            prototype_head(model).num_prototypes, shape, num_samples=max(1, n), baseline=baseline,
            step_fraction=settings.rot_step_fraction, prop_pixels=settings.rot_prop_pixels,
            batch_size=settings.rot_batch_size, device=info.device)
        result[f"rot_area_{mapping}"] = finite_or_none(summary["rot_area"])
        result[f"rot_pct_{mapping}"] = summary["rot_pct_at_orig_sim"]
        result[f"rot_curve_{mapping}"] = summary["rot_curve"]
        result["rot_pct_pixels"], result["rot_pairs"] = summary["rot_pct_pixels"], summary["rot_pairs"]
    return result


def evaluate_pixpnet(model: nn.Module, data, info: DistInfo, cfg: Config, settings: PixPNetEvalConfig,
                     autocast: Autocast) -> dict[str, Any]:
    """All metrics of one prototype model (module docstring); identical dict on every rank."""
    head = prototype_head(model)
    model.eval()
    # no gt_similarity / class_parts: what they add is read from the one-hot class_weights() (WEIGHT_ONLY_METRICS)
    result = evaluate_model(model, data, info, cfg.eval, autocast, cfg.run.seed, n_per_class=head.per_class)
    if data.class_parts is not None and hasattr(data, "dataset") and part_boxes_available(Path(data.cfg.root)):
        per_rank = max(1, cfg.eval.batch_size // info.world_size)
        result.update(part_localisation(model, data, info, autocast, per_rank))
    result.update(prototype_metrics(model, data, info, cfg.data, settings, autocast, cfg.run.seed))
    return result


class PixPNetEvaluateStage(EvaluateStage):
    """`pixpnet_evaluate`: the prototype model of `final_stage` (and the dense model of `baseline`, if any, with
    the generic metrics). `settings(cfg)` -> PixPNetEvalConfig; `k(cfg)` -> prototypes per class."""

    def __init__(self, final_stage: str, settings: Callable[[Config], PixPNetEvalConfig], k: Callable[[Config], int],
                 baseline: str | None = None, method: str = "pixpnet",
                 load: Callable[[RunContext, str], nn.Module] = load_model) -> None:
        super().__init__(method, final_stage, k, baseline)
        self.settings, self.load = settings, load

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        return {**super().config_parts(cfg), "prototype_eval": to_dict(self.settings(cfg))}

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        results = {}
        if self.baseline:  # as EvaluateStage scores it, so the dense column matches the other methods'
            gt = ground_truth_class_similarity(attributes_root(ctx.cfg.data), ctx.data.class_parts)
            dense = load_model(ctx, self.baseline).to(ctx.info.device)
            log.info("evaluate: dense model")
            results["dense"] = evaluate_model(dense, ctx.data, ctx.info, ctx.cfg.eval, ctx.autocast, ctx.cfg.run.seed,
                                              gt_similarity=gt, class_parts=ctx.data.class_parts,
                                              n_per_class=self.k(ctx.cfg))
        model = self.load(ctx, self.final_stage).to(ctx.info.device)
        log.info("evaluate: %s model", self.method)
        results[self.method] = evaluate_pixpnet(model, ctx.data, ctx.info, ctx.cfg, self.settings(ctx.cfg),
                                                ctx.autocast)
        write_json(out_dir / METRICS, results)
        return {name: {k: v for k, v in r.items() if not isinstance(v, (list, dict))} for name, r in results.items()}


# ---------------------------------------------------------------------------------------------------------------
# The report


def _draw_box(ax, box: tuple[int, int, int, int], colour) -> None:
    """A half-open pixel box (x1, y1, x2, y2) on an imshow axis (pixel (r, c) is centred at (c, r))."""
    from matplotlib.patches import Rectangle

    x1, y1, x2, y2 = box
    ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.5))


def prototype_figure(path: Path, title: str, source: np.ndarray | None, box: tuple[int, int, int, int] | None,
                     test_image: np.ndarray | None, heat: torch.Tensor | None,
                     test_box: tuple[int, int, int, int] | None, colour: np.ndarray) -> None:
    """One prototype: the training image it was pushed to with its RF box, the box's crop, and a test image's RF
    heat map with the box of its best-matching cell (panels without data say so)."""
    from qpm_dist.report import figures

    fig, axes = figures.plt.subplots(1, 3, figsize=(5.7, 2.2))
    if source is not None and box is not None:
        axes[0].imshow(source)
        _draw_box(axes[0], box, colour)
        x1, y1, x2, y2 = box
        axes[1].imshow(source[y1:y2, x1:x2])
        axes[1].set_title(f"patch {y2 - y1}x{x2 - x1} px", fontsize=7)
    else:
        axes[0].text(0.5, 0.5, "no source image\n(not pushed, or no\nrandom access)", ha="center", va="center",
                     fontsize=7)
    axes[0].set_title(title, fontsize=7)
    if test_image is not None and heat is not None:
        axes[2].imshow(figures.heatmap_overlay(test_image, heat, colour, gamma=1.0))
        if test_box is not None:
            _draw_box(axes[2], test_box, colour)
        axes[2].set_title("test image: RF heat map", fontsize=7)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    figures.save(fig, path)


def rot_figure(path: Path, metrics: dict, mean_rf_percent: float) -> bool:
    """The ROT curves of the mappings (mean prototype similarity vs % pixels added back), a vertical line at the
    layer's mean RF size, as the reference's notebook; False when the metrics have no curve."""
    from qpm_dist.report import figures

    curves = [(m, metrics.get(f"rot_curve_{m}")) for m in PM.MAPPINGS]
    curves = [(m, c) for m, c in curves if c]
    if not curves or not metrics.get("rot_pct_pixels"):
        return False
    fig, ax = figures.plt.subplots(figsize=(4.5, 3.0))
    for i, (mapping, curve) in enumerate(curves):
        ax.plot(metrics["rot_pct_pixels"], curve, label=mapping, color=figures.COLOURS[i])
    ax.axvline(mean_rf_percent, color="0.5", linestyle="--", linewidth=1, label="mean RF size")
    ax.set_xlabel("% pixels added back", fontsize=8)
    ax.set_ylabel("mean prototype similarity", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    figures.save(fig, path)
    return True


def _mapping_table(own: dict) -> str:
    from qpm_dist.report.tables import fmt

    columns = [("consistency_soft", "consistency (soft)"), ("consistency_hard", "consistency (hard)"),
               ("stability_soft", "stability (soft)"), ("stability_hard", "stability (hard)"),
               ("rot_area", "ROT area"), ("rot_pct", "ROT % pixels to the original similarity")]
    columns = [(key, label) for key, label in columns if any(f"{key}_{m}" in own for m in PM.MAPPINGS)]
    if not columns:
        return ""
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in columns)
    body = "".join(f"<tr><td>{m}</td>" + "".join(f"<td>{fmt(own.get(f'{key}_{m}'))}</td>" for key, _ in columns)
                   + "</tr>" for m in PM.MAPPINGS)
    return f"<table><tr><th>mapping</th>{head}</tr>{body}</table>"


@torch.no_grad()
def pixpnet_report_sections(inputs) -> list[tuple[str, str]]:
    """"Prototype metrics by mapping" and "Prototypes" (module docstring) of a PixPNet model (report.build)."""
    from qpm_dist.report import figures
    from qpm_dist.report.build import img
    from qpm_dist.report.sparse import best_examples

    ctx, model = inputs.ctx, inputs.model
    cfg, data, device = ctx.cfg, ctx.data, ctx.info.device
    head = prototype_head(model)
    rf = input_receptive_fields(model, cfg.data.img_size)
    own = inputs.metrics.get(inputs.method, {})
    sections = []
    png = inputs.fig_dir / "rot_curves.png"
    table = _mapping_table(own)
    if own.get("prototype_parts_skipped"):
        table += f"<p>Consistency and stability skipped: {html.escape(own['prototype_parts_skipped'])}</p>"
    if rot_figure(png, own, float(rf.area_percent.mean())):
        table += img(png)
    if table:
        sections.append(("Prototype metrics by pixel-space mapping", table))

    names = [n.split(".", 1)[-1] for n in data.display_names]
    listed = range(min(data.num_classes, cfg.report.max_classes))
    loader = data.eval_loader("test", cfg.eval.batch_size, rank=0, world_size=1)
    found = best_examples(model, loader, set(listed), device, limit=16)
    train = data.dataset("train", augment=False) if hasattr(data, "dataset") else None
    samples, cells = head.source_sample.cpu(), head.source_cell.cpu()
    mean, std = cfg.data.mean, cfg.data.std
    classes = class_prototype_ids(head)
    blocks = []
    for c in listed:
        example = found.get(c)
        test_image = figures.denormalise(example[0], mean, std) if example else None
        heats = rf_heat_maps(example[1][classes[c]].float(), rf, 1.0).max if example else None
        parts = []
        for slot, j in enumerate(classes[c].tolist()):
            sample, cell = int(samples[j]), int(cells[j])
            source = box = test_box = None
            if sample >= 0 and train is not None:
                source = figures.denormalise(train[sample][0], mean, std)
                box = tuple(int(v) for v in rf_boxes(rf, torch.tensor(cell)))
            if example is not None:
                best = int(example[1][j].flatten().argmax())
                test_box = tuple(int(v) for v in rf_boxes(rf, torch.tensor(best)))
            title = f"p{j}: train #{sample}" if sample >= 0 else f"p{j}: not pushed"
            path = inputs.fig_dir / f"prototype_{j:05d}.png"
            prototype_figure(path, title, source, box, test_image, None if heats is None else heats[slot], test_box,
                             figures.COLOURS[slot % len(figures.COLOURS)])
            caption = (f"prototype {j}: pushed to training image #{sample}, cell ({cell // rf.grid[1]}, "
                       f"{cell % rf.grid[1]}), RF box x {box[0]}-{box[2]}, y {box[1]}-{box[3]}" if box is not None
                       else f"prototype {j}: no source image")
            parts.append(f"<figure class='prototype'>{img(path)}<figcaption>{caption}</figcaption></figure>")
        note = "" if example is None else ("" if example[2] else " (the test image shown is misclassified)")
        blocks.append(f"<div class='cls'><h3>{html.escape(names[c])}</h3><p>{head.per_class} prototypes{note}: "
                      f"the training image each was pushed to with its receptive-field box, the box's crop, and "
                      f"the RF heat map of a test image of the class.</p>{''.join(parts)}</div>")
    intro = ("" if train is not None else
             "<p>data.backend has no random access to training images: source patches are not shown.</p>")
    sections.append(("Prototypes", intro + "".join(blocks)))
    return sections


class PixPNetReportStage(ReportStage):
    """`pixpnet_report`: ReportStage with `load(ctx, stage)` reading the model (see PixPNetEvaluateStage)."""

    def __init__(self, final_stage: str, k: Callable[[Config], int], method: str = "pixpnet",
                 load: Callable[[RunContext, str], nn.Module] = load_model) -> None:
        super().__init__(method, final_stage, k)
        self.load = load

    def render(self, ctx: RunContext, out_dir: Path, path: Path) -> None:
        import json

        from qpm_dist.report.build import ReportInputs, render_report

        model = self.load(ctx, self.final_stage).to(ctx.info.device).eval()
        metrics = json.loads((ctx.outputs[self.evaluate_stage] / METRICS).read_text())
        inputs = ReportInputs(ctx=ctx, method=self.method, label=ctx.method.label, metrics=metrics, model=model,
                              k=self.k(ctx.cfg), fig_dir=out_dir / "figures")
        render_report(inputs, ctx.method.report_sections, path)
