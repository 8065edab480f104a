"""IIS, the inherent interpretability score of a backbone (specs/iis.md; issue 17), as cached stages:

    <the backbone's stages> -> iis_features -> iis_concepts [-> iis_text_images -> iis_text] -> iis_heads
                            -> iis_score -> iis_report

IIS scores a backbone; it trains no classifier of its own. `iis.backbone` names what is scored:
* a model stage of the same run folder ("dense", "qpm_finetune", "sldd_finetune", "qsenn_finetune3", "gc_train",
  ...): the stages of the method owning it, up to it, come first (same stages, same content keys as that method's
  own run, so a finished stage of `runs/<name>/` is reused, not retrained). The keys come from THIS config: if the
  run folder holds that stage finished under another key (the IIS config's sections differ from those of the run
  that trained it), the run is refused before anything trains (BackboneGuard, issue 17), naming both folders and
  what differs; remedies: the other run's config with iis.* overrides, the folder path as backbone (with the model.*
  settings it was trained with), or iis.retrain_backbone=true. With no finished folder of that stage, IIS trains it;
* "random": `model.arch` at random initialisation (seed run.seed), the baseline a trained backbone must beat;
* null: the local torchvision-style checkpoint `model.weights`;
* a path to a stage folder holding a model.pt (e.g. runs/demo/dense-<key>), as `qpm-dist iis --backbone` passes it;
  the model file carries no strides, so a folder whose record shows other model.arch/reduced_strides/tiny_width
  than this config is refused (architecture_mismatch); backbone.json names the folder's own stage and key
  (model_stage, model_key; folder_model) when IIS read its images at the size it was trained at.
The last three go through the stage `iis_backbone`, which writes the model (keyed by the file's sha256).

iis_features  the representation pass (iis.representations.iis_features): the pooled head input of every train and
              test image, per-rank fp16 shards
iis_concepts  the concept pass (iis.concepts.element_vectors: elements of `images_per_class` train images per class,
              patches or SLIC segments, each through the backbone) and the libraries (iis.library: prototype =
              K stratified elements, cluster = K k-means centroids), `library-<name>.npz`
iis_text_images, iis_text   with `iis.text.enabled` only: the text library (methods.iis_text, spec §3.4): CLIP's
              image embeddings of the training images (clip only; streamed, rank-sharded like iis_features), then
              the concept file's text embeddings and the LF-CBM concept space fitted once on rank 0
              (`text-space.npz`, `concepts.json`). Encoders are local: `minilm` (optional extra, the image side is
              the class names' embeddings) or `clip` with the file `iis.text.clip_weights`; a missing concept
              file, weights file or extra is refused before any stage runs.
iis_heads     the grid (iis.heads.grid: for every lr the dense probe, then every library at every ratio; "text"
              last when enabled), one record per job in `jobs/<i>.json` (resumable job by job), then
              `manifest.json` (iis.score format). The prototype/cluster jobs are trained by all ranks together over
              the shards; the text jobs (each a small single-process fit on the saved concept space) are shared out
              over the ranks, job r, r + W, ... on rank r, and all-gathered
iis_score     IIS and normalised IIS per library, ARR per ratio (iis.score.score): `iis.json`; `metrics.json` keyed
              by the scored backbone's name (see below; the first image library is the headline "iis", every
              further library, "text" included, adds "iis_<library>"); `backbone.json` (stage, key, name)
iis_report    the accuracy-retention curves (one per library) as arr.png and report.html

The grid as a SLURM array (spec §7: the jobs are independent): with `iis.heads.job: I` the stage list ends with
the stage `iis_head_job`, which trains job I alone and is marked finished in its own folder (its key = the heads'
settings + I). `qpm-dist iis CONFIG --sweep-file FILE` writes one run line `iis.heads.job=I` per job and prints the
`sbatch --array` command for slurm/sweep_array.sbatch; all tasks share the run folder, so the backbone, features
and concepts stages are done by the first task and reused (stage locks). The final `qpm-dist iis CONFIG` (with
`iis.heads.array: true`) collects the jobs' records and refuses, naming every missing job, if any is not finished;
with `array: false` (the default, small data) `iis_heads` trains whatever job has no record, in this process group.

The comparison (`qpm-dist compare`, report.compare): metrics.json of iis_score is {<scored name>: {"iis": ...,
"iis_normalised": ..., "iis_dense_probe": ...}}, where the scored name is the method owning the backbone stage
("qpm" for qpm_finetune, "dense" for dense, "random init", a weights file's or stage folder's name otherwise),
and its IIS rows are merged into the column of the evaluation of THAT model (same stage and key; the dense baseline's
column by the dense stage's key), so the IIS of every method's backbone sits under its accuracy; an IIS of a model
no evaluation shows gets an "(IIS only)" column of its own.

Measured on the demo (`qpm-dist demo --iis`, 2 CPU processes with the demo's pinned threads and kernels, prototype
patches, K = 200, the spec's 8 ratios x 3 lrs, 30 epochs, heads batch 64): the trained dense backbone (test 86.3%)
IIS 0.967 (dense probe 87.1%); the same architecture at random init IIS 0.654 (probe 16.9%); the QPM, SLDD, Q-SENN
and GC backbones 0.961-0.969 (README, "IIS"). One whole evaluation from a trained stage takes 69 s on the idle
2-core machine, 57 s of it the 27 head jobs (bench/iis_bench.py --whole). Without the pinned kernels the same
settings give 0.969 (dense) and 0.689 (random init): pin them (the demo does) to compare numbers across machines.
With the spec's heads batch 1024 (2 Adam steps per epoch on the demo's 1,800 rows) the probes are under-trained and
the random backbone scores HIGHER (1.224 vs 0.990): IIS is a ratio, and the ratio of two near-chance accuracies can
exceed 1 (the LayerNorm of the prototype head trains faster than the raw linear probe). Read an IIS next to its
dense-probe accuracy (the comparison's row "iis_dense_probe").

The text library on tiny data (tests/test_iis_text_method.py: 128 train / 32 test images at 32 px, a random tiny
TorchScript CLIP, 5 concepts, 2 ratios x 2 lrs, 2 epochs, 1 CPU process): iis_text_images 0.27 s, iis_text 0.30 s,
each text job 0.02-0.03 s (as the prototype jobs).
"""

