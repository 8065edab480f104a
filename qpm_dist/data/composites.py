"""2x2 composite images for Grad-CAM consistency training (specs/gc_consistency.md §3, §10.2, §10.3).

A composite is the training crop of a sample (the positive) in one quadrant q of a 2x2 grid and three crops of
other classes (the negatives) in the other cells, in reading order (q = 0 top-left, 1 top-right, 2 bottom-left,
3 bottom-right; the negatives fill the free cells in their slot order): 3 x 2s x 2s for crops of s x s, no
resizing, no borders.

Where the negatives come from (`gc.negatives`):
* "dataset" (the reference's): three classes drawn from the other classes, one image of each, each with its
  own augmentation; every backend reads them with a second loader of its own (`negatives_loader`), whose
  batch k holds the 3 x B negatives of the k-th positive batch in slot order. The folder and FFCV backends
  read the images a `NegativesPlan` names; WebDataset cannot read by index and draws a second stream instead
  (see qpm_dist.data.wds_loader). Either way a negative of the positive's class is replaced, on the batch's
  device, by another sample of the batch's 3 x B negatives with another class (`pool_negatives`). The plan
  never names one, so on FFCV this never happens and on the folder backend only when data.on_corrupt=skip
  put a readable neighbour in place of an undecodable image (the replacement then depends on the micro-batch:
  such a composite may differ between world sizes).
* "in_batch" (spec §10.3, cheaper, off by default): three other samples of the same micro-batch with another
  label, reusing their augmentation; no extra decode.

The quadrant of a sample is a hash of (seed, epoch, sample index), computed with integer tensor arithmetic on
whatever device the indices are: a run on 2 ranks tiles every sample exactly as the 1-rank run does, a resumed
run as the uninterrupted one, and nothing is copied to the host (no sync, §10.2). Tiling is a gather and a
reshape on the batch's device (the FFCV GPU path tiles on the GPU).

The loader item is a `Batch` with `images` (the positives), `targets`, `index`, `composites` (B x 3 x 2s x 2s)
and `quadrant` (B, int64), plus `negative_index` (B x 3, the negatives' sample indices) and
`same_class_negatives` (B, float: negatives that share the positive's class, which in-batch negatives and the
WebDataset pool cannot always avoid; the consistency task logs it).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from qpm_dist.data.batch import Batch
from qpm_dist.errors import BadInput

NEGATIVES = 3
MODES = ("dataset", "in_batch")
_MODULUS = 2**31 - 1  # MINSTD multiplier and modulus: products stay far below 2^63, so int64 never overflows
_MULTIPLIER = 48271


def _mix(*parts: torch.Tensor | int) -> torch.Tensor:
    """A pseudo-random int64 tensor in [0, 2^31 - 1) from integer tensors and ints (elementwise, broadcast), on
    the device of the first tensor part."""
    device = next((p.device for p in parts if isinstance(p, torch.Tensor)), torch.device("cpu"))
    x = torch.zeros((), dtype=torch.int64, device=device)
    for i, part in enumerate(parts):
        term = torch.as_tensor(part, dtype=torch.int64, device=device) % _MODULUS
        x = (x * 1_000_003 % _MODULUS + term + 7919 * (i + 1)) % _MODULUS
        for _ in range(2):  # a multiply mod M, then an xor-shift: the xor makes the mix non-linear
            x = (x * _MULTIPLIER) % _MODULUS
            x = x ^ (x >> 13)
    return x


class TooFewClasses(BadInput, ValueError):
    """Composites with negatives of another class need a training set of at least 2 classes."""


def check_classes(num_classes: int) -> None:
    if num_classes < 2:
        raise TooFewClasses(f"gc.negatives=dataset: the training set has {num_classes} class(es); composite "
                            f"images need negatives of another class (at least 2 classes)")


_U64 = np.uint64
_MASK64 = (1 << 64) - 1
_CLASS, _IMAGE, _SEED = 1, 2, 3  # what a hash draws (one hash per sample, slot and purpose)
_PLAN_SALT = 0x4E4547  # "NEG": the plan's hashes never coincide with other (seed, epoch, index) hashes


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic, no warnings for arrays)."""
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def _plan_hash(seed: int, epoch: int, index: np.ndarray, purpose: int) -> np.ndarray:
    """N x 3 well-mixed uint64: a function of (seed, epoch, sample index, slot, purpose), element by element."""
    h = _splitmix(np.array([seed & _MASK64], dtype=_U64) ^ _U64(_PLAN_SALT))
    h = _splitmix(h ^ _U64(epoch & _MASK64))
    h = _splitmix(h ^ index.astype(_U64)[:, None])
    return _splitmix(h ^ (np.arange(NEGATIVES, dtype=_U64)[None, :] * _U64(4) + _U64(purpose)))


