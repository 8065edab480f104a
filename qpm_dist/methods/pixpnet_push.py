"""The distributed prototype push (projection) of PixPNet/ProtoPNet (specs/pixpnet.md §3, §7.2; issue 16 item 3).

Every prototype is replaced by the latent vector of its nearest training patch, under three rules:
* class-restricted: an image is scored only against its own class's M = P / C prototypes (the reference computes
  all N x P x Hz x Wz distances of a batch and masks the other classes with +inf, spec §7.2);
* each training image is used by at most one prototype (the reference's default `sample` duplicate filter);
* the assignment is greedy over the WHOLE training split, not per batch: all (prototype, image) candidates of a
  class in ascending order of (distance, global sample index, cell, prototype index); a prototype takes the
  first candidate whose image no other prototype took. The reference applies this greedy rule batch by batch,
  so its result depends on the batch order; ours depends on the data and the model only, so the same on any
  number of ranks. Each candidate is an image's best cell for that prototype (first cell on ties).

Distributed, every rank does 1/W of the work and memory does not grow with the dataset:
1. `scan`: every rank streams its shard of the un-augmented training split (`DatasetBundle.eval_loader("train",
   ..., return_index=True)`), and keeps, per prototype, its best M candidates so far (`PatchCandidates`:
   distance, global sample index, cell, latent vector; O(P x M x D) per rank). M candidates per prototype are
   enough: within a class the M - 1 other prototypes take at most M - 1 images, so a prototype's greedy pick is
   among its M best images (ranks' shards are disjoint, so the global M best are among the ranks' M best).
2. `gather_candidates`: one all_gather of the fixed-size (distance, sample, cell) tensors (W x P x M each);
   `assign`, identically on every rank, runs the greedy rule above on them.
3. `share_vectors`: each winner's vector is broadcast by the rank that holds it (one broadcast per rank, P x D in
   total), and every rank writes the same prototypes into its model.
A prototype without any eligible patch (its class has fewer training images than M, or none) keeps its previous
vector and is reported (the reference zeroes it and keeps a stale index: B9).

Use (a training task's epoch-end hook, every rank; the bare module, not its DDP/DeepSpeed wrapper):

    loader = data.eval_loader("train", push_batch, info.rank, info.world_size, return_index=True)
    record = push_prototypes(module, loader, push_batch, info.device, autocast)   # PushRecord
    record.summary()  # JSON-ready per-prototype sample / cell / distance, `kept` prototypes

The optimiser's state of the prototypes (Adam moments) is left as it is, as in the reference; the trainer tells the
strategy that parameters were edited (engine.task), so DeepSpeed's fp32 copy follows.

Bitwise equality over world sizes: an image's distances must not depend on the batch it was computed in.
Measured on CPU (torch 2.14.1, oneDNN 3.12): a 3x3 convolution of a batch of ONE image takes another algorithm
than the same image inside a larger batch (outputs differ by ~1e-6), and a batched matmul of B=3 differs from
B=37 with 2 threads; with the same shapes, results are independent of an image's position in the batch and of
the thread count; a channels-last batch and the same batch in NCHW memory differ by 1 ulp. Rule: every forward
of the scan has exactly `batch_size` images (the loader's per-rank batch) in the loader's memory format; a short
last batch is padded (same format) by repeating its last image, and the padding's results are dropped. The per-rank
push batch must therefore be the same for every world size (a setting of its own, not global batch / W). On GPU
the same rule needs deterministic kernels (cudnn.benchmark off): cuDNN's timed algorithm choice may differ
between processes.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, NamedTuple

import torch
import torch.distributed as torch_dist
from torch import nn

from qpm_dist import dist
from qpm_dist.engine.preemption import stop_point
from qpm_dist.models.protonet import PrototypeHead, nearest_cells
from qpm_dist.utils import log, progress

EMPTY = torch.iinfo(torch.int64).max  # the sample index of an empty candidate slot (sorts after every real one)

Autocast = Callable[[], contextlib.AbstractContextManager]


def lexsort(*keys: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Indices sorting along `dim` by keys[0], ties by keys[1], ... (stable sorts from the last key)."""
    order = torch.arange(keys[0].shape[dim], device=keys[0].device).expand_as(keys[0]).contiguous()
    for key in reversed(keys):
        order = order.gather(dim, torch.sort(key.gather(dim, order), dim=dim, stable=True).indices)
    return order


