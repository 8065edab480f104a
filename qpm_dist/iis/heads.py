"""The heads IIS trains on frozen representations (specs/iis.md §3.2, §3.3), distributed over the shards.

`LinearProbe`     the dense baseline h: Linear(D -> C) with bias; its accuracy is the ARR denominator (§3.2).
`PrototypeHead`   the prototype IP head: z = x P̂ᵀ with frozen L2-normalised prototypes P̂ (K x D, x raw) ->
                  LayerNorm(K) (learnable affine) -> S_s (iis.sparsity) -> Linear(K -> C) with bias (§3.3).
Both Linear layers start from a truncated normal (std 0.02, cut at ±2 as timm's trunc_normal_) with zero bias,
LayerNorm from 1/0, as the reference.

`train_head` trains ONE (library, ratio, lr) job and returns its manifest record (iis.score), so that a SLURM
array can run the grid as independent jobs, or a loop can run it in one process on small data. Training follows
§3.2: Adam (no weight decay), cross-entropy, ExponentialLR(γ = 0.99) stepped once per epoch, 30 epochs, batch
1024, with these changes:
* Epoch selection on a held-out part of the TRAINING representations (`holdout`, chosen by sample index with a
  seeded permutation); the reference selected the best epoch on the split it then reported (bug 13). The
  reported accuracy is the test split's at the selected epoch.
* Distributed: each epoch is one seeded permutation of the training samples (the same on every rank, a function
  of seed and epoch only); step t takes the next `batch_size` of them, and every rank computes the summed loss
  gradient over those that live in ITS shards (Representations.owned_mask; about 1/W of each minibatch). The
  gradient and loss sums are all-reduced in one collective and divided by the minibatch's row count: the average
  over the global minibatch, weighted by rows, so the trajectory is that of one process up to float summation
  order, for any world size (tests/test_iis_representations.py runs 1 and 2 processes). Every rank steps the
  same Adam on the same averaged gradient, so the ranks' heads stay identical without a broadcast.
* Memory per rank: the memory-mapped shards (page cache, shared between the ranks of a node, evictable), one
  minibatch read from them, and flags and int32 indices over the training samples (held-out and own-shard flags,
  1 B each; the training samples and their epoch permutation, 4 B each): ~10 bytes per training image, against the
  2·D bytes per image of the fp16 shards (4096 for D = 2048). Nothing else grows with the dataset: evaluation
  streams `eval_batch_size` rows at a time and keeps counts, not a softmax of the whole split (spec §7).
  Measured (bench/iis_heads_memory.py, D = 512, K = 200, C = 100, one epoch): the process's anonymous memory
  peaked 41.3 MB above its start with 100k training images and 42.7 MB with 400k (+1.4 MB for 4x the images,
  the shards growing from 102 to 410 MB); the rest is the minibatch and the evaluation chunk.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qpm_dist import dist
from qpm_dist.iis.representations import Representations
from qpm_dist.iis.score import DENSE
from qpm_dist.iis.sparsity import COUNTS, kept, reference_kept, sparsify

INIT_STD = 0.02  # §3.2: trunc_normal_(std=0.02), timm's cut-offs at ±2 (absolute)
TOP_K = 5


class LinearProbe(nn.Module):
    """The dense linear probe h on the raw representation (§3.2)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class PrototypeHead(nn.Module):
    """x -> LayerNorm(x P̂ᵀ) -> S_s -> Linear: the prototype IP head (§3.3); P̂ is a frozen buffer."""

    def __init__(self, prototypes: torch.Tensor, num_classes: int, ratio: float, count: str = "exact") -> None:
        super().__init__()
        if prototypes.ndim != 2 or prototypes.shape[0] < 1:
            raise ValueError(f"prototypes: shape {tuple(prototypes.shape)}; expected K x D with K >= 1")
        if count not in COUNTS:
            raise ValueError(f"sparsity count {count!r}: expected one of {', '.join(COUNTS)}")
        kept(prototypes.shape[0], ratio)  # checks the ratio
        self.register_buffer("prototypes", F.normalize(prototypes.float(), dim=1))
        self.ratio, self.count = ratio, count
        self.norm = nn.LayerNorm(prototypes.shape[0])
        self.linear = nn.Linear(prototypes.shape[0], num_classes)

    def concepts(self, x: torch.Tensor) -> torch.Tensor:
        """The sparse concept activations S_s(LayerNorm(x P̂ᵀ)), B x K."""
        return sparsify(self.norm(x @ self.prototypes.T), self.ratio, self.count)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.concepts(x))


@dataclass(frozen=True)
class HeadJob:
    """One job of the grid: library "dense" (iis.score.DENSE, ratio None) is the linear probe, any other name
    a prototype library (its prototypes are passed to train_head)."""

    library: str
    ratio: float | None
    lr: float