from __future__ import annotations

import dataclasses
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from qpm_dist.config import Config, ConfigError, bounded, to_dict
from qpm_dist.errors import BadInput
from qpm_dist.methods import MethodSpec, all_specs, register
from qpm_dist.models.net import DenseHead
from qpm_dist.stages.artifacts import (MODEL, RECORD, STAGE_CONFIG, from_main, load_model, on_main, read_json,
                                       read_record, save_model, write_json)
from qpm_dist.stages.runner import RunContext, Stage, _inputs, _needed, differences, output_key, stage_key
from qpm_dist.stages.train import data_key
from qpm_dist.utils import file_sha256, log

RANDOM = "random"
BACKBONE_STAGE = "iis_backbone"
LIBRARY_KINDS = ("prototype", "cluster")
MANIFEST = "manifest.json"
SCORES = "iis.json"
HEADLINE = ("iis", "iis_normalised")


class IncompleteGrid(BadInput, ValueError):
    """The array's jobs are not all finished (the message names the missing ones)."""


class BackboneMismatch(BadInput, ValueError):
    """`iis.backbone` names a stage the run folder holds finished under another key: IIS would train a new model and
    score it instead (the message names both folders, what differs and the remedies)."""


@dataclass
class IISConceptsConfig:
    # Elements: "patches" (a 4x4 grid of every image, spec §2.3) or "segments" (SLIC superpixels, §2.2).
    kind: Literal["patches", "segments"] = "patches"
    images_per_class: int = bounded(10, ge=1)  # train images per class cut into elements (class-balanced, seeded)
    num_concepts: int = bounded(200, ge=1)  # K, the prototypes (or clusters) of a library
    # One library per entry, all scored over the same grid: prototype (K stratified elements) or cluster (k-means).
    libraries: list[Literal["prototype", "cluster"]] = field(default_factory=lambda: ["prototype"])
    seed: int = bounded(0, ge=0)  # the image choice and the library draw / k-means
    cluster_rows: int = bounded(20000, ge=1)  # elements k-means sees at most (the reference's 20,000)
    chunk_images: int = bounded(64, ge=1)  # images per resumable chunk of the concept pass (in the key)
    batch_size: int = bounded(256, ge=1)  # elements per forward batch (speed only)


@dataclass
class IISHeadsConfig:
    # The sparsity ratios s (one grid for every library) and lrs of the sweep: the reference's real protocol
    # (spec §3.3; its HEAD ran one ratio and one lr, bug 3). IIS integrates ARR over the ratios (§4).
    ratios: list[float] = bounded([0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98], ge=0, le=1)
    lrs: list[float] = bounded([1.0e-3, 1.0e-2, 1.0e-1], gt=0, le=10)
    epochs: int = bounded(30, ge=1)
    batch_size: int = bounded(1024, ge=1)  # global minibatch over all ranks
    holdout: float = bounded(0.1, gt=0, lt=1)  # share of the train representations held out for epoch selection
    # S_s's kept count: "exact" K − ⌊Ks⌋, "reference" one fewer (the reference's count, spec §3.1 / bug 8).
    sparsity_count: Literal["exact", "reference"] = "exact"
    eval_batch_size: int = bounded(4096, ge=1)  # rows per evaluation chunk (memory only)
    job: Optional[int] = bounded(None, ge=0)  # train only this job of the grid (a SLURM array task), see above
    array: bool = False  # the jobs are run by an array: iis_heads collects them and trains none itself


