"""The text IP head of IIS: Label-free-CBM concepts on a frozen representation (specs/iis.md §3.4, §2.7).

Given representations x (N x D) of the training images with labels, image embeddings Ê_img (N x E) and text
embeddings of M concepts Ê_txt (M x E) from one text/image encoder, both L2-normalised:

1. P = Ê_img Ê_txtᵀ (N x M), the encoder's cosine score of every image for every concept. It is never built for
   all N at once: every use below computes it for a block of rows (`max_elements` bounds a block's size).
2. Activation filter: keep concept j when the mean of the 5 largest P[:, j] over the training rows exceeds
   `clip_cutoff` (0.25), i.e. the encoder finds at least a few images that show it.
3. Projection W_c (M' x D, no bias) trained so that every column of x W_cᵀ matches the same column of P under
   the cos-cubed similarity (`cos_cubed`): Adam, at most `proj_steps` steps of `proj_batch` random rows of the
   fit part; after the first step, then every `check_every` steps and after the last, the loss on the held-out
   part; training stops at the first check that does not improve and the best W_c is kept (the reference's
   rule). The reference's HEAD minimised the *similarity* of a distance (`-mean_cubic_loss`), i.e. pushed W_c to
   anti-correlate with the encoder (spec bug 5); the loss here is -mean(cos_cubed), maximising the similarity,
   as in LF-CBM and the reference's first commit.
4. Interpretability filter: keep concepts whose held-out cos-cubed similarity exceeds
   `interpretability_cutoff` (0.45): the representation must actually predict what the concept name means.
5. c = W_c x, standardised per concept with the mean and unbiased std of the training (fit) rows.
6. The final layer g = Linear(M'' -> C) on S_s(c), trained per (ratio s, lr) grid point (`train_text_head`).

Deviations from the reference, each for a reason:
- Model selection (the early stop of 3, the best epoch of 6) uses a held-out part of the TRAINING rows
  (`holdout_fraction`), never the split the accuracy is reported on (the reference selected on its test split,
  spec §7, bug 13).
- The final layer is trained with minibatch Adam and an exponential lr decay, like the prototype heads (§3.2),
  not with GLM-SAGA (spec §7). In sparsity-ratio mode the reference multiplies SAGA's elastic-net proximal step
  by 0, so it is plain SAGA on cross-entropy: S_s masks fixed inputs, the objective is the same convex one, and
  SAGA's per-example table (N x C floats, 5.1 GB on ImageNet) is not needed. The two optimisers differ in path
  and stopping rule (SAGA: update norm <= 1e-4; here: the best of `epochs` epochs on the held-out rows), so
  accuracies agree with the reference's only to optimisation tolerance. Weight-sparse LF-CBM (the flag off) is
  not offered: IIS does not use it.
- The projection's random batch is capped so that a batch of P holds at most `max_elements` floats (the
  reference draws 50,000 rows: 950 MB of P for 4,751 concepts); the cap is in the record.

Memory: every pass reads x, Ê_img in blocks of rows, so per-process memory is O(block x (D + E + M)) plus the
parameters, whatever N is. The inputs may be torch tensors or numpy arrays, memory-mapped fp16 shards included
(rows are read by index, converted to float32 block by block); `StackedRows` reads several shards as one.

What is real and what is a test device (docs for issue 17 item 5): the procedure above is the reference's, run
for real on whatever embeddings it is given. Real embeddings come from CLIP (`text_encoders.load_clip`, the
user's local weights) for both sides, or from all-MiniLM-L6-v2 (`text_encoders.load_minilm`) for the text side.
MiniLM has no image tower, so its image side must be made: `class_name_image_embeddings` gives every image the
MiniLM embedding of its class name (a real, label-level alignment: concept targets are per class, not per
image), and `planted_image_embeddings` (normalise(A x + noise), spec §6) is a TEST DEVICE whose planted truth A
lets a test check that W_c recovers known concept directions; it says nothing about a real backbone.
"""

from __future__ import annotations

import copy
import json
import math
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from qpm_dist.errors import BadInput, MissingInput
from qpm_dist.iis.sparsity import COUNTS, sparsify
from qpm_dist.utils import atomic_open

Rows = Union[torch.Tensor, np.ndarray, "StackedRows"]  # N x D, indexable by rows (np.memmap shards included)


class NoConceptsLeft(BadInput, ValueError):
    """A concept filter dropped every concept; the message names the filter, its cut-off and the best score."""


