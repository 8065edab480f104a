"""FFCV backend (`data.backend: ffcv`): the .beton files written by `python -m data_prep to-ffcv`.

Training uses FFCV's `Loader` with `distributed=True` under several processes; it is created by the
trainer, i.e. after the process group exists, as FFCV requires. Its sample order is our own
`EpochShardOrder`, a FFCV TraversalOrder that hands FFCV exactly the folder backend's `EpochShardSampler`
share of this rank (one permutation per epoch seeded by (seed, epoch), identical for every world size, cut
to whole global batches, rank r taking positions r, r+W, ...). FFCV's built-in RANDOM order in distributed
mode is a DistributedSampler that pads ranks with repeated samples and whose permutation depends on the
world size; ours does neither.

Guarantees: every step's global batch holds the same samples as with the folder backend; equal batch counts
on every rank; `set_epoch(epoch, skip_batches)` resumes with the next unseen batch; a cut or structurally
damaged .beton is refused at open (qpm_dist.data.integrity; FFCV itself would feed wrong bytes). Not guaranteed: the
augmentation itself. FFCV draws crops and flips from numba's unseeded per-thread generators inside its JIT
pipeline, so they are random, not a function of (seed, epoch, index).

Transforms (FFCV's JIT operations, same semantics as qpm_dist.data.transforms):
  train, augment=imagenet: RandomResizedCrop(img_size, scale (0.08, 1), ratio (3/4, 4/3)), horizontal flip,
      brightness/contrast/saturation jitter 0.1 (torchvision's ColorJitter applies them in random order,
      FFCV in a fixed one); augment=none: the test transform. Other recipes (light, cub) need per-sample
      torchvision ops FFCV cannot run: use the folder or wds backend for them.
  test: resize and centre-crop img_size (FFCV's CenterCropRGBImageDecoder with transforms.eval_crop_ratio), or squash to img_size x img_size for box-cropped / synthetic data, as the folder backend.
  FFCV resizes with OpenCV's INTER_AREA, torchvision with antialiased bilinear: pixel values differ slightly.
CPU path: normalisation in FFCV's NormalizeImage (numba), float32 NCHW out. GPU path (the trainer passes
pin_memory=True when it trains on CUDA): uint8 batches go to this rank's GPU with ToDevice and are
normalised there with torch ops (FFCV's GPU NormalizeImage would need cupy).

Negatives of composite images (data.composites, gc.negatives=dataset): a second Loader over the train .beton,
batch 3 x micro, whose `NegativesOrder` hands FFCV the rows the NegativesPlan names for this rank's share of
the epoch, in slot order. The plan (which images) is exact and resumable; their augmentation is FFCV's own,
unseeded, as for the positives. FFCV's Loader uses `distributed` only inside its built-in orders (a custom
TraversalOrder's sample_order is taken as this rank's order, whatever its length) and sizes an epoch by the
order of epoch 0 before any skip, `len(order) // batch_size` batches: 3x the positives' rows in batches of 3x
micro, the same number of batches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import (CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder,
                                   ResizedCropRGBImageDecoder)
from ffcv.loader import Loader, OrderOption
from ffcv.reader import Reader
from ffcv.transforms import (NormalizeImage, RandomBrightness, RandomContrast, RandomHorizontalFlip,
                             RandomSaturation, Squeeze, ToDevice, ToTensor, ToTorchImage)
from ffcv.traversal_order.base import TraversalOrder

from qpm_dist.config import DataConfig
from qpm_dist.data.composites import NEGATIVES, NegativesPlan
from qpm_dist.data.integrity import DataIntegrityError, beton_problems, raise_if_damaged, repair_hint
from qpm_dist.data.loaders import EpochShardSampler
from qpm_dist.data.manifest import ConvertedSource
from qpm_dist.data.transforms import eval_crop_ratio, eval_squashes


def beton_columns(path: str | Path) -> dict[str, np.ndarray]:
    """The per-sample metadata columns of a .beton by field name ('image', 'label', 'index'); FFCV stores
    them as f0, f1, ... in field order."""
    reader = Reader(str(path))
    return {name: reader.metadata[f"f{i}"] for i, name in enumerate(reader.field_names)}


def _full_image(height, width, scale, ratio):
    return 0, 0, height, width


class SquashRGBImageDecoder(ResizedCropRGBImageDecoder):
    """Decode and resize the whole image to output_size, ignoring its aspect ratio (the folder backend's
    Resize((s, s)) for box-cropped and synthetic data)."""

    def __init__(self, output_size):
        super().__init__(output_size)
        self.scale, self.ratio = None, 1.0

    @property
    def get_crop_generator(self):
        return _full_image


class EpochShardOrder(TraversalOrder):
    """FFCV traversal order = this rank's EpochShardSampler share, mapped to .beton rows.

    FFCV's Loader accepts a TraversalOrder *instance* and calls it with itself (`order(loader)`), so the
    instance binds the loader in __call__ instead of taking it in __init__."""

    def __init__(self, rows: np.ndarray, sampler: EpochShardSampler) -> None:
        self.rows, self.sampler, self.skip_samples = rows, sampler, 0

    def __call__(self, loader: Loader) -> "EpochShardOrder":
        self.loader, self.indices, self.seed = loader, loader.indices, loader.seed
        self.distributed = loader.distributed
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        self.sampler.set_epoch(epoch, self.skip_samples)
        return self.rows[np.array(self.sampler.indices(), dtype=np.int64)]


class NegativesOrder(EpochShardOrder):
    """FFCV traversal order = the .beton rows of the negatives the plan names for this rank's EpochShardSampler
    share (3 per sample, slot order). The plan is keyed by source sample index; `index_rows[i]` is the row of
    sample i."""

    def __init__(self, rows: np.ndarray, sampler: EpochShardSampler, row_index: np.ndarray, index_rows: np.ndarray,
                 plan: NegativesPlan) -> None:
        super().__init__(rows, sampler)
        self.row_index, self.index_rows, self.plan = row_index, index_rows, plan

    def sample_order(self, epoch: int) -> np.ndarray:
        positives = self.row_index[super().sample_order(epoch)]
        negatives, _ = self.plan.draw(epoch, positives)  # FFCV augments them itself (unseeded)
        return self.index_rows[negatives.ravel()]


def image_pipeline(cfg: DataConfig, train: bool, device: torch.device | None) -> list:
    """FFCV operations for the image field; `device` set (CUDA) selects the GPU path."""
    s = cfg.img_size
    if eval_squashes(cfg):
        test = SquashRGBImageDecoder((s, s))
    else:
        test = CenterCropRGBImageDecoder((s, s), ratio=eval_crop_ratio(cfg))
    if not train or cfg.augment == "none":
        ops = [test]
    elif cfg.augment == "imagenet":
        ops = [RandomResizedCropRGBImageDecoder((s, s)), RandomHorizontalFlip(),
               RandomBrightness(0.1, p=1.0), RandomContrast(0.1, p=1.0), RandomSaturation(0.1, p=1.0)]
    else:
        raise ValueError(f"data.augment={cfg.augment} is not available with data.backend=ffcv (it supports "
                         f"'imagenet' and 'none'); use data.backend=folder or wds for this recipe")
    if device is None:
        mean, std = np.array(cfg.mean) * 255, np.array(cfg.std) * 255
        return ops + [NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage(channels_last=False)]
    return ops + [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)]


def int_pipeline(device: torch.device | None) -> list:
    ops = [IntDecoder(), ToTensor(), Squeeze()]
    return ops if device is None else ops + [ToDevice(device, non_blocking=True)]


def _device(pin_memory: bool) -> torch.device | None:
    """The GPU path when the trainer trains on CUDA (it passes pin_memory=True exactly then)."""
    if pin_memory and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return None


class FFCVBatches:
    """Iterates a FFCV Loader as (images float NCHW normalised, labels int64[, sample indices]).

    As with FFCV's own Loader, the CPU path's image tensor lives in a buffer FFCV reuses a few batches
    later: use a batch before fetching the next (as training and evaluation loops do) or clone it. Labels
    and indices are copied (cheap), so they can be kept.
    """

    def __init__(self, loader: Loader, cfg: DataConfig, device: torch.device | None, return_index: bool) -> None:
        self.loader, self.device, self.return_index = loader, device, return_index
        if device is not None:  # GPU path: normalise on the device
            self.mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1) * 255
            self.std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1) * 255

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            # reshape: FFCV's Squeeze turns a batch of one into a 0-d tensor
            images, labels = batch[0], batch[1].to(torch.int64, copy=True).reshape(-1)
            if self.device is not None:
                images = (images.float() - self.mean) / self.std
            if self.return_index:
                yield images, labels, batch[2].to(torch.int64, copy=True).reshape(-1)
            else:
                yield images, labels


class FFCVTrainLoader(FFCVBatches):
    """EpochLoader over FFCV: `set_epoch` picks the epoch's order and the batches to skip."""

    def __init__(self, loader: Loader, order: EpochShardOrder, micro_batch: int, cfg: DataConfig,
                 device: torch.device | None, return_index: bool) -> None:
        super().__init__(loader, cfg, device, return_index)
        self.order, self.micro = order, micro_batch

    @property
    def batches_per_epoch(self) -> int:
        return self.order.sampler.per_rank // self.micro

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.loader.next_epoch = epoch  # FFCV passes it to sample_order at the next iter()
        self.order.skip_samples = skip_batches * self.micro

    def __len__(self) -> int:
        return self.batches_per_epoch - self.order.skip_samples // self.micro


