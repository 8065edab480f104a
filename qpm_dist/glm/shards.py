"""Per-rank feature shards: `<stage>/shards/{split}-r{rank:04d}-{x,y}.npy` plus `meta.json`.

Written by the features stage (each rank its own rows, streamed into a memory-mapped .npy, float16 or float32),
read back either sharded (rank r reads the shards s with s mod W = r, so a later run with another world size
still reads every row exactly once) or all together (glm-saga on rank 0). Reading standardises in chunks
straight into one float32 tensor on the target device: the host never holds a second full copy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from qpm_dist.glm.problem import standardise
from qpm_dist.utils import atomic_write_text

CHUNK_ROWS = 65536
FLOAT16_MAX = float(np.finfo(np.float16).max)


def shard_paths(folder: Path, split: str, rank: int) -> tuple[Path, Path]:
    base = Path(folder) / "shards" / f"{split}-r{rank:04d}"
    return base.with_name(base.name + "-x.npy"), base.with_name(base.name + "-y.npy")


class ShardWriter:
    """Rows of one split on one rank, streamed into a memory-mapped .npy; renamed into place on close."""

    def __init__(self, folder: Path, split: str, rank: int, rows: int, dim: int, dtype: str) -> None:
        self.x_path, self.y_path = shard_paths(folder, split, rank)
        self.x_path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.x_path.with_name(f".{self.x_path.name}.tmp")
        if rows == 0:  # a rank without rows (more ranks than images): numpy cannot map an empty file
            np.save(self.tmp, np.zeros((0, dim), dtype=np.dtype(dtype)), allow_pickle=False)
            os.replace(self.tmp.with_name(self.tmp.name + ".npy"), self.tmp)
            self.x = np.zeros((0, dim), dtype=np.dtype(dtype))
        else:
            self.x = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.dtype(dtype), shape=(rows, dim))
        self.y = np.empty(rows, dtype=np.int64)
        self.pos = 0

    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        m = features.shape[0]
        values = features.detach().float().cpu().numpy()
        if self.x.dtype == np.float16 and m and (peak := float(np.abs(values).max())) > FLOAT16_MAX:
            # numpy would store inf without a word; every later reader would see it
            raise ValueError(f"{self.x_path}: a feature of magnitude {peak:.4g} exceeds float16's range "
                             f"({FLOAT16_MAX:g}); write these shards as float32")
        self.x[self.pos:self.pos + m] = values
        self.y[self.pos:self.pos + m] = labels.cpu().numpy()
        self.pos += m

    def close(self) -> int:
        if self.pos != self.x.shape[0]:
            raise RuntimeError(f"{self.x_path}: wrote {self.pos} rows, expected {self.x.shape[0]}")
        if isinstance(self.x, np.memmap):
            self.x.flush()
        del self.x
        os.replace(self.tmp, self.x_path)
        tmp_y = self.y_path.with_name(f".{self.y_path.name}.tmp.npy")
        np.save(tmp_y, self.y)
        os.replace(tmp_y, self.y_path)
        return self.pos


def write_meta(folder: Path, meta: dict) -> None:
    atomic_write_text(Path(folder) / "shards" / "meta.json", json.dumps(meta, indent=1))


def read_meta(folder: Path) -> dict:
    path = Path(folder) / "shards" / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"feature shards missing: {path} (rerun the features stage)")
    return json.loads(path.read_text())


def shards_for(world_size_written: int, rank: int, world_size: int) -> list[int]:
    return [s for s in range(world_size_written) if s % world_size == rank]


def load_rows(folder: Path, split: str, shards: list[int], mean: torch.Tensor, std: torch.Tensor,
              device: torch.device, columns: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised float32 rows (optionally only `columns`; `mean`/`std` are those columns') and labels."""
    meta = read_meta(folder)
    dim = meta["dim"] if columns is None else columns.numel()
    rows = sum(meta["rows"][split][s] for s in shards)
    X = torch.empty(rows, dim, dtype=torch.float32, device=device)
    y = torch.empty(rows, dtype=torch.long, device=device)
    mean, std = mean.to(device), std.to(device)
    cols = None if columns is None else columns.cpu().numpy()
    pos = 0
    for s in shards:
        x_path, y_path = shard_paths(folder, split, s)
        xs = np.load(x_path, mmap_mode="r")
        y[pos:pos + xs.shape[0]] = torch.from_numpy(np.load(y_path)).to(device)
        for a in range(0, xs.shape[0], CHUNK_ROWS):
            chunk = np.array(xs[a:a + CHUNK_ROWS] if cols is None else xs[a:a + CHUNK_ROWS][:, cols], dtype=np.float32)
            X[pos + a:pos + a + chunk.shape[0]] = standardise(torch.from_numpy(chunk).to(device), mean, std)
        pos += xs.shape[0]
    return X, y