@dataclass(frozen=True)
class TextHeadConfig:
    """Settings of the text IP head; defaults are the reference's (spec §3.4) unless the comment says otherwise."""

    clip_cutoff: float = 0.25
    interpretability_cutoff: float = 0.45
    top_k: int = 5  # the activation filter's "5 largest"
    proj_steps: int = 1000
    proj_batch: int = 50_000
    proj_lr: float = 1e-3
    check_every: int = 50
    holdout_fraction: float = 0.1  # ours: selection on held-out training rows, not the reported split
    max_holdout: int = 50_000  # ours: bounds the held-out passes (the reference used its whole val split)
    epochs: int = 30  # final layer: the prototype heads' schedule (§3.2), not SAGA's 1000 epochs
    batch_size: int = 256  # the reference's SAGA minibatch
    lr_decay: float = 0.99  # ExponentialLR per epoch, as §3.2
    max_elements: int = 1 << 24  # ours: largest block of P (or of activations) held at once, in floats
    sparsity_count: str = "exact"  # S_s's count (sparsity.COUNTS): "reference" keeps one fewer, as the reference
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "clip_cutoff": -1.0 <= self.clip_cutoff <= 1.0,
            "interpretability_cutoff": -1.0 <= self.interpretability_cutoff <= 1.0,
            "top_k": self.top_k >= 1,
            "proj_steps": self.proj_steps >= 1,
            "proj_batch": self.proj_batch >= 2,
            "proj_lr": self.proj_lr > 0,
            "check_every": self.check_every >= 1,
            "holdout_fraction": 0.0 < self.holdout_fraction < 1.0,
            "max_holdout": self.max_holdout >= 2,
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr_decay": 0.0 < self.lr_decay <= 1.0,
            "max_elements": self.max_elements >= 1024,
            "sparsity_count": self.sparsity_count in COUNTS,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise BadInput(f"text head setting {bad[0]} = {getattr(self, bad[0])!r}: out of range")


# --------------------------------------------------------------------------------------------------------------
# The similarity and the filters


