"""The representations IIS scores: a backbone's pooled penultimate vector of every train and test image, as
per-rank fp16 shards (specs/iis.md §0, §2.5, §7; issue 17 item 2).

The representation is the input of the head's final linear layer BEFORE anything the head does to the channels:
the backbone's feature maps (what the head receives), pooled the way the head pools them (`pooling` of the head,
"avg" when it has none). For the dense model that is exactly the final Linear's input (spec §2.4's rule); for a
sparse-head model it is the FULL backbone vector, every channel, not the n selected ones the sparse
head reads (`ModelOutput.feature_maps` of a sparse head holds only those, so it cannot serve): IIS scores the
representation the fine-tuning produced, not the sparse layer. A GC model with global max pooling
(`DenseHead(pooling="max")`) is represented by its max-pooled vector, the input its Linear was trained on.
The maps are captured with a forward pre-hook on the head, one rule for every head type.

The stage (`iis_features`) is the shared streamed training-set pass (stages.train_pass.TrainingSetPass): every
rank runs the model over its rows (rank, rank + W, … of each split) and streams them into its own memory-mapped
shard (glm.shards.ShardWriter via methods.glm_stages.FeatureShards), fp16 by default, so no rank ever holds more
than a batch; there is never one monolithic tensor (the reference's 10.5 GB float32 dumps, spec §7). Row j of
the shard written by rank r of W is sample r + j·W of its split (meta.json: "order": "strided"); `Representations`
reads them back memory-mapped, by sample index, with any world size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from qpm_dist.config import Config
from qpm_dist.errors import BadInput
from qpm_dist.glm.shards import read_meta, shard_paths, shards_for
from qpm_dist.methods.glm_stages import FeatureShards
from qpm_dist.models.net import Classifier, ModelOutput
from qpm_dist.stages.runner import RunContext
from qpm_dist.stages.train_pass import Accumulator, TrainingSetPass

REPRESENTATION = "pooled head input"  # meta.json "representation": what the shards hold (see the module doc)
ORDER = "strided"  # meta.json "order": row j of shard r (of W) is sample r + j·W
DTYPES = ("float16", "float32")


class BadShards(BadInput, ValueError):
    """Representation shards that are missing, or whose files do not match their meta.json."""


def pool(feature_maps: torch.Tensor, pooling: str) -> torch.Tensor:
    """B x F x H x W -> B x F in float32: the global pooling a head applies before its linear layer."""
    maps = feature_maps.float()
    return F.adaptive_max_pool2d(maps, 1).flatten(1) if pooling == "max" else maps.mean(dim=(2, 3))


class HeadInput:
    """The representation of the batch a classifier last ran: its head's input (all backbone channels), pooled
    with the head's pooling. Called with the model's output (FeatureShards' `features` hook), which it ignores:
    a sparse head's output holds only the selected channels."""

    def __init__(self, model: Classifier) -> None:
        self.pooling = getattr(model.head, "pooling", "avg")
        self.value: torch.Tensor | None = None
        self.handle = model.head.register_forward_pre_hook(self._capture)

    def _capture(self, module: torch.nn.Module, args: tuple) -> None:
        self.value = pool(args[0], self.pooling)

    def __call__(self, output: ModelOutput) -> torch.Tensor:
        value, self.value = self.value, None
        if value is None or value.shape[0] != output.logits.shape[0]:
            raise RuntimeError("HeadInput: no representation captured for this batch (the head did not run)")
        return value


def iis_features(name: str, model_stage: str, batch_size: Callable[[Config], int], dtype: str = "float16",
                 splits: tuple[str, ...] = ("train", "test")) -> TrainingSetPass:
    """The stage writing the representations of `model_stage`'s model for `splits`: per-rank `dtype` shards
    (glm.shards layout) and meta.json with "representation", "pooling", "order" and "num_classes".
    `batch_size(cfg)` is the pass's global batch (only speed depends on it, so it is not in the stage key)."""
    if dtype not in DTYPES:
        raise ValueError(f"iis_features: dtype {dtype!r}; expected one of {', '.join(DTYPES)}")

    def accumulators(ctx: RunContext, model: Classifier, out_dir: Path) -> list[Accumulator]:
        capture = HeadInput(model)
        meta = {"representation": REPRESENTATION, "pooling": capture.pooling, "order": ORDER,
                "num_classes": ctx.data.num_classes}
        return [FeatureShards(out_dir, ctx.info.rank, model.num_features, dtype, features=capture, meta=meta)]

    return TrainingSetPass(name, model_stage, accumulators, batch_size=batch_size, splits=splits,
                           key=lambda cfg: {"representation": REPRESENTATION, "dtype": dtype})


class Representations:
    """The shards of an `iis_features` stage folder, memory-mapped (read-only), addressed by sample index.

    Opening maps the files; only the rows asked for are read. Any reader world size works: rank r of W owns the
    samples whose shard s = i mod W_written has s mod W = r (glm.shards.shards_for)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        try:
            meta = read_meta(self.folder)
        except FileNotFoundError as exc:
            raise BadShards(str(exc)) from None
        where = f"{self.folder / 'shards' / 'meta.json'}"
        if not (isinstance(meta.get("world_size"), int) and isinstance(meta.get("dim"), int) and
                isinstance(meta.get("rows"), dict)):
            raise BadShards(f"{where}: expected integers world_size and dim and a rows table, found keys "
                            f"{sorted(meta)}")
        if meta.get("order", ORDER) != ORDER or meta.get("dtype") not in DTYPES:
            raise BadShards(f"{where}: order {meta.get('order')!r}, dtype {meta.get('dtype')!r}; expected "
                            f"{ORDER!r} and one of {', '.join(DTYPES)}")
        self.meta: dict[str, Any] = meta
        self.world_size_written: int = int(meta["world_size"])
        self.dim: int = int(meta["dim"])
        self.num_classes: int | None = meta.get("num_classes")
        self._open: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        for split, counts in meta["rows"].items():
            total = sum(counts)
            expected = [len(range(s, total, self.world_size_written)) for s in range(self.world_size_written)]
            if counts != expected:
                raise BadShards(f"{where}: {split} rows per shard {counts}; a strided split of {total} rows over "
                                f"{self.world_size_written} ranks has {expected}")

    @property
    def splits(self) -> list[str]:
        return list(self.meta["rows"])

    def num_rows(self, split: str) -> int:
        if split not in self.meta["rows"]:
            raise BadShards(f"{self.folder}: no {split!r} representations (found: {', '.join(self.splits)})")
        return sum(self.meta["rows"][split])

    def shard(self, split: str, s: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows x dim memmap, labels memmap) of shard `s`, checked against meta.json once."""
        if (split, s) not in self._open:
            rows = self.meta["rows"][split][s]
            x_path, y_path = shard_paths(self.folder, split, s)
            try:
                x, y = np.load(x_path, mmap_mode="r"), np.load(y_path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise BadShards(f"{x_path.parent}: {split} shard {s} unreadable ({exc})") from None
            if x.shape != (rows, self.dim) or x.dtype != np.dtype(self.meta["dtype"]) or y.shape != (rows,):
                raise BadShards(f"{x_path}: {x.dtype} {x.shape} with {y.shape[0]} labels; meta.json expects "
                                f"{self.meta['dtype']} ({rows}, {self.dim}) with {rows} labels")
            self._open[(split, s)] = (x, y)
        return self._open[(split, s)]

    def owned_mask(self, split: str, rank: int, world_size: int) -> np.ndarray:
        """Flags over the samples of `split`: those whose rows rank `rank` of `world_size` reads (1 B/sample)."""
        mask = np.zeros(self.num_rows(split), dtype=bool)
        for s in shards_for(self.world_size_written, rank, world_size):
            mask[s::self.world_size_written] = True
        return mask

    def owned(self, split: str, rank: int, world_size: int) -> np.ndarray:
        """The sorted sample indices of `split` whose rows rank `rank` of `world_size` reads."""
        return np.flatnonzero(self.owned_mask(split, rank, world_size))

    def rows(self, split: str, samples: np.ndarray, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 representations and labels of `samples` (sample indices), in that order: a minibatch."""
        samples = np.asarray(samples, dtype=np.int64)
        x_out = np.empty((samples.size, self.dim), dtype=np.float32)
        y_out = np.empty(samples.size, dtype=np.int64)
        shard_of, row_of = samples % self.world_size_written, samples // self.world_size_written
        for s in np.unique(shard_of):
            where = np.flatnonzero(shard_of == s)
            where = where[np.argsort(row_of[where], kind="stable")]  # ascending rows: sequential reads
            x, y = self.shard(split, int(s))
            x_out[where] = x[row_of[where]]
            y_out[where] = y[row_of[where]]
        return torch.from_numpy(x_out).to(device), torch.from_numpy(y_out).to(device)

    def in_sample_order(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Every row of `split` in sample order, in the stored dtype, in memory: for tests and small data only."""
        n, w = self.num_rows(split), self.world_size_written
        x_all = np.empty((n, self.dim), dtype=np.dtype(self.meta["dtype"]))
        y_all = np.empty(n, dtype=np.int64)
        for s in range(w):
            x, y = self.shard(split, s)
            x_all[s::w], y_all[s::w] = x, y
        return x_all, y_all