@dataclass
class IISTextConfig:
    # The text library (LF-CBM concepts, spec §3.4; methods.iis_text): scored as library "text" over the heads' grid.
    enabled: bool = False
    concepts: Optional[str] = None  # concept file, one concept per line (iis.concept_file)
    encoder: Literal["minilm", "clip"] = "minilm"  # minilm: the packaged all-MiniLM-L6-v2; clip: clip_weights
    clip_weights: Optional[str] = None  # local CLIP weights file (open_clip); nothing is downloaded
    clip_architecture: str = "ViT-B-16"  # open_clip name of a state-dict file's model (a TorchScript file has its own)
    clip_cutoff: float = bounded(0.25, ge=-1, le=1)  # activation filter: top-5 mean cosine a concept must exceed
    interpretability_cutoff: float = bounded(0.45, ge=-1, le=1)  # held-out cos-cubed similarity it must exceed
    proj_steps: int = bounded(1000, ge=1)  # at most this many Adam steps of the projection W_c
    batch_size: int = bounded(256, ge=1)  # the final layer's minibatch (the reference's SAGA minibatch)


@dataclass
class IISConfig:
    # What is scored: a model stage of the run ("dense", "qpm_finetune", ...), "random" (model.arch at random
    # init), null (the file model.weights) or the path of a stage folder with a model.pt.
    backbone: Optional[str] = "dense"
    # A backbone stage named by `backbone` whose finished folder in the run folder has another key than this config
    # gives it is refused (BackboneGuard); true trains and scores a new one anyway.
    retrain_backbone: bool = False
    features_batch_size: int = bounded(256, ge=1)  # global batch of the representation pass (speed only)
    dtype: Literal["float16", "float32"] = "float16"  # of the representation shards
    concepts: IISConceptsConfig = field(default_factory=IISConceptsConfig)
    heads: IISHeadsConfig = field(default_factory=IISHeadsConfig)
    text: IISTextConfig = field(default_factory=IISTextConfig)

    def check(self, key: str) -> None:
        h, c = self.heads, self.concepts
        if not h.ratios or len(set(h.ratios)) != len(h.ratios):
            raise ConfigError(f"{key}.heads.ratios: expected one or more distinct ratios, got {h.ratios}")
        if not h.lrs or len(set(h.lrs)) != len(h.lrs):
            raise ConfigError(f"{key}.heads.lrs: expected one or more distinct learning rates, got {h.lrs}")
        if not c.libraries or len(set(c.libraries)) != len(c.libraries):
            raise ConfigError(f"{key}.concepts.libraries: expected one or more distinct of "
                              f"{', '.join(LIBRARY_KINDS)}, got {c.libraries}")
        if h.job is not None and h.job >= len(head_jobs(self)):
            raise ConfigError(f"{key}.heads.job: {h.job}, but the grid has {len(head_jobs(self))} jobs "
                              f"(0 to {len(head_jobs(self)) - 1})")
        if self.text.enabled and not self.text.concepts:
            raise ConfigError(f"{key}.text.concepts: the text library is enabled but no concept file is named; "
                              f"expected a UTF-8 file, one concept per line")
        if self.text.enabled and self.text.encoder == "clip" and not self.text.clip_weights:
            raise ConfigError(f"{key}.text.clip_weights: the clip encoder needs a local weights file (nothing is "
                              f"downloaded); name one or use encoder: minilm")
        if self.backbone is not None and not self.backbone.strip():
            raise ConfigError(f"{key}.backbone: expected a stage name, 'random', a stage folder or null, got ''")


def libraries(iis: IISConfig) -> list[str]:
    """The libraries scored: the image libraries, then "text" when iis.text is enabled."""
    from qpm_dist.methods.iis_text import TEXT

    return [*iis.concepts.libraries, *((TEXT,) if iis.text.enabled else ())]


def head_jobs(iis: IISConfig) -> list:
    from qpm_dist.iis.heads import grid

    return grid(libraries(iis), list(iis.heads.ratios), list(iis.heads.lrs))


# ------------------------------------------------------------------------------------------------ the backbone


@dataclass(frozen=True)
class Backbone:
    """Where the scored model comes from: the stages producing it, the stage holding it, the name it is scored
    under (the comparison column) and, for iis_backbone, its source ("random", "file" or "folder") and path."""

    stages: list
    stage: str
    name: str
    source: str = "stage"
    path: str | None = None


def _owner(stage: str, cfg: Config) -> tuple[str, list] | None:
    """(method name, its stage list) of the first other method whose stages include `stage`."""
    for spec in all_specs():
        if spec.name == "iis":
            continue
        stages = spec.stages(cfg)
        if stage in [s.name for s in stages]:
            return spec.name, stages
    return None


def _is_path(text: str) -> bool:
    return "/" in text or text.startswith(".") or Path(text).is_dir()


