"""A training batch as named fields, so a method can carry more than images and labels.

Every backend's loader yields `(images, targets)` or, asked for the sample indices, `(images, targets, index)`
(the samples' positions in their source split, the same numbering on the folder, FFCV and WebDataset
backends). The trainer turns that into a `Batch` and joins the per-sample arrays a training task asks for
(`TrainingTask.batch_fields`: object boxes, part boxes, anything indexed by sample position), so a task
reads `batch["boxes"]` whatever the storage backend. A pipeline may also yield a `Batch` with fields of its
own (e.g. composite-image layouts), which passes through unchanged.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch


class Batch(dict):
    """Named tensors of one (micro-)batch: `images`, `targets` and optional others (`index`, ...)."""

    @classmethod
    def of(cls, item) -> "Batch":
        """A loader's item: a Batch/mapping, or a tuple (images, targets[, index])."""
        if isinstance(item, Mapping):
            return cls(item)
        images, targets, *rest = item
        batch = cls(images=images, targets=targets)
        if rest:
            batch["index"] = rest[0]
        return batch

    @property
    def images(self) -> torch.Tensor:
        return self["images"]

    @property
    def targets(self) -> torch.Tensor:
        return self["targets"]

    @property
    def size(self) -> int:
        return int(self["targets"].shape[0])

    def join(self, fields: Mapping[str, np.ndarray]) -> "Batch":
        """Add `fields[name][index]` for every per-sample array of `fields` (indexed by sample position)."""
        if not fields:
            return self
        if "index" not in self:
            raise KeyError("the loader did not return sample indices, which joining per-sample fields needs")
        index = self["index"].cpu().numpy()
        for name, table in fields.items():
            self[name] = torch.from_numpy(np.ascontiguousarray(table[index]))
        return self

    def to(self, device: torch.device, skip: tuple[str, ...] = ("images",)) -> "Batch":
        """Move every tensor field except `skip` (the strategy prepares the images itself)."""
        for name, value in self.items():
            if name not in skip and isinstance(value, torch.Tensor):
                self[name] = value.to(device, non_blocking=True)
        return self