def cos_cubed(target: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """LF-CBM's similarity per column of two N x M matrices, in [-1, 1]: centre each column, cube it elementwise,
    L2-normalise, dot product. Cubing stresses the images that show a concept most (the tail of P).
    A constant column has similarity 0 (the reference divides by 0 there)."""
    a = (target - target.mean(dim=0, keepdim=True)) ** 3
    b = (output - output.mean(dim=0, keepdim=True)) ** 3
    return (a * b).sum(dim=0) / (a.norm(dim=0) * b.norm(dim=0)).clamp_min(torch.finfo(a.dtype).tiny)


def top_k_mean(scores: Iterator[torch.Tensor], k: int) -> torch.Tensor:
    """Per column, the mean of the k largest values over all rows of the blocks `scores` (each B x M), kept as a
    running top-k so memory does not grow with the number of rows."""
    best: torch.Tensor | None = None
    for block in scores:
        both = block if best is None else torch.cat([best, block])
        best = both.topk(min(k, both.shape[0]), dim=0).values
    if best is None:
        raise BadInput("activation filter: no rows; expected at least one training image")
    return best.mean(dim=0)


def activation_filter(top_means: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Indices of the concepts whose top-k mean of P exceeds `cutoff` (strictly, as the reference)."""
    keep = (top_means > cutoff).nonzero().flatten()
    if keep.numel() == 0:
        raise NoConceptsLeft(f"activation filter: no concept has a top-k mean of P above clip_cutoff {cutoff} "
                             f"(best {top_means.max().item():.4f}); expected the encoder to find at least a few "
                             f"images for some concept (lower clip_cutoff or check the embeddings)")
    return keep


def interpretability_filter(similarity: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Indices of the concepts whose held-out cos-cubed similarity exceeds `cutoff` (strictly, as the reference)."""
    keep = (similarity > cutoff).nonzero().flatten()
    if keep.numel() == 0:
        raise NoConceptsLeft(f"interpretability filter: no concept has a held-out similarity above "
                             f"interpretability_cutoff {cutoff} (best {similarity.max().item():.4f}); expected the "
                             f"representation to predict some concept")
    return keep


# --------------------------------------------------------------------------------------------------------------
# Reading rows in blocks


class StackedRows:
    """Several row arrays with one width (e.g. the per-rank memory-mapped fp16 shards of a split, in rank order)
    read as one N x D array: indexing by a slice or by sorted row indices copies only the rows asked for."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        if not parts or len({p.shape[1:] for p in parts}) != 1 or parts[0].ndim != 2:
            raise BadInput(f"stacked rows: parts of shapes {[tuple(p.shape) for p in parts]}; expected at least one "
                           f"N_i x D array, all of one width D")
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [p.shape[0] for p in parts])
        self.shape = (int(self.starts[-1]), int(parts[0].shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: np.ndarray | slice) -> np.ndarray:
        rows = np.arange(self.shape[0])[index] if isinstance(index, slice) else np.asarray(index)
        part_of = np.searchsorted(self.starts, rows, side="right") - 1
        pieces = [self.parts[p][rows[part_of == p] - self.starts[p]] for p in np.unique(part_of)]
        return np.concatenate(pieces) if pieces else np.empty((0, self.shape[1]), dtype=self.parts[0].dtype)


def _read(a: Rows, index: np.ndarray | slice) -> torch.Tensor:
    """Rows of `a` as a float32 tensor (a block: a copy, never a view into a memory map)."""
    if isinstance(a, torch.Tensor):
        return a[torch.as_tensor(index) if isinstance(index, np.ndarray) else index].float()
    return torch.from_numpy(np.asarray(a[index], dtype=np.float32))


def _blocks(rows: np.ndarray, width: int, max_elements: int) -> Iterator[np.ndarray]:
    """`rows` (sorted indices) in consecutive blocks small enough that block x width floats fit `max_elements`."""
    size = max(1, max_elements // max(width, 1))
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def _scores(image_emb: Rows, text_emb: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    """P for the rows `index`: cosine of L2-normalised image and text embeddings."""
    return F.normalize(_read(image_emb, index), dim=1) @ text_emb.T


def _check_inputs(x: Rows, labels: torch.Tensor | np.ndarray, image_emb: Rows, text_emb: torch.Tensor) -> None:
    n = x.shape[0]
    if len(x.shape) != 2 or len(image_emb.shape) != 2 or text_emb.dim() != 2:
        raise BadInput(f"text head: representations {tuple(x.shape)}, image embeddings {tuple(image_emb.shape)}, "
                       f"text embeddings {tuple(text_emb.shape)}; expected N x D, N x E and M x E")
    if image_emb.shape[0] != n or len(labels) != n:
        raise BadInput(f"text head: {n} representations, {image_emb.shape[0]} image embeddings, {len(labels)} "
                       f"labels; expected one of each per training image")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise BadInput(f"text head: image embeddings of width {image_emb.shape[1]}, text embeddings of width "
                       f"{text_emb.shape[1]}; expected one encoder's space (the same width)")
    if n < 4:
        raise BadInput(f"text head: {n} training images; expected at least 4 (a fit part and a held-out part)")


# --------------------------------------------------------------------------------------------------------------
# The concept space: steps 1-5, once per backbone and concept list


@dataclass
class ConceptSpace:
    """The text concept bottleneck of one backbone: c = (x W_cᵀ - mean) / std, over the concepts that passed both
    filters. Steps 1-5 of the module docstring; the (ratio, lr) grid of `train_text_head` reuses it."""

    projection: torch.Tensor  # M'' x D, W_c
    mean: torch.Tensor  # M''
    std: torch.Tensor  # M''
    concepts: list[int]  # indices into the caller's concept list, of the M'' concepts kept
    fit_rows: np.ndarray  # training rows the layers are fitted on
    holdout_rows: np.ndarray  # training rows used for selection
    info: dict = field(default_factory=dict)  # counts and projection-training facts for the record

    def activations(self, x_rows: torch.Tensor) -> torch.Tensor:
        """Standardised concept activations of a block of representations (B x D -> B x M'')."""
        return (x_rows @ self.projection.T - self.mean) / self.std

    def save(self, path: str | Path) -> None:
        """One .npz file, written atomically: a rerun overwrites it whole. The caller names it (the reference named
        its output folder by the minute and crashed on a second run within that minute, spec bug 18)."""
        arrays = {"projection": self.projection.numpy(), "mean": self.mean.numpy(), "std": self.std.numpy(),
                  "concepts": np.asarray(self.concepts, dtype=np.int64), "fit_rows": self.fit_rows,
                  "holdout_rows": self.holdout_rows, "info": np.asarray(json.dumps(self.info))}
        with atomic_open(Path(path)) as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "ConceptSpace":
        """The space `save` wrote; a damaged or inconsistent file stops with one line naming it."""
        path = Path(path)
        if not path.is_file():
            raise MissingInput(f"text concept space {path}: not found")
        try:
            with np.load(path, allow_pickle=False) as z:
                a = {k: z[k] for k in z.files}
            space = cls(torch.from_numpy(a["projection"]), torch.from_numpy(a["mean"]), torch.from_numpy(a["std"]),
                        a["concepts"].tolist(), a["fit_rows"], a["holdout_rows"], json.loads(str(a["info"])))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
            raise BadInput(f"text concept space {path}: unreadable ({type(e).__name__}: {e})") from None
        m = space.projection.shape[0]
        if space.projection.dim() != 2 or space.mean.shape != (m,) or space.std.shape != (m,) or len(
                space.concepts) != m or not bool((space.std > 0).all()):
            raise BadInput(f"text concept space {path}: projection {tuple(space.projection.shape)}, mean "
                           f"{tuple(space.mean.shape)}, std {tuple(space.std.shape)}, {len(space.concepts)} concepts; "
                           f"expected M x D, M, M (positive) and M")
        return space


def split_rows(n: int, cfg: TextHeadConfig) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of the training rows into a fit part and a held-out part (sorted indices of each)."""
    order = np.random.default_rng(cfg.seed).permutation(n)
    held = min(max(2, round(n * cfg.holdout_fraction)), cfg.max_holdout, n - 2)
    return np.sort(order[held:]), np.sort(order[:held])


def fit_concept_space(x: Rows, labels: torch.Tensor | np.ndarray, image_emb: Rows, text_emb: torch.Tensor,
                      cfg: TextHeadConfig = TextHeadConfig()) -> ConceptSpace:
    """Steps 1-5: activation filter, cos-cubed projection W_c with held-out early stop, interpretability filter,
    standardisation. `x` N x D and `image_emb` N x E are the training rows; `text_emb` M x E."""
    text_emb = F.normalize(text_emb.float(), dim=1)
    _check_inputs(x, labels, image_emb, text_emb)
    n, d = x.shape
    fit, held = split_rows(n, cfg)
    all_rows = np.arange(n)

    width = text_emb.shape[0] + text_emb.shape[1]  # a block holds image embeddings (E) and P (M) per row
    tops = top_k_mean((_scores(image_emb, text_emb, b) for b in _blocks(all_rows, width, cfg.max_elements)),
                      cfg.top_k)
    active = activation_filter(tops, cfg.clip_cutoff)
    text_active = text_emb[active]

    generator = torch.Generator().manual_seed(cfg.seed)
    projection = torch.nn.Linear(d, len(active), bias=False)
    with torch.no_grad():  # nn.Linear's default init U(±1/√D), as the reference, but from the seeded generator
        projection.weight.uniform_(-1 / math.sqrt(d), 1 / math.sqrt(d), generator=generator)
    optimizer = torch.optim.Adam(projection.parameters(), lr=cfg.proj_lr)
    batch = min(cfg.proj_batch, len(fit), max(2, cfg.max_elements // (2 * len(active) + d + text_emb.shape[1])))
    best_loss, best_weight, steps = math.inf, projection.weight.detach().clone(), 0
    for step in range(cfg.proj_steps):
        index = np.sort(fit[torch.randperm(len(fit), generator=generator)[:batch].numpy()])
        loss = -cos_cubed(_scores(image_emb, text_active, index), projection(_read(x, index))).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps = step + 1
        if step % cfg.check_every == 0 or steps == cfg.proj_steps:  # after steps 1, 1 + k, 1 + 2k, ... and the last
            held_loss = -heldout_similarity(x, image_emb, text_active, projection.weight.detach(), held,
                                            cfg.max_elements).mean().item()
            if held_loss >= best_loss:
                break
            best_loss, best_weight = held_loss, projection.weight.detach().clone()

    similarity = heldout_similarity(x, image_emb, text_active, best_weight, held, cfg.max_elements)
    interpretable = interpretability_filter(similarity, cfg.interpretability_cutoff)
    weight = best_weight[interpretable]
    mean, std = _train_stats(x, weight, fit, cfg.max_elements)
    kept = active[interpretable]
    info = {"concepts_given": int(text_emb.shape[0]), "concepts_active": int(len(active)),
            "concepts_kept": int(len(kept)), "projection_steps": steps, "projection_batch": int(batch),
            "projection_heldout_similarity": float(-best_loss), "fit_rows": int(len(fit)),
            "holdout_rows": int(len(held))}
    return ConceptSpace(weight, mean, std, kept.tolist(), fit, held, info)


def heldout_similarity(x: Rows, image_emb: Rows, text_emb: torch.Tensor, weight: torch.Tensor, rows: np.ndarray,
                       max_elements: int) -> torch.Tensor:
    """cos_cubed(P[rows], x[rows] W_cᵀ) per concept, computed in blocks of rows: a first pass for the column means,
    a second for the three sums (Σ a³b³, Σ a⁶, Σ b⁶ of the centred columns), in float64."""
    blocks = list(_blocks(rows, 2 * weight.shape[0] + weight.shape[1] + text_emb.shape[1], max_elements))
    with torch.no_grad():
        sum_p = torch.zeros(weight.shape[0], dtype=torch.float64)
        sum_o = torch.zeros_like(sum_p)
        for b in blocks:
            sum_p += _scores(image_emb, text_emb, b).sum(0, dtype=torch.float64)
            sum_o += (_read(x, b) @ weight.T).sum(0, dtype=torch.float64)
        mean_p, mean_o = sum_p / len(rows), sum_o / len(rows)
        dot = torch.zeros_like(sum_p)
        norm_p = torch.zeros_like(sum_p)
        norm_o = torch.zeros_like(sum_p)
        for b in blocks:
            a = (_scores(image_emb, text_emb, b).double() - mean_p) ** 3
            o = ((_read(x, b) @ weight.T).double() - mean_o) ** 3
            dot += (a * o).sum(0)
            norm_p += (a * a).sum(0)
            norm_o += (o * o).sum(0)
        return (dot / (norm_p.sqrt() * norm_o.sqrt()).clamp_min(1e-300)).float()


def _train_stats(x: Rows, weight: torch.Tensor, rows: np.ndarray, max_elements: int) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """Mean and unbiased std of x W_cᵀ over `rows` (float64 sums, in blocks). A constant concept gets std 1."""
    total = torch.zeros(weight.shape[0], dtype=torch.float64)
    squares = torch.zeros_like(total)
    with torch.no_grad():
        for b in _blocks(rows, weight.shape[0] + weight.shape[1], max_elements):
            c = (_read(x, b) @ weight.T).double()
            total += c.sum(0)
            squares += (c * c).sum(0)
    n = len(rows)
    mean = total / n
    var = ((squares - n * mean * mean) / max(n - 1, 1)).clamp_min(0.0)
    std = var.sqrt()
    return mean.float(), torch.where(std > 0, std, torch.ones_like(std)).float()


# --------------------------------------------------------------------------------------------------------------
# The final layer: step 6, one (ratio, lr) grid point


def train_text_head(space: ConceptSpace, x: Rows, labels: torch.Tensor | np.ndarray, x_test: Rows,
                    test_labels: torch.Tensor | np.ndarray, num_classes: int, ratio: float, lr: float,
                    cfg: TextHeadConfig = TextHeadConfig()) -> dict:
    """Fit g = Linear(M'' -> C) (zero init, bias) on S_s(c) of the fit rows with minibatch Adam; keep the epoch
    with the best held-out accuracy; return the IIS grid record {"library": "text", "ratio", "lr", "accuracy"
    (top-1 on x_test, a fraction), ...} with the concept counts of `space`."""
    if not (0.0 <= ratio <= 1.0 and lr > 0):
        raise BadInput(f"text head: ratio {ratio}, lr {lr}; expected a ratio in [0, 1] and a positive lr")
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    test_labels_t = torch.as_tensor(np.asarray(test_labels), dtype=torch.long)
    for name, t in (("labels", labels_t), ("test labels", test_labels_t)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise BadInput(f"text head: {name} in [{int(t.min())}, {int(t.max())}]; expected 0..{num_classes - 1}")
    if x_test.shape[0] != len(test_labels_t) or x_test.shape[1] != space.projection.shape[1]:
        raise BadInput(f"text head: test representations {tuple(x_test.shape)} with {len(test_labels_t)} labels; "
                       f"expected one label per row and width {space.projection.shape[1]}")
    generator = torch.Generator().manual_seed(cfg.seed)
    layer = torch.nn.Linear(len(space.concepts), num_classes)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.lr_decay)
    batch = max(1, min(cfg.batch_size, cfg.max_elements // (len(space.concepts) + x.shape[1])))
    best_acc, best_state, best_epoch = -1.0, copy.deepcopy(layer.state_dict()), 0
    for epoch in range(cfg.epochs):
        order = space.fit_rows[torch.randperm(len(space.fit_rows), generator=generator).numpy()]
        for start in range(0, len(order), batch):
            index = np.sort(order[start:start + batch])
            logits = layer(sparsify(space.activations(_read(x, index)), ratio, cfg.sparsity_count))
            loss = F.cross_entropy(logits, labels_t[torch.as_tensor(index)])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
        acc = _accuracy(space, layer, x, labels_t, space.holdout_rows, ratio, cfg)
        if acc > best_acc:
            best_acc, best_state, best_epoch = acc, copy.deepcopy(layer.state_dict()), epoch + 1
    layer.load_state_dict(best_state)
    test_acc = _accuracy(space, layer, x_test, test_labels_t, np.arange(x_test.shape[0]), ratio, cfg)
    return {"library": "text", "ratio": ratio, "lr": lr, "accuracy": test_acc, "heldout_accuracy": best_acc,
            "best_epoch": best_epoch, "sparsity_count": cfg.sparsity_count, **space.info}


def text_head_grid(space: ConceptSpace, x: Rows, labels: torch.Tensor | np.ndarray, x_test: Rows,
                   test_labels: torch.Tensor | np.ndarray, num_classes: int, ratios: Sequence[float],
                   lrs: Sequence[float], cfg: TextHeadConfig = TextHeadConfig()) -> list[dict]:
    """`train_text_head` for every (ratio, lr), in that order, in one process (small data); at scale every grid
    point is an independent job on the saved `ConceptSpace`. Ratios are explicit values: the reference's script
    passed its ratio flag without a value and so always ran s = 0 (spec bug 7)."""
    if not ratios or not lrs:
        raise BadInput(f"text head grid: {len(ratios)} ratios and {len(lrs)} lrs; expected at least one of each")
    return [train_text_head(space, x, labels, x_test, test_labels, num_classes, s, lr, cfg)
            for s in ratios for lr in lrs]


def _accuracy(space: ConceptSpace, layer: torch.nn.Linear, x: Rows, labels: torch.Tensor, rows: np.ndarray,
              ratio: float, cfg: TextHeadConfig) -> float:
    correct = 0
    with torch.no_grad():
        for b in _blocks(rows, len(space.concepts) + x.shape[1], cfg.max_elements):
            logits = layer(sparsify(space.activations(_read(x, b)), ratio, cfg.sparsity_count))
            correct += int((logits.argmax(1) == labels[torch.as_tensor(b)]).sum())
    return correct / max(len(rows), 1)


# --------------------------------------------------------------------------------------------------------------
# Image sides for an encoder without an image tower (MiniLM)


def class_name_image_embeddings(labels: torch.Tensor | np.ndarray, class_text_emb: torch.Tensor) -> torch.Tensor:
    """Offline MiniLM alignment: every image gets the (normalised) text embedding of its class name, so P[i, j] is
    the encoder's similarity of concept j to the name of image i's class. Real, but label-level: the projection
    then learns per-class concept targets, not per-image ones (what CLIP's image tower would give)."""
    index = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return F.normalize(class_text_emb.float(), dim=1)[index]


def planted_image_embeddings(x: torch.Tensor, mixing: torch.Tensor, noise: float, seed: int = 0) -> torch.Tensor:
    """TEST DEVICE (spec §6): image embeddings normalise(x Aᵀ + noise) in the text space, with a planted A (E x D).
    A concept t then has the known direction Aᵀt in representation space that W_c should recover."""
    generator = torch.Generator().manual_seed(seed)
    clean = x.float() @ mixing.T
    return F.normalize(clean + noise * torch.randn(clean.shape, generator=generator), dim=1)


def record_config(cfg: TextHeadConfig) -> dict:
    """The settings as a JSON-ready dict, for a run's manifest."""
    return asdict(cfg)


__all__ = ("TextHeadConfig", "ConceptSpace", "NoConceptsLeft", "StackedRows", "cos_cubed", "top_k_mean",
           "activation_filter", "interpretability_filter", "split_rows", "fit_concept_space", "heldout_similarity",
           "train_text_head", "text_head_grid", "class_name_image_embeddings", "planted_image_embeddings",
           "record_config")