def resolve_backbone(cfg: Config) -> Backbone:
    """The `iis.backbone` setting, resolved (raises ConfigError naming what is known)."""
    b = cfg.iis.backbone
    if b is None:
        if not cfg.model.weights:
            raise ConfigError("iis.backbone: null scores the file model.weights, but model.weights is not set")
        return Backbone([BackboneStage()], BACKBONE_STAGE, Path(cfg.model.weights).stem, "file", cfg.model.weights)
    if b == RANDOM:
        return Backbone([BackboneStage()], BACKBONE_STAGE, f"random init ({cfg.model.arch})", "random")
    if _is_path(b):
        folder = Path(b)
        owner = _owner(folder.name.split("-")[0], cfg)
        name = ("dense" if folder.name.startswith("dense-") else owner[0]) if owner else folder.name
        return Backbone([BackboneStage()], BACKBONE_STAGE, name, "folder", str(folder))
    owner = _owner(b, cfg)
    if owner is None:
        known = sorted({s.name for spec in all_specs() if spec.name != "iis" for s in spec.stages(cfg)})
        raise ConfigError(f"iis.backbone: {b!r} is no stage of any method; expected a model stage "
                          f"({', '.join(known)}), "
                          f"'{RANDOM}', a stage folder path or null (model.weights)")
    method, stages = owner
    needed = _needed(stages, b)
    chain = [s for s in stages if s.name in needed]
    return Backbone([BackboneGuard(s, chain, b) for s in chain], b, "dense" if b == "dense" else method)


# ------------------------------------------------------------------------- a backbone stage trained anew (issue 17)


def finished_records(run_dir: Path, stage: str) -> list[tuple[Path, dict]]:
    """(folder, record) of every finished `<stage>-<key>` folder of run_dir, newest first (unreadable records are
    left out: the runner reports a damaged one when it is reused)."""
    found = []
    for folder in Path(run_dir).glob(f"{stage}-*"):
        record = _folder_record(folder)
        try:
            mtime = (folder / RECORD).stat().st_mtime
        except OSError:
            continue
        if record.get("stage") == stage:
            found.append((mtime, folder, record))
    return [(folder, record) for _, folder, record in sorted(found, key=lambda f: f[0], reverse=True)]


def _why(name: str, record: dict, inputs: dict[str, dict], run_dir: Path) -> list[tuple[str, str]]:
    """What makes this config's `name` differ from the finished one of `record`, root causes first: its own config
    parts and dataset, and for an input stage whose key differs, that stage's differences (found through the
    finished folder of the input the record names): (stage, "field: old -> new")."""
    old = {k: record.get(k) for k in ("config", "dataset", "upstream")}
    upstream = old["upstream"] if isinstance(old["upstream"], dict) else {}
    found = []
    for stage, key in upstream.items():
        if stage in inputs[name]["upstream"] and inputs[name]["upstream"][stage] != key:  # a DAG: ends
            parent = next((r for _, r in finished_records(run_dir, stage) if r.get("output_key") == key), None)
            found += _why(stage, parent, inputs, run_dir) if parent else [(stage, f"its folder is not in {run_dir}")]
    own = [d for d in differences(old, inputs[name]) if not d.startswith("its input stage")]
    return found + [(name, d if len(d) <= 120 else d[:117] + "...") for d in own]


def _grouped(why: list[tuple[str, str]], limit: int = 6) -> str:
    """"gc_train: data.img_size: 48 -> 64, model.dropout: 0.0 -> 0.2; ..." of the first `limit` differences."""
    stages: dict[str, list[str]] = {}
    for stage, diff in why[:limit]:
        stages.setdefault(stage, []).append(diff)
    more = f"; and {len(why) - limit} more" if len(why) > limit else ""
    return "; ".join(f"{stage}: {', '.join(diffs)}" for stage, diffs in stages.items()) + more


def retrain_conflict(chain: list[Stage], target: str, ctx: RunContext) -> str:
    """Why running `chain` (the stages up to the backbone stage `target`) would train a model other than the one
    the run folder already holds finished under that stage name ("" if it would not: a finished `target` folder has
    this config's key, or none exists, so an IIS config trains its own backbone).

    Issue 17: `qpm-dist iis configs/demo_iis.yaml --backbone gc_train` resolved gc_train under demo_iis.yaml, whose
    sections differ from demo_gc.yaml's, so GC was trained anew at 64 px and its IIS reported as the demo GC's."""
    probe = dataclasses.replace(ctx, keys=dict(ctx.keys), outputs=dict(ctx.outputs))
    inputs, folder_keys = {}, {}
    for stage in chain:  # the keys run_stages gives the chain under this config
        inputs[stage.name] = _inputs(stage, probe)
        folder_keys[stage.name] = stage_key(stage, probe)
        probe.keys[stage.name] = output_key(stage, folder_keys[stage.name], ctx.cfg)
    records = finished_records(ctx.run_dir, target)
    if not records or any(r.get("output_key") == probe.keys[target] for _, r in records):
        return ""
    folder, record = records[0]
    why = _grouped(_why(target, record, inputs, ctx.run_dir)) or "nothing its record shows (another code version)"
    return (f"iis.backbone: {target}: {ctx.run_dir} holds the finished {folder.name}, but this config gives "
            f"{target} the key {folder_keys[target][:12]} ({why}), so IIS would train a new {target} "
            f"and score it instead of that model. Run `qpm-dist iis` with the config that trained {folder.name} "
            f"(iis.* settings as overrides), or score that model's file with --backbone {folder} (under the model.* "
            f"and data.img_size it was trained with), or set iis.retrain_backbone=true to train and score a new "
            f"{target}")