class PatchCandidates:
    """One rank's best `keep` candidate patches per prototype, sorted by (distance, sample): P x keep tensors
    (`distances` fp32, +inf where empty; `samples` int64, EMPTY where empty; `cells` int64 flat h * Wz + w) and
    P x keep x D `vectors`. Its size does not depend on how many images were added."""

    def __init__(self, num_prototypes: int, keep: int, dim: int, device: torch.device | str = "cpu") -> None:
        self.keep = keep
        self.distances = torch.full((num_prototypes, keep), math.inf, device=device)
        self.samples = torch.full((num_prototypes, keep), EMPTY, dtype=torch.long, device=device)
        self.cells = torch.zeros((num_prototypes, keep), dtype=torch.long, device=device)
        self.vectors = torch.zeros((num_prototypes, keep, dim), device=device)

    def add(self, prototypes: torch.Tensor, distances: torch.Tensor, samples: torch.Tensor, cells: torch.Tensor,
            vectors: torch.Tensor) -> None:
        """Merge N new candidates (prototype index, distance, sample, cell: N each; vectors N x D): every prototype
        touched keeps its `keep` best of old and new by (distance, sample, cell). A (prototype, sample) pair seen
        twice (data.on_corrupt=skip serves a readable image in place of a broken one) is kept once."""
        touched = torch.unique(prototypes)  # sorted
        k = self.keep
        all_p = torch.cat([touched.repeat_interleave(k), prototypes])
        all_d = torch.cat([self.distances[touched].flatten(), distances.float()])
        all_s = torch.cat([self.samples[touched].flatten(), samples])
        all_c = torch.cat([self.cells[touched].flatten(), cells])
        order = lexsort(all_p, all_d, all_s, all_c)
        p, s = all_p[order], all_s[order]
        repeated = torch.zeros_like(p, dtype=torch.bool)
        repeated[1:] = (p[1:] == p[:-1]) & (s[1:] == s[:-1]) & (s[1:] != EMPTY)
        order = order[~repeated]  # each group still has >= k entries: its old k are distinct samples or EMPTY
        starts = torch.searchsorted(all_p[order], touched)
        chosen = order[starts[:, None] + torch.arange(k, device=starts.device)]  # T x k
        all_v = torch.cat([self.vectors[touched].reshape(-1, self.vectors.shape[2]), vectors.float()])
        self.distances[touched] = all_d[chosen]
        self.samples[touched] = all_s[chosen]
        self.cells[touched] = all_c[chosen]
        self.vectors[touched] = all_v[chosen]


@torch.no_grad()
def scan(model: nn.Module, loader: Iterable, batch_size: int, device: torch.device | str = "cpu",
         autocast: Autocast = contextlib.nullcontext, desc: str = "") -> tuple[PatchCandidates, tuple[int, int]]:
    """This rank's candidates over `loader` (batches of images, labels, global sample indices, at most
    `batch_size` images; the model in eval mode for the pass). Returns them and the latent grid (Hz, Wz)."""
    head = model.head
    if not isinstance(head, PrototypeHead):
        raise ValueError(f"push: the model's head is {type(head).__name__}, expected a PrototypeHead")
    if batch_size < 1:
        raise ValueError(f"push: batch_size must be positive, got {batch_size}")
    m, num_classes = head.per_class, head.num_classes
    candidates = PatchCandidates(head.num_prototypes, m, head.dim, device)
    grid = (0, 0)
    was_training = model.training
    model.eval()
    total = len(loader) if hasattr(loader, "__len__") else None
    bar = progress(total, desc, show=dist.is_main() and bool(desc))
    try:
        for batch in loader:
            stop_point()
            if len(batch) < 3:
                raise ValueError("push: the loader must yield (images, labels, sample indices); build it with "
                                 "eval_loader(..., return_index=True)")
            images, labels, samples = batch[0], batch[1].to(device).long(), batch[2].to(device).long()
            n = images.shape[0]
            if n > batch_size:
                raise ValueError(f"push: a batch of {n} images exceeds the push batch size {batch_size}")
            if n == 0:
                continue
            if labels.min() < 0 or labels.max() >= num_classes:
                raise ValueError(f"push: labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}")
            pad = batch_size - n  # same shapes in every forward: an image's distances do not depend on its batch
            images = padded_batch(images, batch_size)
            padded_labels = torch.cat([labels, labels[-1:].expand(pad)]) if pad else labels
            with autocast():
                latent = head.latent(model.backbone(images.to(device)))
            distances = head.own_class_distances(latent, padded_labels)[:n]  # n x M x Hz x Wz, fp32
            latent = latent[:n].float()
            grid = tuple(latent.shape[2:])
            best, cells = nearest_cells(distances)  # n x M
            if not torch.isfinite(best).all():
                bad = int(samples[(~torch.isfinite(best)).any(dim=1)][0])
                raise FloatingPointError(f"push: training sample {bad} has a non-finite distance to its class's "
                                         f"prototypes: the model produced non-finite latent features")
            vectors = latent.flatten(2).gather(2, cells[:, None, :].expand(-1, head.dim, -1)).transpose(1, 2)
            prototypes = labels[:, None] * m + torch.arange(m, device=device)
            candidates.add(prototypes.flatten(), best.flatten(), samples.repeat_interleave(m), cells.flatten(),
                           vectors.reshape(n * m, head.dim))
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    return candidates, grid


