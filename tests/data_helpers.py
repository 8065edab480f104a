"""Helpers for the data-pipeline tests: run converters in-process, read shards back, build sources."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

from qpm_dist.config import DataConfig


def data_prep(*argv: str) -> int:
    """`python -m data_prep ...` in this process (workers=1 keeps it free of process start-up costs)."""
    from data_prep.__main__ import main

    return main([str(a) for a in argv])


def convert(fmt: str, source: Path, out: Path, *extra: str) -> Path:
    code = data_prep(f"to-{fmt}", out, "--dataset", "synthetic", "--root", source, "--workers", "1", "--quiet", *extra)
    assert code == 0, f"to-{fmt} exited with {code}"
    return out


def copy_dataset(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def wds_samples(folder: Path, split: str) -> dict[int, tuple[int, str]]:
    """sample index -> (label, shard file name) from reading every tar of a split with tarfile."""
    out: dict[int, tuple[int, str]] = {}
    for tar_path in sorted(folder.glob(f"{split}-*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in members:
                if name.endswith(".cls"):
                    index = int(name[: -len(".cls")])  # the key is the sample's source index
                    label = int(tar.extractfile(members[name]).read())
                    assert index not in out, f"index {index} twice"
                    out[index] = (label, tar_path.name)
    return out


def source_cfg(backend: str, converted: Path | None, source: Path, **kw) -> DataConfig:
    base = dict(dataset="synthetic", root=str(source), backend=backend,
                converted=str(converted) if converted else None, img_size=32, num_workers=0, augment="imagenet")
    base.update(kw)
    return DataConfig(**base)
