"""2x2 composite images for Grad-CAM consistency training (specs/gc_consistency.md §3, §10.2, §10.3).

A composite is the training crop of a sample (the positive) in one quadrant q of a 2x2 grid and three crops of
other classes (the negatives) in the other cells, in reading order (q = 0 top-left, 1 top-right, 2 bottom-left,
3 bottom-right; the negatives fill the free cells in their slot order): 3 x 2s x 2s for crops of s x s, no
resizing, no borders.

Where the negatives come from (`gc.negatives`):
* "dataset" (the reference's): three classes drawn from the other classes, one image of each, each with its
  own augmentation; every backend reads them with a second loader of its own (`negatives_loader`).
* "in_batch" (spec §10.3, cheaper, off by default): three other samples of the same micro-batch with another
  label, reusing their augmentation; no extra decode.

The quadrant of a sample is a hash of (seed, epoch, sample index), computed with integer tensor arithmetic on
whatever device the indices are: a run on 2 ranks tiles every sample exactly as the 1-rank run does, a resumed
run as the uninterrupted one, and nothing is copied to the host (no sync, §10.2). Tiling is a gather and a
reshape on the batch's device (the FFCV GPU path tiles on the GPU).

The loader item is a `Batch` with `images` (the positives), `targets`, `index`, `composites` (B x 3 x 2s x 2s)
and `quadrant` (B, int64), plus `negative_index` (B x 3, the negatives' sample indices) and
`same_class_negatives` (B, float: negatives that share the positive's class, which in-batch negatives cannot
always avoid; the consistency task logs it).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from qpm_dist.data.batch import Batch

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
        negatives: Iterable = self.negatives if self.negatives is not None else iter(lambda: None, 1)
        for item, extra in zip(self.positives, negatives):
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
            negatives = neg.images.reshape(b, NEGATIVES, *neg.images.shape[1:])
            negative_index = neg["index"].reshape(b, NEGATIVES)
            same = (neg.targets.reshape(b, NEGATIVES) == targets.unsqueeze(1)).sum(dim=1).to(torch.float32)
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