def grid(libraries: list[str], ratios: list[float], lrs: list[float]) -> list[HeadJob]:
    """Every job of an IIS sweep in a fixed order (index i = SLURM array task i): for each lr the dense probe,
    then every library at every ratio (spec §3.3's loop order). One ratio grid serves every library (spec §4)."""
    if not lrs or not ratios or not libraries:
        raise ValueError(f"IIS grid: libraries {libraries}, ratios {ratios}, lrs {lrs}; expected each non-empty")
    if DENSE in libraries or len(set(libraries)) != len(libraries):
        raise ValueError(f"IIS grid: libraries {libraries}; expected distinct names other than {DENSE!r}")
    if len(set(ratios)) != len(ratios) or len(set(lrs)) != len(lrs):
        raise ValueError(f"IIS grid: ratios {ratios} and lrs {lrs} must not repeat a value")
    if not all(isinstance(lr, (int, float)) and 0 < lr < math.inf for lr in lrs):
        raise ValueError(f"IIS grid: lrs {lrs}; expected positive numbers")
    for ratio in ratios:
        kept(1, ratio)  # checks 0 <= ratio <= 1
    return [job for lr in lrs for job in (HeadJob(DENSE, None, lr), *(HeadJob(library, ratio, lr)
                                                                      for library in libraries for ratio in ratios))]


@dataclass(frozen=True)
class HeadOptions:
    epochs: int = 30
    batch_size: int = 1024  # the global minibatch (all ranks together)
    gamma: float = 0.99  # ExponentialLR, stepped once per epoch
    holdout: float = 0.1  # share of the training samples held out for epoch selection (bug 13)
    seed: int = 0  # initialisation, hold-out choice and shuffles
    count: str = "exact"  # S_s's kept count: "exact" K − ⌊Ks⌋, "reference" one fewer (iis.sparsity)
    eval_batch_size: int = 4096

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError(f"IIS heads: epochs {self.epochs}, batch_size {self.batch_size}, eval_batch_size "
                             f"{self.eval_batch_size}; expected each >= 1")
        if not 0 < self.holdout < 1 or not 0 < self.gamma <= 1:
            raise ValueError(f"IIS heads: holdout {self.holdout}, gamma {self.gamma}; expected 0 < holdout < 1, "
                             f"0 < gamma <= 1")
        if self.count not in COUNTS:
            raise ValueError(f"IIS heads: count {self.count!r}; expected one of {', '.join(COUNTS)}")


@dataclass
class HeadResult:
    record: dict[str, Any]  # the manifest record (iis.score): library, ratio, lr, accuracy, ...
    state_dict: dict[str, torch.Tensor]  # the head at the selected epoch (CPU)
    history: list[dict[str, float]]  # per epoch: train_loss, selection_accuracy, accuracy, top5


def build_head(job: HeadJob, dim: int, num_classes: int, prototypes: torch.Tensor | None, count: str,
               seed: int) -> nn.Module:
    """The job's head, initialised from `seed` alone (the same on every rank)."""
    if job.library == DENSE:
        if job.ratio is not None:
            raise ValueError(f"IIS job {job}: the dense probe has no sparsity ratio")
        head: nn.Module = LinearProbe(dim, num_classes)
    else:
        if job.ratio is None or prototypes is None:
            raise ValueError(f"IIS job {job}: a prototype head needs a ratio and prototypes")
        if prototypes.shape[1:] != (dim,):
            raise ValueError(f"IIS job {job}: prototypes {tuple(prototypes.shape)} do not live in the "
                             f"representation space (dim {dim})")
        head = PrototypeHead(prototypes, num_classes, job.ratio, count)
    generator = torch.Generator().manual_seed(seed)
    for module in head.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=INIT_STD, a=-2.0, b=2.0, generator=generator)
            nn.init.zeros_(module.bias)
    return head


def split_train(num_rows: int, holdout: float, seed: int) -> np.ndarray:
    """Held-out flags of the training samples: the first round(holdout·N) of a seeded permutation (independent
    of the world size, so every run selects on the same rows)."""
    n_hold = round(holdout * num_rows)
    if not 1 <= n_hold < num_rows:
        raise ValueError(f"IIS heads: holdout {holdout} of {num_rows} training rows holds out {n_hold}; expected at "
                         f"least 1 row held out and 1 to train on")
    flags = np.zeros(num_rows, dtype=bool)
    flags[permutation(num_rows, seed)[:n_hold]] = True
    return flags