class NegativesPlan:
    """Which images are the negatives of each positive, and their augmentation seeds (host side, numpy).

    As the reference (spec §3): for the positive sample i in epoch e, three classes drawn uniformly from the
    other classes with replacement, and one image drawn uniformly from each class's training samples. Every
    draw is a hash of (seed, e, i, slot), so the plan is a pure function of them: ranks and resumed runs draw
    exactly what one uninterrupted process draws, whatever the order in which samples are planned, and it is
    vectorised (a whole epoch of ImageNet in a fraction of a second, where a generator per sample would take
    tens of seconds). `labels[i]` is sample i's class; samples with a negative label (FFCV placeholders of
    images left out at conversion) are never drawn. "The other classes" are those with training samples.
    """

    def __init__(self, labels: np.ndarray, seed: int) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.seed = seed
        usable = np.flatnonzero(self.labels >= 0)
        self.classes, position, counts = np.unique(self.labels[usable], return_inverse=True, return_counts=True)
        check_classes(len(self.classes))
        self.members = usable[np.argsort(position, kind="stable")]  # sample indices grouped by class
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(_U64)
        self.counts = counts.astype(_U64)
        self.class_position = np.full(int(self.classes[-1]) + 1, -1, dtype=np.int64)
        self.class_position[self.classes] = np.arange(len(self.classes))

    def draw(self, epoch: int, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N x 3 negative sample indices, N x 3 augmentation seeds in [0, 2^63)) of the positives `index`.
        The seeds differ from the ones these images get as positives (datasets.sample_seed)."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        own = self.class_position[self.labels[index]].astype(_U64)[:, None]
        k = _U64(len(self.classes))
        other = (own + _U64(1) + _plan_hash(self.seed, epoch, index, _CLASS) % (k - _U64(1))) % k  # never own
        pick = self.starts[other] + _plan_hash(self.seed, epoch, index, _IMAGE) % self.counts[other]
        seeds = (_plan_hash(self.seed, epoch, index, _SEED) >> _U64(1)).astype(np.int64)
        return self.members[pick.astype(np.int64)], seeds


def quadrants(index: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """The positive's quadrant (0..3) of each sample index: a function of (seed, epoch, index), on index's device."""
    return (_mix(index, seed, epoch, 0x51) >> 16) % 4


def tile(positives: torch.Tensor, negatives: torch.Tensor, quadrant: torch.Tensor) -> torch.Tensor:
    """B x C x 2s x 2s composites: positives (B x C x s x s) in their quadrant, negatives (B x 3 x C x s x s) in
    the free cells in slot order. Pure tensor ops on the inputs' device; keeps channels_last if the positives are."""
    b, c, s, s2 = positives.shape
    if s != s2 or negatives.shape != (b, NEGATIVES, c, s, s) or quadrant.shape != (b,):
        raise ValueError(f"tile: positives {tuple(positives.shape)} must be square B x C x s x s, negatives "
                         f"B x {NEGATIVES} x C x s x s (got {tuple(negatives.shape)}), quadrant B (got "
                         f"{tuple(quadrant.shape)})")
    cells = torch.cat([positives.unsqueeze(1), negatives.to(positives.dtype)], dim=1)  # B x 4 x C x s x s
    j = torch.arange(4, device=quadrant.device).unsqueeze(0)  # cell in reading order
    q = quadrant.to(torch.int64).unsqueeze(1)
    source = torch.where(j == q, 0, torch.where(j < q, j + 1, j))  # cell j <- positive, or the next negative
    grid = cells[torch.arange(b, device=cells.device).unsqueeze(1), source.to(cells.device)]
    composite = grid.reshape(b, 2, 2, c, s, s).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 2 * s, 2 * s)
    if positives.is_contiguous(memory_format=torch.channels_last) and not positives.is_contiguous():
        composite = composite.contiguous(memory_format=torch.channels_last)
    return composite


def in_batch_negatives(targets: torch.Tensor, index: torch.Tensor, seed: int, epoch: int) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """For each sample, the batch positions of 3 other samples, preferring ones with another label (spec §10.3):
    (B x 3 positions, B float count of the chosen ones that share the label). The choice is a function of the
    batch's sample indices, (seed, epoch); on the batch's device, no host sync. A batch of fewer than 4 samples
    cannot give 3 distinct others: then some are repeated."""
    b = targets.shape[0]
    scores = _mix(index.unsqueeze(1), index.unsqueeze(0), seed, epoch, 0x4E).to(torch.float64)
    other_label = targets.unsqueeze(1) != targets.unsqueeze(0)
    itself = torch.eye(b, dtype=torch.bool, device=targets.device)
    # other labels first (score + 2^31), then same label, never the sample itself while others exist
    scores = scores + other_label.to(torch.float64) * float(2**31) - itself.to(torch.float64) * float(2**32)
    k = min(NEGATIVES, b)
    chosen = scores.topk(k, dim=1).indices
    if k < NEGATIVES:
        chosen = chosen[:, torch.arange(NEGATIVES, device=chosen.device) % k]
    same = (targets[chosen] == targets.unsqueeze(1)).sum(dim=1).to(torch.float32)
    return chosen, same