def _remove_if_unused(folder: Path) -> None:
    """The folder the runner made for a refused stage, if it holds nothing but the stage_config.json it wrote."""
    if folder.is_dir() and [p.name for p in folder.iterdir()] == [STAGE_CONFIG]:
        (folder / STAGE_CONFIG).unlink()
        folder.rmdir()


class BackboneGuard:
    """A stage of the chain producing the backbone stage `target`, which refuses to run (BackboneMismatch) when that
    would train a `target` other than the finished one of the run folder (retrain_conflict), unless
    iis.retrain_backbone. Everything else (name, depends, config_parts, output_parts, extends, ...) is the wrapped
    stage's, so the keys and folders are exactly those of the owning method's own run.

    The check runs when the runner is about to run a chain stage, i.e. only if some stage of the chain is not
    finished under this config: reusing the finished backbone costs no check."""

    def __init__(self, stage: Stage, chain: list[Stage], target: str) -> None:
        self.stage, self.chain, self.target = stage, chain, target

    def __getattr__(self, name: str) -> Any:
        if name in ("stage", "chain", "target"):  # not set yet (copy/pickle): no recursion through self.stage
            raise AttributeError(name)
        return getattr(self.stage, name)

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        if not ctx.cfg.iis.retrain_backbone:
            problem = from_main(lambda: retrain_conflict(self.chain, self.target, ctx))
            if problem:
                on_main(_remove_if_unused, out_dir)
                raise BackboneMismatch(problem)
        return self.stage.run(ctx, out_dir)


# The model settings a model file does not carry: classifier_from_file builds the backbone from the config's, so
# a stage folder read under other values loads (strides hold no weights) as ANOTHER network.
ARCHITECTURE = ("arch", "reduced_strides", "tiny_width")