def padded_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """`images` and copies of its last image up to `size` images, in the same memory format: every forward then has
    the same shape (an image's distances do not depend on its batch), and a loader's channels-last batch
    (data.loaders.collate) stays channels-last, or the convolutions take another algorithm (1 ulp apart)."""
    if images.shape[0] == size:
        return images
    channels_last = images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last)
    padded = torch.empty((size, *images.shape[1:]), dtype=images.dtype, device=images.device,
                         memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    padded[:images.shape[0]] = images
    padded[images.shape[0]:] = images[-1:]
    return padded


def gather_candidates(candidates: PatchCandidates) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's (distances, samples, cells), each W x P x M on the CPU, in rank order (one all_gather each)."""
    parts = (candidates.distances, candidates.samples, candidates.cells)
    if not dist.is_distributed():
        return tuple(t[None].cpu() for t in parts)
    out = []
    for tensor in parts:
        gathered = [torch.empty_like(tensor) for _ in range(dist.world_size())]
        torch_dist.all_gather(gathered, tensor.contiguous())
        out.append(torch.stack(gathered).cpu())
    return tuple(out)


class Assignment(NamedTuple):
    """Per prototype (P each; -1 where no patch was found): the rank and slot holding the winning candidate,
    its global sample index, flat cell and distance (NaN where none)."""

    rank: torch.Tensor
    slot: torch.Tensor
    sample: torch.Tensor
    cell: torch.Tensor
    distance: torch.Tensor


def assign(distances: torch.Tensor, samples: torch.Tensor, cells: torch.Tensor) -> Assignment:
    """The greedy unique assignment on gathered W x P x M candidates (see the module docstring): all candidates
    in ascending (distance, sample, cell, prototype, rank, slot) order; a prototype takes its first candidate
    whose sample is unused. Pure and deterministic: every rank computes the same result from the same input.
    Cost: a sort and a Python pass over the W x P x M candidates (6.4 M at ImageNet's P = 10^4, M = 10, W = 64)."""
    world, num_prototypes, keep = distances.shape
    proto = torch.arange(num_prototypes)[None, :, None].expand(world, -1, keep).flatten()
    rank = torch.arange(world)[:, None, None].expand(-1, num_prototypes, keep).flatten()
    slot = torch.arange(keep)[None, None, :].expand(world, num_prototypes, -1).flatten()
    d, s, c = distances.flatten(), samples.flatten(), cells.flatten()
    real = s != EMPTY
    d, s, c, proto, rank, slot = d[real], s[real], c[real], proto[real], rank[real], slot[real]
    order = lexsort(d, s, c, proto, rank, slot)
    winner = [-1] * num_prototypes  # position in `order`'s input of each prototype's winning candidate
    used: set[int] = set()
    taken = 0
    for i, j, sample in zip(order.tolist(), proto[order].tolist(), s[order].tolist()):
        if winner[j] >= 0 or sample in used:
            continue
        used.add(sample)
        winner[j] = i
        taken += 1
        if taken == num_prototypes:
            break
    won = torch.tensor(winner, dtype=torch.long)
    found = won >= 0
    if d.numel() == 0:  # no candidate at all (no training image on any rank)
        d, s, c, rank, slot = (torch.zeros(1, dtype=t.dtype) for t in (d, s, c, rank, slot))
    pick = won.clamp_min(0)
    none = torch.tensor(-1)
    out = Assignment(*(torch.where(found, values[pick], none) for values in (rank, slot, s, c)),
                     torch.where(found, d[pick], torch.tensor(math.nan)))
    return out


def share_vectors(candidates: PatchCandidates, assignment: Assignment) -> torch.Tensor:
    """P x D on every rank: the winners' latent vectors (rows of prototypes without a winner are NaN). Each rank
    broadcasts the vectors it holds, in rank order, so the values are bitwise the owner's."""
    num_prototypes, _, dim = candidates.vectors.shape
    vectors = torch.full((num_prototypes, dim), math.nan, device=candidates.vectors.device)
    me = dist.rank()
    for owner in range(dist.world_size()):
        ids = torch.nonzero(assignment.rank == owner).flatten()
        if ids.numel() == 0:
            continue
        ids_dev = ids.to(vectors.device)
        if owner == me:
            rows = candidates.vectors[ids_dev, assignment.slot[ids].to(vectors.device)].contiguous()
        else:
            rows = torch.empty((ids.numel(), dim), device=vectors.device)
        if dist.is_distributed():
            torch_dist.broadcast(rows, src=owner)
        vectors[ids_dev] = rows
    return vectors


class PushRecord(NamedTuple):
    """What a push did, per prototype (P each, on the CPU)."""

    sample: torch.Tensor  # global index of the training image the prototype now comes from; -1: kept
    cell: torch.Tensor  # P x 2 (h, w) of the latent cell; -1: kept
    distance: torch.Tensor  # the scan's distance of the old prototype to that cell; NaN: kept
    updated: torch.Tensor  # bool: False where no eligible patch existed and the previous vector was kept
    candidate_shapes: dict  # the per-rank buffers' shapes (they do not depend on the dataset's size)

    @property
    def kept(self) -> list[int]:
        return torch.nonzero(~self.updated).flatten().tolist()

    def summary(self) -> dict:
        """JSON-ready lists per prototype (a stage record, the report): sample, [h, w], distance (None: kept)."""
        return {"pushed": int(self.updated.sum()), "kept": self.kept, "sample": self.sample.tolist(),
                "cell": self.cell.tolist(),
                "distance": [None if math.isnan(d) else d for d in self.distance.tolist()]}


def push_prototypes(model: nn.Module, loader: Iterable, batch_size: int, device: torch.device | str = "cpu",
                    autocast: Autocast = contextlib.nullcontext, desc: str = "push") -> PushRecord:
    """Project every prototype of `model` (a Classifier with a PrototypeHead, the bare module, not a DDP or
    DeepSpeed wrapper) onto its nearest training patch; call on every rank with this rank's shard as `loader`
    (`data.eval_loader("train", batch_size, rank, world_size, return_index=True)`) and the same `batch_size`
    everywhere (see the module docstring). Writes the new prototypes and `source_sample` / `source_cell` into
    the head on every rank and returns the record."""
    head: PrototypeHead = model.head
    candidates, grid = scan(model, loader, batch_size, device, autocast, desc)
    grid = tuple(max(g) for g in zip(*dist.all_gather_object(grid)))  # a rank with no images saw no grid
    assignment = assign(*gather_candidates(candidates))
    vectors = share_vectors(candidates, assignment)
    updated = assignment.sample >= 0
    ids = torch.nonzero(updated).flatten()
    with torch.no_grad():
        ids_dev = ids.to(head.prototypes.device)
        head.prototypes[ids_dev] = vectors[ids.to(vectors.device)].to(head.prototypes.device, head.prototypes.dtype)
        head.source_sample[ids_dev] = assignment.sample[ids].to(head.source_sample.device)
        head.source_cell[ids_dev] = assignment.cell[ids].to(head.source_cell.device)
    width = max(grid[1], 1)
    cell = torch.stack([assignment.cell // width, assignment.cell % width], dim=1)
    cell[~updated] = -1
    record = PushRecord(assignment.sample, cell, assignment.distance, updated,
                        {"distances": tuple(candidates.distances.shape), "samples": tuple(candidates.samples.shape),
                         "cells": tuple(candidates.cells.shape), "vectors": tuple(candidates.vectors.shape)})
    if record.kept:
        kept = record.kept
        log.warning("push: %d of %d prototypes found no training image of their class left (kept their previous "
                    "vectors): %s%s", len(kept), head.num_prototypes, kept[:20], " ..." if len(kept) > 20 else "")
    return record
