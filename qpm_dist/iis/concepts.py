"""IIS prototype concepts: which images give elements (spec §2.1) and each element's concept vector (§2.4).

concept_images   a class-balanced, seeded choice of `images_per_class` images per class of the TRAIN split
                 (spec bug 13: the reference takes the first files of unsorted `os.listdir` of the VAL split, which
                 is also its test and model-selection set). Each class's candidates are sorted by path before the
                 seeded draw, so the choice does not depend on file-system or list order; the choice is recorded.
ElementDataset   a loader item = all elements of one chosen image (qpm_dist.iis.elements), each through the test
                 transform: the CPU-heavy SLIC work runs in DataLoader workers.
element_vectors  the pass of a frozen model over the elements: each element's pooled penultimate vector (the input
                 of the final linear layer, `representations.HeadInput`: the same function as for images, so a
                 sparse model's elements are full backbone vectors like its image representations; the
                 reference's HEAD hooked the unpooled layer4 output, spec bug 2). Sharded and resumable:
                 * the chosen images are cut into global chunks of `chunk_images` consecutive images; chunk k is
                   done by rank k mod W; a finished chunk is a file `chunks/c<k>.npz` renamed into place, so a
                   killed run (any world size) recomputes only the chunks without a file. Batches never span
                   chunks, so every element sees the same batch whatever the world size (identical numbers);
                 * at the end every rank copies its chunks into its fp16 shard of split "elements"
                   (qpm_dist.glm.shards layout: `shards/elements-r<R>-{x,y}.npy`, y = the image's class) plus
                   `shards/elements-r<R>-ids.npy` (row -> (train image index, element id)), rank 0 writes
                   `shards/meta.json` and removes the chunks. Memory per rank: one chunk, never the pool.
Row order inside a shard is the chunk order; `qpm_dist.iis.library.element_index` orders all rows by
(image index, element id), which does not depend on the world size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from qpm_dist import dist
from qpm_dist.data.datasets import DatasetBundle, ImageListDataset, Split
from qpm_dist.dist import DistInfo
from qpm_dist.engine.streaming import model_outputs
from qpm_dist.errors import BadInput
from qpm_dist.glm.shards import ShardWriter, read_meta, shard_paths, write_meta
from qpm_dist.iis.elements import ElementConfig, image_elements
from qpm_dist.stages.artifacts import on_main, write_json
from qpm_dist.utils import atomic_open, atomic_write_text

SPLIT = "elements"  # the shard split name of the element vectors
PLAN = "plan.json"  # chunks/plan.json: what the chunks were computed for (a resume must match it)
IMAGES = "images.json"  # the recorded choice of concept images (choice_record), next to the shards


class BadConceptInput(BadInput, ValueError):
    """A concept setting the data cannot satisfy, or a stage folder left by another plan (named in the message)."""


# ---------------------------------------------------------------------------------------------- the choice


def balanced_choice(paths: list[str], labels: np.ndarray, num_classes: int, per_class: int, seed: int) -> np.ndarray:
    """Indices of `per_class` images of every class, drawn without replacement with a generator seeded by
    (seed, class) among the class's images sorted by path; ordered by (class, path)."""
    if per_class < 1:
        raise BadConceptInput(f"iis images_per_class {per_class}: expected >= 1")
    labels = np.asarray(labels)
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if members.size < per_class:
            raise BadConceptInput(f"iis images_per_class {per_class}: class {c} has only {members.size} training "
                                  f"images; expected at least {per_class} in every class")
        members = members[np.argsort([paths[i] for i in members], kind="stable")]
        pick = np.random.default_rng([seed, c]).choice(members.size, per_class, replace=False)
        chosen.append(members[np.sort(pick)])
    return np.concatenate(chosen).astype(np.int64)


def concept_images(data: DatasetBundle, images_per_class: int, seed: int) -> np.ndarray:
    """The training-split indices whose elements become concepts (spec §2.1 with bug 13 fixed)."""
    split = data.train_split
    return balanced_choice(split.paths, split.labels, data.num_classes, images_per_class, seed)


def choice_record(split: Split, indices: np.ndarray, images_per_class: int, seed: int) -> dict[str, Any]:
    """The choice as JSON-ready data: settings and every chosen image (train index, path, class)."""
    return {"split": "train", "images_per_class": images_per_class, "seed": seed,
            "images": [{"index": int(i), "path": split.paths[i], "label": int(split.labels[i])} for i in indices]}


# ---------------------------------------------------------------------------------------------- the loader


