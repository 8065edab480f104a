"""`dataset.json`: what `python -m data_prep to-ffcv|to-wds` wrote, read by the ffcv/wds loaders and `verify`.

Why one manifest: the loaders need the class list, per-split sample counts and (WebDataset) the per-shard
sample counts without opening any data file — exact epochs and equal batch counts per rank are planned from
these counts alone. It is written last and atomically, so its presence marks a finished conversion.

    {"format": "ffcv" | "wds", "version": 1, "dataset": "imagenet", "source_root": ..., "crop_to_box": false,
     "cub_root": null | path (travelingbirds), "crop_root": null | path (pre-cropped images were read),
     "num_classes": C, "class_names": [...], "display_names": [...] (names reports use; ImageNet's words),
     "source_fingerprint": ..., "fingerprint": ..., "options": {...},
     "class_parts": [[0, 1, ...], ...]                                     (synthetic data only)
     "splits": {"train": {"num_samples": N, "skipped": [{"index": i, "path": ..., "error": ...}],
                          "file": "train.beton", "rows": r, "bytes": b, "sha256": h      (ffcv)
                          "shards": [{"file": "train-000000.tar", "count": n, "bytes": b, "sha256": h}, ...] (wds)
               }, "test": {...}}}

Sample `index` everywhere is the position in the source split (as the folder backend numbers samples),
so per-sample augmentation seeds and labels can be compared across backends. `bytes` is checked by the
loaders at open, `sha256` (absent in folders converted before it was recorded) by `verify` (qpm_dist.data.integrity).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from qpm_dist.config import DataConfig
from qpm_dist.data.integrity import DataIntegrityError

MANIFEST = "dataset.json"
VERSION = 1


def load_manifest(folder: str | Path, expect_format: str | None = None) -> dict[str, Any]:
    """Read and check a converted folder's manifest; errors name the folder and the fix."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        hint = f"; create it with `python -m data_prep to-{expect_format} {folder} ...`" if expect_format else ""
        reason = "folder not found" if not folder.exists() else f"no {MANIFEST} (conversion not finished?)"
        prefix = "data.converted: " if expect_format else ""  # the loaders name the config key
        raise FileNotFoundError(f"{prefix}{folder}: {reason}{hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # cut short, a changed byte, a zeroed block
        raise DataIntegrityError(f"{path}: not valid JSON ({exc}); the file is damaged: reconvert "
                                 f"(`python -m data_prep to-{expect_format or '...'} {folder} ... --force`)") from None
    if not isinstance(manifest, dict):
        raise DataIntegrityError(f"{path}: not a dataset manifest (a JSON object expected)")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path}: manifest version {manifest.get('version')}, this code reads version {VERSION}")
    if expect_format and manifest.get("format") != expect_format:
        raise ValueError(f"{path}: holds {manifest.get('format')!r} data, but data.backend={expect_format}")
    for split in ("train", "test"):
        if split not in manifest.get("splits", {}):
            raise ValueError(f"{path}: no '{split}' split (convert both splits)")
    return manifest


def class_parts(manifest: dict) -> np.ndarray | None:
    """The ground-truth class x part matrix the converter copied from synthetic data, else None."""
    parts = manifest.get("class_parts")
    return None if parts is None else np.asarray(parts, dtype=np.uint8)


def check_matches_config(manifest: dict, cfg: DataConfig, folder: str | Path) -> None:
    """The data options baked in at conversion must be the ones the run asks for."""
    where = Path(folder) / MANIFEST
    if manifest["dataset"] != cfg.dataset:
        raise ValueError(f"{where}: converted from a '{manifest['dataset']}' dataset, but data.dataset={cfg.dataset}")
    if bool(manifest["crop_to_box"]) != cfg.crop_to_box:
        raise ValueError(f"{where}: converted with crop_to_box={manifest['crop_to_box']}, but "
                         f"data.crop_to_box={cfg.crop_to_box} (rerun the conversion with or without --crop-to-box)")
    if (manifest.get("crop_root") is not None) != (cfg.crop_root is not None):
        raise ValueError(f"{where}: converted with crop_root={manifest.get('crop_root')}, but "
                         f"data.crop_root={cfg.crop_root} (pre-cropped images are squashed, the originals are not: "
                         f"set data.crop_root as in the conversion, or convert again with or without --crop-root)")


class ConvertedSource:
    """What the ffcv and wds DataSources share: `data.converted`'s manifest, checked against the run's data
    options, and the dataset facts it records. Subclasses set `format` and check their own data files."""

    format: str

    def __init__(self, cfg: DataConfig, seed: int) -> None:
        self.cfg, self.seed = cfg, seed
        self.root = Path(cfg.converted)
        self.manifest = load_manifest(self.root, self.format)
        check_matches_config(self.manifest, cfg, self.root)
        self.num_classes = int(self.manifest["num_classes"])
        self.class_names = list(self.manifest["class_names"])
        self.display_names = list(self.manifest.get("display_names") or self.class_names)  # older manifests: none
        self.fingerprint = self.manifest["fingerprint"]
        self.class_parts = class_parts(self.manifest)