def permutation(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of range(n), int32 below 2^31 (half the memory of int64)."""
    dtype = torch.int32 if n < 2**31 else torch.int64
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed), dtype=dtype).numpy()


def train_head(reps: Representations, job: HeadJob, options: HeadOptions = HeadOptions(),
               prototypes: torch.Tensor | None = None, num_classes: int | None = None,
               device: torch.device | str = "cpu") -> HeadResult:
    """Train one job over the representation shards (every rank of the process group calls it) and return its
    manifest record: test top-1 ("accuracy") and top-5 at the epoch with the best held-out top-1 (earliest on
    ties), that held-out accuracy, the epoch, and the lowest epoch-mean training loss."""
    options.check()
    start = time.perf_counter()
    device = torch.device(device)
    num_classes = num_classes or reps.num_classes
    if not num_classes:
        raise ValueError(f"{reps.folder}: the shards do not record num_classes; pass num_classes")
    rank, world = dist.rank(), dist.world_size()
    head = build_head(job, reps.dim, num_classes, prototypes, options.count, options.seed).to(device)
    params = [p for p in head.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=job.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimiser, gamma=options.gamma)

    n_train = reps.num_rows("train")
    held = split_train(n_train, options.holdout, options.seed)
    mine = reps.owned_mask("train", rank, world)
    fit = np.flatnonzero(~held).astype(np.int32 if n_train < 2**31 else np.int64)
    selection = np.flatnonzero(held & mine)
    test = reps.owned("test", rank, world)
    if reps.num_rows("test") == 0:
        raise ValueError(f"{reps.folder}: no test representations to report an accuracy on")
    steps = math.ceil(fit.size / options.batch_size)

    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    for epoch in range(options.epochs):
        head.train()
        order = fit[permutation(fit.size, options.seed * 1_000_003 + epoch + 1)]
        loss_sum = 0.0
        for t in range(steps):
            batch = order[t * options.batch_size:(t + 1) * options.batch_size]
            local = np.sort(batch[mine[batch]])
            loss_sum += _step(head, params, optimiser, reps, local, batch.size, num_classes, device)
        schedule.step()
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"IIS job {job}: the training loss is {loss_sum} in epoch {epoch + 1}; "
                                     f"lower the lr")
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / fit.size,
                        "selection_accuracy": _accuracy(head, reps, "train", selection, options, device)[0],
                        **dict(zip(("accuracy", "top5"), _accuracy(head, reps, "test", test, options, device)))})
        if best is None or history[-1]["selection_accuracy"] > best[0]:
            best = (history[-1]["selection_accuracy"], epoch,
                    {k: v.detach().cpu().clone() for k, v in head.state_dict().items()})
    assert best is not None
    chosen = history[best[1]]
    record = {"library": job.library, "ratio": job.ratio, "lr": job.lr, "accuracy": chosen["accuracy"],
              "top5": chosen["top5"], "selection_accuracy": chosen["selection_accuracy"], "epoch": chosen["epoch"],
              "train_loss": min(h["train_loss"] for h in history),
              "rows": {"train": int(fit.size), "selection": int(held.sum()), "test": reps.num_rows("test")},
              "world_size": world, "seconds": round(time.perf_counter() - start, 3),
              "options": asdict(options)}
    if isinstance(head, PrototypeHead):
        k = int(head.prototypes.shape[0])
        record.update(concepts=k, kept=kept(k, job.ratio) if options.count == "exact" else reference_kept(k, job.ratio))
    return HeadResult(record, best[2], history)


def _step(head: nn.Module, params: list[nn.Parameter], optimiser: torch.optim.Optimizer, reps: Representations,
          local: np.ndarray, global_rows: int, num_classes: int, device: torch.device) -> float:
    """One optimiser step on the global minibatch of `global_rows` rows, of which this rank holds `local`.
    Returns the minibatch's summed loss (all ranks)."""
    optimiser.zero_grad(set_to_none=False)
    loss = torch.zeros((), device=device)
    if local.size:
        x, y = reps.rows("train", local, device)
        _check_labels(y, num_classes, reps)
        loss = F.cross_entropy(head(x), y, reduction="sum")
        loss.backward()
    flat = torch.cat([*(p.grad.reshape(-1) for p in params), loss.detach().reshape(1)])
    dist.all_reduce(flat)  # one collective: every rank's gradient sum and loss sum
    flat /= global_rows
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    optimiser.step()
    return float(flat[-1]) * global_rows


@torch.no_grad()
def _accuracy(head: nn.Module, reps: Representations, split: str, samples: np.ndarray, options: HeadOptions,
              device: torch.device) -> tuple[float, float]:
    """(top-1, top-k) over every rank's `samples` of `split`, streamed; counts all-reduced."""
    head.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    for a in range(0, samples.size, options.eval_batch_size):
        x, y = reps.rows(split, samples[a:a + options.eval_batch_size], device)
        _check_labels(y, head_classes(head), reps)
        top = head(x).topk(min(TOP_K, head_classes(head)), dim=1).indices
        counts += torch.stack([(top[:, 0] == y).sum(), (top == y[:, None]).any(dim=1).sum(),
                               torch.tensor(y.numel(), device=device)]).double()
    dist.all_reduce(counts)
    total = float(counts[2])
    return (float(counts[0]) / total, float(counts[1]) / total) if total else (0.0, 0.0)


def head_classes(head: nn.Module) -> int:
    return head.linear.out_features


def _check_labels(y: torch.Tensor, num_classes: int, reps: Representations) -> None:
    if y.numel() and not 0 <= int(y.min()) <= int(y.max()) < num_classes:
        raise ValueError(f"{reps.folder}: labels {int(y.min())}..{int(y.max())} outside the head's "
                         f"{num_classes} classes")