class ElementDataset(Dataset):
    """Item p: the elements of image `indices[p]` of `images` after its test transform (E x 3 x s x s float),
    the image's class, its index and E. `images` is the split's test-view dataset (decoding, digests, boxes)."""

    def __init__(self, images: ImageListDataset, indices: np.ndarray, cfg: ElementConfig, patch_size: int) -> None:
        self.images, self.indices, self.cfg, self.patch_size = images, np.asarray(indices), cfg, patch_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int, int, int]:
        index = int(self.indices[position])
        image = self.images.load(index).permute(1, 2, 0).contiguous().numpy()
        source = str(self.images.image_dir / self.images.paths[index])
        elements = [self.images.transform(torch.from_numpy(e).permute(2, 0, 1).contiguous())
                    for e in image_elements(image, self.cfg, self.patch_size, source)]
        if elements:
            stacked = torch.stack(elements)
        else:  # no mask passed the filters: an empty stack of the transform's output shape, so batches concatenate
            stacked = torch.empty(0, *self.images.transform(torch.zeros(3, 8, 8, dtype=torch.uint8)).shape)
        return stacked, int(self.images.labels[index]), index, len(elements)


def collate_elements(items: list[tuple]) -> tuple[torch.Tensor, ...]:
    """Concatenate the items' elements; per element: its image's class, the image index and its element id."""
    counts = [n for *_, n in items]
    elements = torch.cat([x for x, *_ in items])
    labels = torch.tensor([label for _, label, _, n in items for _ in range(n)], dtype=torch.long)
    image = torch.tensor([index for _, _, index, n in items for _ in range(n)], dtype=torch.long)
    element = torch.cat([torch.arange(n) for n in counts]) if counts else torch.empty(0, dtype=torch.long)
    return elements, labels, image, element


# ------------------------------------------------------------------------------------------------ the pass


def chunk_path(folder: Path, chunk: int) -> Path:
    return Path(folder) / "chunks" / f"c{chunk:06d}.npz"


def ids_path(folder: Path, rank: int) -> Path:
    """Row -> (train image index, element id) of rank `rank`'s element shard."""
    x_path, _ = shard_paths(folder, SPLIT, rank)
    return x_path.with_name(x_path.name.replace("-x.npy", "-ids.npy"))


