"""Streaming, all-reducible sufficient statistics of a model's features (specs/qpm.md §5.1–5.4, §6.3).

The reference stores the N x F training feature matrix in RAM (several copies; ~10 GB each for
ImageNet) and loops over classes. Everything QPM needs is a function of a few sums, accumulated per batch
in float64 on every rank and combined with one all-reduce:

    count N, per-feature sum Σx, sum of squares Σx², minimum and maximum,
    per-class feature sums S = Xᵀ·onehot(y) (C x F), class counts n_c,
    locality sums Σ_i ω_ij·peak_ij and Σ_i ω_ij·edge_ij (for B),

where ω_ij = f_ij / Σ_k f_ik is feature j's share of image i's pooled activation, peak_ij the largest
value of the spatial softmax of map M_ij, and edge_ij = 1 when M_ij's arg-max lies on the map's border.
B comes from the same forward pass as the other sums, on the deterministic test-time view of each image
(the reference used three differently augmented views, spec bug 9), and the border test works for
non-square maps.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from qpm_dist import dist
from qpm_dist.utils import atomic_open


@dataclass
class FeatureSums:
    count: torch.Tensor  # () float64
    sum: torch.Tensor  # F
    sumsq: torch.Tensor  # F
    min: torch.Tensor  # F
    max: torch.Tensor  # F
    class_sums: torch.Tensor  # C x F
    class_counts: torch.Tensor  # C
    peak_sum: torch.Tensor  # F, Σ_i ω_ij·peak_ij
    edge_sum: torch.Tensor  # F, Σ_i ω_ij·edge_ij

    @classmethod
    def zeros(cls, num_features: int, num_classes: int, device: torch.device | str = "cpu") -> "FeatureSums":
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        return cls(count=z(()), sum=z(num_features), sumsq=z(num_features),
                   min=torch.full((num_features,), float("inf"), dtype=torch.float64, device=device),
                   max=torch.full((num_features,), float("-inf"), dtype=torch.float64, device=device),
                   class_sums=z(num_classes, num_features), class_counts=z(num_classes),
                   peak_sum=z(num_features), edge_sum=z(num_features))

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor, feature_maps: torch.Tensor | None = None) -> None:
        """Add a batch: pooled features B x F, labels B, and (for B) the maps B x F x H x W."""
        x = self._float64(features)
        self.count += x.shape[0]
        self.sum += x.sum(0)
        torch.minimum(self.min, x.amin(0), out=self.min)
        torch.maximum(self.max, x.amax(0), out=self.max)
        self.class_sums.index_add_(0, labels, x)
        self.class_counts += torch.bincount(labels, minlength=self.class_counts.numel()).double()
        if feature_maps is not None:
            share = x / x.sum(1, keepdim=True).clamp_min(1e-12)  # ω: a feature's share of the image
            peak, edge = locality(feature_maps)
            self.peak_sum += (share * peak.double()).sum(0)
            self.edge_sum += (share * edge.double()).sum(0)
        self.sumsq += x.square_().sum(0)  # last: squares the buffer in place

    def _float64(self, features: torch.Tensor) -> torch.Tensor:
        """The batch as float64 in a reused buffer: a fresh large tensor per batch costs page faults."""
        buf = getattr(self, "_buffer", None)
        if buf is None or buf.shape[0] < features.shape[0]:
            buf = self._buffer = torch.empty(features.shape, dtype=torch.float64, device=features.device)
        x = buf[: features.shape[0]]
        return x.copy_(features)

    def all_reduce(self) -> "FeatureSums":
        """Combine the ranks' sums in place (min/max with MIN/MAX); returns self."""
        for f in fields(self):
            op = {"min": "min", "max": "max"}.get(f.name, "sum")
            dist.all_reduce(getattr(self, f.name), op=op)
        return self

    def cpu(self) -> "FeatureSums":
        return FeatureSums(**{f.name: getattr(self, f.name).cpu() for f in fields(self)})

    def save(self, path: Path) -> None:
        with atomic_open(path) as fh:
            np.savez(fh, **{f.name: getattr(self, f.name).cpu().numpy() for f in fields(self)})

    @classmethod
    def load(cls, path: Path) -> "FeatureSums":
        with np.load(path, allow_pickle=False) as data:
            return cls(**{f.name: torch.from_numpy(data[f.name]) for f in fields(cls)})

    # ---- derived quantities
    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def std(self) -> torch.Tensor:
        """Population standard deviation (ddof 0), as the reference's normalisation uses."""
        var = self.sumsq / self.count - self.mean**2
        return var.clamp_min(0).sqrt()


def locality(feature_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel: max of the spatial softmax, and whether the arg-max lies on the border."""
    b, f, h, w = feature_maps.shape
    flat = feature_maps.float().reshape(b, f, h * w)
    peak = torch.softmax(flat, dim=2).amax(dim=2)
    pos = flat.argmax(dim=2)
    row, col = pos // w, pos % w
    edge = (row == 0) | (row == h - 1) | (col == 0) | (col == w - 1)
    return peak, edge.float()