def pool_negatives(targets: torch.Tensor, index: torch.Tensor, pool_targets: torch.Tensor,
                   pool_index: torch.Tensor, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions in the 3 x B pool of negatives of each sample's 3 negatives, (B x 3, B float count of those
    sharing the sample's label): slot s of sample b is pool position 3b + s, unless that one has b's label;
    then another pool sample with another label takes its place, the one with the highest score, a hash of
    (index, its pool index, slot, seed, epoch); where the pool has none, the slot stays. On the batch's
    device, no host sync."""
    b = targets.shape[0]
    own = torch.arange(NEGATIVES * b, device=targets.device).reshape(b, NEGATIVES)
    keep = pool_targets[own] != targets.unsqueeze(1)  # B x 3
    slot = torch.arange(NEGATIVES, device=targets.device).view(1, NEGATIVES, 1)
    scores = _mix(index.view(b, 1, 1), pool_index.view(1, 1, -1), slot, seed, epoch, 0x50)  # B x 3 x 3B
    other = (pool_targets.view(1, 1, -1) != targets.view(b, 1, 1))
    scores = torch.where(other, scores, -1)
    best = scores.argmax(dim=2)
    chosen = torch.where(keep | ~other.any(dim=2), own, best)
    same = (pool_targets[chosen] == targets.unsqueeze(1)).sum(dim=1).to(torch.float32)
    return chosen, same


class CompositeLoader:
    """An EpochLoader yielding composite Batches, from a backend's training loader (with sample indices) and, for
    negatives="dataset", the backend's negatives loader, whose batch k holds the 3 x B negatives of batch k in
    slot order (sample b's negatives at 3b, 3b+1, 3b+2)."""

    def __init__(self, positives, negatives, mode: str, seed: int) -> None:
        if mode not in MODES:
            raise ValueError(f"composite negatives must be one of {MODES}, got {mode!r}")
        if (negatives is None) != (mode == "in_batch"):
            raise ValueError("negatives='dataset' needs a negatives loader, 'in_batch' none")
        self.positives, self.negatives, self.mode, self.seed = positives, negatives, mode, seed
        self.epoch = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.positives.batches_per_epoch

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = epoch
        self.positives.set_epoch(epoch, skip_batches)
        if self.negatives is not None:
            self.negatives.set_epoch(epoch, skip_batches)

    def __len__(self) -> int:
        return len(self.positives)

    def __iter__(self) -> Iterator[Batch]:
        if self.negatives is None:
            for item in self.positives:
                yield self.compose(Batch.of(item), None)
            return
        # strict: a negatives loader out of step with the positives is a bug, not a shorter epoch
        for item, extra in zip(self.positives, self.negatives, strict=True):
            yield self.compose(Batch.of(item), extra)

    def compose(self, batch: Batch, extra) -> Batch:
        if "index" not in batch:
            raise KeyError("composites need the loader's sample indices (return_index=True)")
        images, targets, index = batch.images, batch.targets, batch["index"]
        b = targets.shape[0]
        if extra is None:
            positions, same = in_batch_negatives(targets, index, self.seed, self.epoch)
            negatives, negative_index = images[positions], index[positions]
        else:
            neg = Batch.of(extra)
            if neg.size != NEGATIVES * b:
                raise ValueError(f"the negatives loader gave {neg.size} images for a batch of {b} (expected "
                                 f"{NEGATIVES * b})")
            positions, same = pool_negatives(targets, index, neg.targets, neg["index"], self.seed, self.epoch)
            negatives, negative_index = neg.images[positions.to(neg.images.device)], neg["index"][positions]
        quadrant = quadrants(index, self.seed, self.epoch)
        batch["composites"] = tile(images, negatives, quadrant.to(images.device))
        batch["quadrant"] = quadrant
        batch["negative_index"] = negative_index
        batch["same_class_negatives"] = same
        return batch


def composite_loader(data, mode: str, micro_batch: int, global_batch: int, rank: int, world_size: int,
                     pin_memory: bool = False) -> CompositeLoader:
    """The training loader of `data` (any DataSource) yielding composite Batches with negatives from `mode`."""
    positives = data.train_loader(micro_batch, global_batch, rank, world_size, pin_memory=pin_memory,
                                  return_index=True)
    negatives = None
    if mode == "dataset":
        negatives = data.negatives_loader(micro_batch, global_batch, rank, world_size, pin_memory=pin_memory)
    return CompositeLoader(positives, negatives, mode, data.seed)