class FFCVSource(ConvertedSource):
    """DataSource over a `to-ffcv` folder (`data.converted`)."""

    format = "ffcv"

    def __init__(self, cfg: DataConfig, seed: int) -> None:
        super().__init__(cfg, seed)
        self.files, self.rows = {}, {}
        for split in ("train", "test"):
            info = self.manifest["splits"][split]
            path = self.root / info["file"]
            if not path.is_file():
                raise FileNotFoundError(f"data.converted: {path} listed in dataset.json is missing")
            # cheap, on every rank: FFCV itself would feed the rows of a cut file from wrong bytes
            raise_if_damaged(beton_problems(path, info.get("bytes"), info.get("rows")), self.root, "ffcv")
            columns = beton_columns(path)
            labels = columns["label"]
            if split == "train":  # what the negatives plan needs: classes and rows by source sample index
                self.train_labels, self.train_index = labels.astype(np.int64), columns["index"].astype(np.int64)
            # Rows of images left out at conversion (placeholders, label -1) are never loaded.
            self.files[split], self.rows[split] = str(path), np.flatnonzero(labels >= 0).astype(np.int64)
            if len(self.rows[split]) != int(info["num_samples"]):
                raise DataIntegrityError(f"data.converted: {path}: {len(self.rows[split])} samples, dataset.json "
                                         f"says {info['num_samples']}; {repair_hint(self.root, 'ffcv')}")
        image_pipeline(cfg, True, None)  # an unsupported augment recipe fails here, before training
        self._eval_cache: dict[tuple, FFCVBatches] = {}

    @property
    def threads(self) -> int:
        return max(1, self.cfg.num_workers)

    def num_samples(self, split: str) -> int:
        return len(self.rows[split])

    def train_loader(self, micro_batch: int, global_batch: int, rank: int, world_size: int,
                     pin_memory: bool = False, return_index: bool = False) -> FFCVTrainLoader:
        rows = self.rows["train"]
        sampler = EpochShardSampler(len(rows), global_batch, rank, world_size, self.seed)
        if sampler.per_rank % micro_batch:
            raise ValueError(f"per-rank batch share {sampler.per_rank} is not a multiple of {micro_batch}")
        order = EpochShardOrder(rows, sampler)
        device = _device(pin_memory)
        pipelines = {"image": image_pipeline(self.cfg, True, device), "label": int_pipeline(device),
                     "index": int_pipeline(device) if return_index else None}
        loader = Loader(self.files["train"], batch_size=micro_batch, num_workers=self.threads,
                        os_cache=self.cfg.ffcv_os_cache, order=order, distributed=world_size > 1, seed=self.seed,
                        indices=rows, pipelines=pipelines, drop_last=True)
        return FFCVTrainLoader(loader, order, micro_batch, self.cfg, device, return_index)

    def negatives_loader(self, micro_batch: int, global_batch: int, rank: int, world_size: int,
                         pin_memory: bool = False) -> FFCVTrainLoader:
        """The negatives of composite images: batch k holds the 3 x micro_batch negatives of the k-th batch of
        `train_loader` (same arguments) in slot order, with their sample indices (see the module docstring)."""
        rows = self.rows["train"]
        sampler = EpochShardSampler(len(rows), global_batch, rank, world_size, self.seed)
        if sampler.per_rank % micro_batch:
            raise ValueError(f"per-rank batch share {sampler.per_rank} is not a multiple of {micro_batch}")
        size = int(self.train_index.max()) + 1
        labels = np.full(size, -1, dtype=np.int64)  # by source index; -1: placeholder rows, never drawn
        labels[self.train_index[rows]] = self.train_labels[rows]
        index_rows = np.full(size, -1, dtype=np.int64)
        index_rows[self.train_index] = np.arange(len(self.train_index))
        order = NegativesOrder(rows, sampler, self.train_index, index_rows, NegativesPlan(labels, self.seed))
        device = _device(pin_memory)
        pipelines = {"image": image_pipeline(self.cfg, True, device), "label": int_pipeline(device),
                     "index": int_pipeline(device)}
        loader = Loader(self.files["train"], batch_size=NEGATIVES * micro_batch, num_workers=self.threads,
                        os_cache=self.cfg.ffcv_os_cache, order=order, distributed=world_size > 1, seed=self.seed,
                        indices=rows, pipelines=pipelines, drop_last=True)
        return FFCVTrainLoader(loader, order, micro_batch, self.cfg, device, return_index=True)

    def eval_loader(self, split: str, batch_size: int, rank: int, world_size: int, pin_memory: bool = False,
                    return_index: bool = False) -> FFCVBatches:
        """Rows rank, rank+W, ... in file order, no padding (FFCV's distributed mode would pad). Cached:
        building a Loader JIT-compiles its pipeline, which takes seconds."""
        key = (split, batch_size, rank, world_size, pin_memory, return_index)
        if key not in self._eval_cache:
            device = _device(pin_memory)
            pipelines = {"image": image_pipeline(self.cfg, False, device), "label": int_pipeline(device),
                         "index": int_pipeline(device) if return_index else None}
            loader = Loader(self.files[split], batch_size=batch_size, num_workers=self.threads,
                            os_cache=self.cfg.ffcv_os_cache, order=OrderOption.SEQUENTIAL, distributed=False,
                            indices=self.rows[split][rank::world_size], pipelines=pipelines, drop_last=False)
            self._eval_cache[key] = FFCVBatches(loader, self.cfg, device, return_index)
        return self._eval_cache[key]