def model_digest(model: torch.nn.Module) -> str:
    """A digest of the model's parameters and buffers: chunks of one backbone are never mixed with another's."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _plan(model: torch.nn.Module, data: DatasetBundle, indices: np.ndarray, cfg: ElementConfig, chunk_images: int,
          dim: int) -> dict[str, Any]:
    """What the chunks and shards are computed from; a folder left by another plan is refused, not mixed."""
    images = hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes())
    images.update("\n".join(data.train_split.paths[i] for i in indices).encode())
    plan = {"images": int(len(indices)), "images_sha256": images.hexdigest()[:16], "model_sha256": model_digest(model),
            "elements": asdict(cfg) | {"patch_size": data.cfg.img_size}, "chunk_images": chunk_images, "dim": dim}
    return json.loads(json.dumps(plan))  # as read back from JSON (tuples become lists)


def _differences(found: dict[str, Any] | None, plan: dict[str, Any]) -> str:
    found = found or {}
    return ", ".join(f"{k} {found.get(k)!r} (expected {v!r})" for k, v in plan.items() if found.get(k) != v)


def element_vectors(model: torch.nn.Module, data: DatasetBundle, indices: np.ndarray, cfg: ElementConfig,
                    out_dir: Path, info: DistInfo, batch_size: int = 256, chunk_images: int = 64,
                    num_workers: int | None = None,
                    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                    record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the concept vector of every element of the train images `indices` (see the module docstring).

    Every rank calls it (collectives inside). `batch_size` bounds the elements of one forward batch (a batch holds
    ⌊batch_size / cfg.max_elements⌋ images, at least one); `num_workers` defaults to data.cfg.num_workers.
    Returns a summary (rows, images, dim, chunks computed by this call on this rank). A folder whose meta.json
    records the same plan is returned as it is."""
    out_dir = Path(out_dir)
    if chunk_images < 1 or batch_size < 1:
        raise BadConceptInput(f"iis concept pass: chunk_images {chunk_images}, batch_size {batch_size}; "
                              "expected both >= 1")
    dim = int(model.num_features)  # the full backbone vector (representations.HeadInput), any head type
    plan = _plan(model, data, indices, cfg, chunk_images, dim)
    if (out_dir / "shards" / "meta.json").is_file():
        meta = read_meta(out_dir)
        if meta.get("plan") != plan:
            raise BadConceptInput(f"{out_dir / 'shards' / 'meta.json'}: element vectors of another plan: "
                                  f"{_differences(meta.get('plan'), plan)}; use a fresh folder")
        return {"element_rows": sum(meta["rows"][SPLIT]), "images": len(indices), "dim": dim, "computed_chunks": 0}
    plan_file = out_dir / "chunks" / PLAN
    if info.is_main and not plan_file.is_file():
        plan_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(plan_file, json.dumps(plan, indent=1))
    dist.barrier()
    found = json.loads(plan_file.read_text())
    if found != plan:
        raise BadConceptInput(f"{plan_file}: chunks of another plan: {_differences(found, plan)}; use a fresh folder")

    chunks = range(info.rank, -(-len(indices) // chunk_images), info.world_size)
    computed = _compute_chunks(model, data, indices, cfg, out_dir, info, chunks, batch_size, chunk_images,
                               data.cfg.num_workers if num_workers is None else num_workers, autocast)
    rows = _write_shard(out_dir, info.rank, chunks, dim)
    every = dist.all_gather_object(rows)
    meta = {"world_size": info.world_size, "dim": dim, "dtype": "float16", "rows": {SPLIT: every}, "plan": plan}
    if record is not None:
        write_json(out_dir / IMAGES, record)
    on_main(write_meta, out_dir, meta)  # every rank waits: the chunks go only once every shard is complete
    if info.is_main:
        shutil.rmtree(out_dir / "chunks", ignore_errors=True)
    return {"element_rows": sum(every), "images": len(indices), "dim": dim, "computed_chunks": computed}


def _compute_chunks(model, data, indices, cfg, out_dir, info, chunks, batch_size, chunk_images, num_workers,
                    autocast) -> int:
    """Compute and store this rank's chunks that have no file yet; returns how many."""
    pending = [k for k in chunks if not chunk_path(out_dir, k).is_file()]
    per_batch = max(1, batch_size // cfg.max_elements)
    batches, owner = [], []  # positions in `indices` of every batch, and the chunk it belongs to
    for k in pending:
        stop = min((k + 1) * chunk_images, len(indices))
        for a in range(k * chunk_images, stop, per_batch):
            batches.append(list(range(a, min(a + per_batch, stop))))
            owner.append(k)
    if not batches:
        return 0
    dataset = ElementDataset(data.dataset("train", augment=False), indices, cfg, data.cfg.img_size)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate_elements,
                        pin_memory=info.device.type == "cuda")
    from qpm_dist.iis.representations import HeadInput  # imports glm_stages, which imports much of qpm_dist

    capture = HeadInput(model)
    parts: list[tuple[torch.Tensor, ...]] = []
    outputs = model_outputs(model, loader, info, autocast, desc="iis: element vectors")
    try:
        for b, (output, labels, image, element) in enumerate(outputs):
            parts.append((capture(output).to(torch.float16).cpu(), labels.cpu(), image, element))
            if b + 1 == len(batches) or owner[b + 1] != owner[b]:
                _save_chunk(chunk_path(out_dir, owner[b]), parts)
                parts = []
    finally:
        capture.handle.remove()
    return len(pending)


def _save_chunk(path: Path, parts: list[tuple[torch.Tensor, ...]]) -> None:
    x, y, image, element = (torch.cat([p[i] for p in parts]).numpy() for i in range(4))
    with atomic_open(path, "wb") as fh:  # renamed into place complete: a file's existence means a finished chunk
        np.savez(fh, x=x, y=y, image=image, element=element)


def _write_shard(out_dir: Path, rank: int, chunks: range, dim: int) -> int:
    """Copy this rank's chunks, in order, into its element shard and ids file; returns the rows."""
    sizes = []
    for k in chunks:
        with np.load(chunk_path(out_dir, k)) as z:
            sizes.append(int(z["y"].shape[0]))
    writer = ShardWriter(out_dir, SPLIT, rank, sum(sizes), dim, "float16")
    ids = np.empty((sum(sizes), 2), dtype=np.int64)
    pos = 0
    for k, n in zip(chunks, sizes):
        with np.load(chunk_path(out_dir, k)) as z:
            writer.add(torch.from_numpy(z["x"]), torch.from_numpy(z["y"]))
            ids[pos:pos + n, 0], ids[pos:pos + n, 1] = z["image"], z["element"]
        pos += n
    with atomic_open(ids_path(out_dir, rank), "wb") as fh:
        np.save(fh, ids)
    return writer.close()