def _folder_record(folder: Path) -> dict:
    """The finished record (stage.json) of a stage folder, or {} (not a finished stage folder, unreadable)."""
    try:
        record = json.loads((Path(folder) / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _trained_with(record: dict, section: str) -> dict:
    parts = (record.get("config") or {}).get(section)
    return parts if isinstance(parts, dict) else {}


def architecture_mismatch(folder: Path, cfg: Config) -> str:
    """"model.reduced_strides: False (the folder's) vs True (this config)", ... for every ARCHITECTURE setting the
    stage folder's record was trained with that this config sets otherwise ("" if none, or the record has none)."""
    trained = _trained_with(_folder_record(folder), "model")
    ours = to_dict(cfg.model)
    return ", ".join(f"model.{k}: {trained[k]} (the folder's) vs {ours[k]} (this config)" for k in ARCHITECTURE
                     if k in trained and trained[k] != ours[k])


def folder_model(folder: Path, sha256: str, cfg: Config) -> dict[str, str] | None:
    """{"stage", "key"} of the finished stage folder whose model IIS read by path, if its record lists a model.pt
    with this sha256 (the file the iis_backbone key was made from) and it was trained at this config's
    data.img_size: the comparison then puts the IIS in the column of the evaluation of that very model
    (report.compare). None if the folder is no finished stage folder, its model.pt is not the one it wrote, or IIS
    read its images at another size (then the IIS gets a column of its own)."""
    record = _folder_record(folder)
    if (record.get("outputs") or {}).get(MODEL) != sha256:
        return None
    if _trained_with(record, "data").get("img_size", cfg.data.img_size) != cfg.data.img_size:
        return None
    stage, key = record.get("stage"), record.get("output_key", record.get("key"))
    return {"stage": stage, "key": key} if isinstance(stage, str) and isinstance(key, str) else None


class BackboneStage:
    """iis_backbone: the scored model written as model.pt, from a random init, a weights file or a stage folder."""

    name = BACKBONE_STAGE
    depends: tuple[str, ...] = ()

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        b = resolve_backbone(cfg)
        model = {k: v for k, v in to_dict(cfg.model).items() if k not in ("weights", "weights_key")}
        if b.source == "random":
            return {"source": "random", "model": model, "seed": cfg.run.seed}
        path = Path(b.path) / MODEL if b.source == "folder" else Path(b.path).expanduser()
        if not path.is_file():
            raise BadInput(f"iis.backbone: {path}: no such file (expected "
                           f"{'a stage folder with a ' + MODEL if b.source == 'folder' else 'a weights file'})")
        mismatch = architecture_mismatch(Path(b.path), cfg) if b.source == "folder" else ""
        if mismatch:
            raise BadInput(f"iis.backbone: {b.path} was trained as another network than this config builds "
                           f"({mismatch}); its weights would be scored in the wrong architecture. Set those model.* "
                           f"values (or use the config that trained it)")
        return {"source": b.source, "model": model, "weights_key": cfg.model.weights_key,
                "sha256": file_sha256(path)}

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        from qpm_dist.models.io import load_classifier
        from qpm_dist.models.net import build_model

        b = resolve_backbone(ctx.cfg)
        if b.source == "folder":
            model = load_classifier(Path(b.path) / MODEL, ctx.cfg.model)
        else:
            torch.manual_seed(ctx.cfg.run.seed)  # every rank the same random init (save_model checks it)
            model_cfg = dataclasses.replace(ctx.cfg.model, weights=None) if b.source == "random" else ctx.cfg.model
            model = build_model(model_cfg, ctx.data.num_classes)
        return {"source": b.source, "path": b.path, "name": b.name, "rank_digests": save_model(out_dir / MODEL, model)}


# ------------------------------------------------------------------------------------------------- the stages


def _model_of(ctx: RunContext, stage: str):
    if not (ctx.outputs[stage] / MODEL).is_file():
        raise BadInput(f"iis.backbone: stage {stage} wrote no {MODEL} in {ctx.outputs[stage]}; name a stage that "
                       f"writes a model")
    return load_model(ctx, stage).to(ctx.info.device)


class ConceptsStage:
    """iis_concepts: the element vectors of the chosen train images and the libraries drawn from them."""

    name = "iis_concepts"

    def __init__(self, model_stage: str) -> None:
        self.model_stage = model_stage
        self.depends: tuple[str, ...] = (model_stage,)

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        c = to_dict(cfg.iis.concepts)
        c.pop("batch_size")
        return {"data": data_key(cfg), "precision": cfg.engine.precision, "concepts": c}

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        from qpm_dist.iis.concepts import choice_record, concept_images, element_vectors
        from qpm_dist.iis.elements import ElementConfig
        from qpm_dist.iis.library import cluster_library, prototype_library

        c = ctx.cfg.iis.concepts
        model = _model_of(ctx, self.model_stage)
        indices = concept_images(ctx.data, c.images_per_class, c.seed)
        summary = element_vectors(model, ctx.data, indices, ElementConfig(kind=c.kind), out_dir, ctx.info,
                                  batch_size=c.batch_size, chunk_images=c.chunk_images, autocast=ctx.autocast,
                                  record=choice_record(ctx.data.train_split, indices, c.images_per_class, c.seed))

        def libraries() -> None:
            for kind in c.libraries:
                library = (prototype_library(out_dir, c.num_concepts, c.seed) if kind == "prototype" else
                           cluster_library(out_dir, c.num_concepts, c.seed, c.cluster_rows))
                library.save(library_path(out_dir, kind))

        on_main(libraries)
        return {**summary, "libraries": list(c.libraries), "num_concepts": c.num_concepts}


def library_path(folder: Path, name: str) -> Path:
    return Path(folder) / f"library-{name}.npz"


def head_options(cfg: Config):
    from qpm_dist.iis.heads import HeadOptions

    h = cfg.iis.heads
    return HeadOptions(epochs=h.epochs, batch_size=h.batch_size, holdout=h.holdout, seed=cfg.run.seed,
                       count=h.sparsity_count, eval_batch_size=h.eval_batch_size)


def heads_key(cfg: Config) -> dict[str, Any]:
    """What every job's result depends on (not the job index, the array flag or the evaluation chunk); the text
    library adds its settings (its concept file and encoder come through the upstream stage iis_text)."""
    from qpm_dist.methods import iis_text

    h = cfg.iis.heads
    return {"ratios": list(h.ratios), "lrs": list(h.lrs), "epochs": h.epochs, "batch_size": h.batch_size,
            "holdout": h.holdout, "sparsity_count": h.sparsity_count, "seed": cfg.run.seed,
            "libraries": libraries(cfg.iis), **iis_text.heads_key(cfg)}


def heads_depends(cfg: Config) -> tuple[str, ...]:
    from qpm_dist.methods.iis_text import SPACE_STAGE

    return ("iis_features", "iis_concepts", *((SPACE_STAGE,) if cfg.iis.text.enabled else ()))


def train_job(ctx: RunContext, index: int) -> dict:
    """Train job `index` of the grid over the representation shards (every rank) and return its record. A text job
    is trained by rank 0 alone (methods.iis_text) and its record broadcast."""
    from qpm_dist.iis.library import PrototypeLibrary
    from qpm_dist.iis.representations import Representations
    from qpm_dist.iis.heads import train_head
    from qpm_dist.iis.score import DENSE
    from qpm_dist.methods.iis_text import TEXT, train_text_job

    job = head_jobs(ctx.cfg.iis)[index]
    if job.library == TEXT:
        return from_main(lambda: train_text_job(ctx, index, job))
    reps = Representations(ctx.outputs["iis_features"])
    prototypes = (None if job.library == DENSE else
                  PrototypeLibrary.load(library_path(ctx.outputs["iis_concepts"], job.library)).vectors)
    result = train_head(reps, job, head_options(ctx.cfg), prototypes, device=ctx.info.device)
    log.info("iis job %d (%s, ratio %s, lr %g): test top-1 %.4f", index, job.library, job.ratio, job.lr,
             result.record["accuracy"])
    return {"job": index, **result.record}


class HeadJobStage:
    """iis_head_job: ONE job of the grid (a SLURM array task), marked finished in its own folder."""

    name = "iis_head_job"

    def __init__(self, index: int, cfg: Config) -> None:
        self.index = index
        self.depends: tuple[str, ...] = heads_depends(cfg)

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        return {**heads_key(cfg), "job": self.index}

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        record = train_job(ctx, self.index)
        return {"record": record}


def array_record(ctx: RunContext, index: int) -> dict | None:
    """The record of job `index` run as an array task (its iis_head_job folder finished), or None."""
    folder = ctx.run_dir / f"{HeadJobStage.name}-{stage_key(HeadJobStage(index, ctx.cfg), ctx)[:12]}"
    if not (folder / RECORD).is_file():
        return None
    return read_record(folder)["summary"]["record"]


def job_path(folder: Path, index: int) -> Path:
    return Path(folder) / "jobs" / f"{index:05d}.json"


class HeadsStage:
    """iis_heads: every job's record (from the array's folders, this folder's jobs/, or trained here), then the
    manifest. With iis.heads.array it trains nothing and refuses an incomplete grid, naming the missing jobs."""

    name = "iis_heads"

    def __init__(self, cfg: Config) -> None:
        self.depends: tuple[str, ...] = heads_depends(cfg)

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        return heads_key(cfg)

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        from qpm_dist.iis.score import write_manifest
        from qpm_dist.methods.iis_text import TEXT, train_text_jobs

        jobs = head_jobs(ctx.cfg.iis)
        done = {}
        for i in range(len(jobs)):
            done[i] = array_record(ctx, i)
            if done[i] is None and job_path(out_dir, i).is_file():
                done[i] = read_json(job_path(out_dir, i))
        records, missing, trained = [], [], 0
        text = {i: job for i, job in enumerate(jobs) if job.library == TEXT and done[i] is None}
        if text and not ctx.cfg.iis.heads.array:  # shared out over the ranks job by job (methods.iis_text)
            done.update(train_text_jobs(ctx, text, lambda i: job_path(out_dir, i)))
            trained = len(text)
        for i, job in enumerate(jobs):
            record = done[i]
            if record is None and not ctx.cfg.iis.heads.array:
                record = train_job(ctx, i)
                write_json(job_path(out_dir, i), record)  # rank 0 writes, all wait; a rerun resumes after it
                trained += 1
            if record is None:
                missing.append(f"job {i} ({job.library}, ratio {job.ratio}, lr {job.lr:g})")
            else:
                records.append(record)
        if missing:
            raise IncompleteGrid(f"iis_heads: {len(missing)} of {len(jobs)} array jobs have not finished (run them "
                                 f"with iis.heads.job=I): {', '.join(missing[:8])}"
                                 f"{f' and {len(missing) - 8} more' if len(missing) > 8 else ''}")
        on_main(write_manifest, out_dir / MANIFEST, records)
        return {"jobs": len(jobs), "trained_here": trained}


def score_manifest(path: Path, cfg: Config) -> dict[str, Any]:
    """{library: iis.score.Score} of every library over the config's grid; a manifest missing any job of the
    grid is refused (iis.score.BadManifest naming the missing jobs)."""
    from qpm_dist.iis.score import read_manifest, score

    records = read_manifest(path)
    h = cfg.iis.heads
    return {lib: score(records, lib, h.ratios, h.lrs, source=f"IIS manifest {path}") for lib in libraries(cfg.iis)}


class ScoreStage:
    """iis_score: IIS per library from the manifest; metrics.json keyed by the scored backbone's name."""

    name = "iis_score"

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self.depends: tuple[str, ...] = ("iis_heads", backbone.stage)

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        return {"ratios": list(cfg.iis.heads.ratios), "lrs": list(cfg.iis.heads.lrs), "name": self.backbone.name}

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        scores = score_manifest(ctx.outputs["iis_heads"] / MANIFEST, ctx.cfg)
        first = scores[ctx.cfg.iis.concepts.libraries[0]]
        metrics = {"iis": first.iis, "iis_normalised": first.iis_normalised,
                   "iis_dense_probe": 100 * first.dense_accuracy}
        if len(scores) > 1:
            metrics.update({f"iis_{lib}": s.iis for lib, s in scores.items()})
        backbone = {"name": self.backbone.name, "stage": self.backbone.stage, "key": ctx.keys[self.backbone.stage]}
        if self.backbone.source == "folder":  # which finished stage's model that is (report.compare matches it)
            sha256 = read_json(ctx.outputs[BACKBONE_STAGE] / RECORD)["config"].get("sha256")
            model = from_main(lambda: folder_model(Path(self.backbone.path), sha256, ctx.cfg))
            if model is not None:
                backbone.update(model_stage=model["stage"], model_key=model["key"])
        write_json(out_dir / SCORES, {lib: s.as_dict() for lib, s in scores.items()})
        write_json(out_dir / "metrics.json", {self.backbone.name: metrics})
        write_json(out_dir / "backbone.json", backbone)
        return {"backbone": self.backbone.name, **{f"iis_{lib}": s.iis for lib, s in scores.items()}}


class ReportStage:
    """iis_report: the accuracy-retention curve of every library (ARR against s) and the scores, as HTML."""

    name = "iis_report"
    depends: tuple[str, ...] = ("iis_score",)

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        return {}

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        on_main(write_report, ctx.outputs["iis_score"], out_dir)
        return {"report": str(out_dir / "report.html")}


def write_report(score_dir: Path, out_dir: Path) -> Path:
    """arr.png (ARR(s) per library) and report.html (IIS, normalised IIS, A(s), best lrs) from iis_score's files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qpm_dist.report import figures

    scores = scores_of(score_dir)  # rank 0 alone runs this: plain reads, no collective (read_json is one)
    backbone = json.loads((Path(score_dir) / "backbone.json").read_text())
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for lib, s in scores.items():
        ax.plot(s["ratios"], s["arr"], marker="o", label=f"{lib}: IIS {s['iis']:.3f}")
    ax.set_xlabel("sparsity ratio s")
    ax.set_ylabel("accuracy retention ARR(s)")
    ax.set_title(f"IIS of {backbone['name']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    figures.save(fig, Path(out_dir) / "arr.png")
    rows = "".join(
        f"<tr><td>{html.escape(lib)}</td><td>{s['iis']:.4f}</td><td>{s['iis_normalised'] or 0:.4f}</td>"
        f"<td>{100 * s['dense_accuracy']:.2f}</td><td>"
        + ", ".join(f"{r:g}: {100 * a:.1f}" for r, a in zip(s["ratios"], s["accuracies"])) + "</td></tr>"
        for lib, s in scores.items())
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>IIS</title></head><body>"
            f"<h1>IIS of {html.escape(backbone['name'])} (stage {html.escape(backbone['stage'])})</h1>"
            f"<table border=1><tr><th>library</th><th>IIS</th><th>IIS / (s_n - s_0)</th><th>dense probe (%)</th>"
            f"<th>A(s) (%)</th></tr>{rows}</table><img src='arr.png' alt='accuracy retention'></body></html>\n")
    path = Path(out_dir) / "report.html"
    path.write_text(page)
    return path


def stages(cfg: Config) -> list[Stage]:
    from qpm_dist.iis.representations import iis_features
    from qpm_dist.methods.iis_text import TextImagesStage, TextSpaceStage

    backbone = resolve_backbone(cfg)
    features = iis_features("iis_features", backbone.stage, batch_size=lambda c: c.iis.features_batch_size,
                            dtype=cfg.iis.dtype)
    common = [*backbone.stages, features, ConceptsStage(backbone.stage)]
    if cfg.iis.text.enabled:
        common += [*((TextImagesStage(),) if cfg.iis.text.encoder == "clip" else ()), TextSpaceStage(cfg)]
    if cfg.iis.heads.job is not None:
        return [*common, HeadJobStage(cfg.iis.heads.job, cfg)]
    return [*common, HeadsStage(cfg), ScoreStage(backbone), ReportStage()]


def validate(cfg: Config) -> None:
    backbone = resolve_backbone(cfg)
    if backbone.source == "random" and cfg.model.weights:
        raise ConfigError(f"iis.backbone: 'random' scores model.arch at random init, but model.weights is set "
                          f"({cfg.model.weights}); set model.weights=null or iis.backbone=null to score the file")
    if cfg.iis.text.enabled:
        from qpm_dist.methods.iis_text import check_inputs

        check_inputs(cfg)
    if cfg.iis.concepts.num_concepts < 2 and any(r > 0 for r in cfg.iis.heads.ratios):
        log.warning("iis.concepts.num_concepts=1: every ratio keeps the one concept")


SPEC = register(MethodSpec(
    # IIS trains no classifier: `head` is that of the model it reads for random/file backbones (model.pooling
    # applies to it), and the report is its own stage, not the generic one.
    name="iis", label="IIS", sections={"iis": IISConfig}, stages=stages, head=DenseHead, validate=validate,
    headline=HEADLINE, order=90,
))


def scores_of(score_dir: Path) -> dict[str, Any]:
    """The iis.json of an iis_score folder (for the CLI and tests)."""
    return json.loads((Path(score_dir) / SCORES).read_text())
