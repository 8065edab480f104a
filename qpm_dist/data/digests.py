"""Per-image digests, checked when an image's bytes are read, before they are decoded.

Why: a byte changed inside an image (the file keeps its size and structure) often still decodes, to wrong
pixels, without a word; the open-time checks (qpm_dist.data.integrity) look at sizes and structure only.
Hashing the bytes is cheap next to decoding them (blake2b: ~0.1 ms for a 110 KB JPEG, decoding ~5 ms), so the
loaders check a digest recorded when the data was known to be good:

* wds: `to-wds` writes a `<key>.sha` member (hex digest of the image member's bytes) into every sample; the
  manifest's `options.sample_digest` says so, and then a sample without it is damaged too. Shards converted
  before that have no digests and are read unchecked.
* folder: a digest list (`DIGEST_LIST` under data.root, or `data.digests: PATH`) written by
  `python -m data_prep fingerprint ROOT --dataset D` or by the synthetic data generator, keyed by each image's
  path relative to data.root. The list carries a checksum of its entries, so a damaged list is refused (naming
  it) instead of blaming intact images.
* ffcv: not checked at read time (FFCV reads the bytes inside its compiled pipeline); `verify` hashes the files.

A mismatch raises `ImageDigestError`, a CorruptImageError: `data.on_corrupt` stops the run or skips the sample
with a warning, exactly as for an image that cannot be decoded.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from qpm_dist.data.integrity import MAX_NAMED, CorruptImageError, DataIntegrityError  # torch-free (make-synthetic)
from qpm_dist.utils import atomic_write_text

ALGORITHM = "blake2b-64"  # = `b2sum -l 64`
DIGEST_LIST = "qpm_dist_digests.json"
LIST_FORMAT = "qpm_dist image digests"
LIST_VERSION = 1


class ImageDigestError(CorruptImageError):
    """An image's bytes differ from the digest recorded for them; the message names the image and the fix."""


def image_digest(data) -> str:
    """Hex blake2b-64 digest of encoded image bytes (bytes or a contiguous uint8 array)."""
    return hashlib.blake2b(memoryview(data), digest_size=8).hexdigest()


def mismatch_error(source: str, fix: str) -> ImageDigestError:
    return ImageDigestError(f"image {source} is damaged: its bytes do not match the digest recorded for them "
                            f"({ALGORITHM}); {fix}")


def check_digest(data, expected: str, source: str, fix: str) -> None:
    """Raise ImageDigestError naming `source` unless `data` hashes to `expected`."""
    if image_digest(data) != expected:
        raise mismatch_error(source, fix)


# ------------------------------------------------------------------------------------------- digest lists
def fingerprint_command(root: str | Path, dataset: str | None) -> str:
    return f"python -m data_prep fingerprint {root} --dataset {dataset or '...'}"


def _entries_checksum(files: dict[str, str]) -> str:
    """sha256 of the entries in `b2sum` line format, sorted by path."""
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(f"{files[path]}  {path}\n".encode())
    return h.hexdigest()


def write_digest_list(path: str | Path, files: dict[str, str], dataset: str | None = None) -> None:
    """Write a digest list (atomically): {relative path: image_digest} plus a checksum of the entries."""
    path = Path(path)
    content = {"format": LIST_FORMAT, "version": LIST_VERSION, "algorithm": ALGORITHM, "dataset": dataset,
               "count": len(files), "checksum": _entries_checksum(files), "files": dict(sorted(files.items()))}
    atomic_write_text(path, json.dumps(content, indent=0) + "\n")


def load_digest_list(path: str | Path, root: str | Path) -> dict[str, str]:
    """The entries of a digest list; a damaged or foreign file raises DataIntegrityError naming it."""
    path = Path(path)

    def damaged(reason: str) -> DataIntegrityError:
        return DataIntegrityError(f"data.digests: {path}: {reason}; the digest list is damaged: write it again "
                                  f"(`{fingerprint_command(root, dataset)}`) or set data.digests=off")

    dataset = None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise damaged(f"not valid JSON ({exc})") from None
    if not isinstance(content, dict) or content.get("format") != LIST_FORMAT:
        raise damaged(f"not a digest list (expected \"format\": \"{LIST_FORMAT}\")")
    dataset = content.get("dataset")
    if content.get("version") != LIST_VERSION or content.get("algorithm") != ALGORITHM:
        raise damaged(f"version {content.get('version')} / {content.get('algorithm')}, this code reads version "
                      f"{LIST_VERSION} / {ALGORITHM}")
    files = content.get("files")
    if not isinstance(files, dict) or not all(isinstance(d, str) for d in files.values()):
        raise damaged("no \"files\" object of path: digest entries")
    if len(files) != content.get("count") or _entries_checksum(files) != content.get("checksum"):
        raise damaged("its entries do not match its checksum")
    return files


def digest_list_path(setting: str | bool, root: str | Path) -> Path | None:
    """The list `data.digests` names: "off" (false) none, "auto" (true) ROOT's DIGEST_LIST if present, else the
    path given."""
    if setting is False or setting == "off":
        return None
    if setting is True or setting == "auto":
        path = Path(root) / DIGEST_LIST
        return path if path.is_file() else None
    if not Path(setting).is_file():
        raise FileNotFoundError(f"data.digests: digest list not found: {setting} (write it with "
                                f"`{fingerprint_command(root, None)}`, or set data.digests=auto|off)")
    return Path(setting)


def image_keys(image_dir: Path, paths: Sequence[str], root: str | Path) -> list[str]:
    """The digest-list keys of a split's images: their paths relative to data.root, with '/'."""
    prefix = Path(os.path.relpath(image_dir, root)).as_posix()
    return [p if prefix == "." else f"{prefix}/{p}" for p in paths]


@dataclass(frozen=True)
class SplitDigests:
    """The recorded digest of each image of a split (aligned with its paths), and what to do on a mismatch.

    `values` is a uint64 array, not a list of strings: 8 bytes per image (11 MB for ImageNet), and no Python
    objects whose reference counts would copy the pages into every forked loader worker."""

    values: np.ndarray
    fix: str

    def check(self, index: int, data, source: str | Path) -> None:
        if int(self.values[index]) != int(image_digest(data), 16):
            raise mismatch_error(str(source), self.fix)


def split_digests(list_path: Path, files: dict[str, str], image_dir: Path, paths: Sequence[str],
                  root: str | Path, dataset: str) -> SplitDigests:
    """A split's digests from a loaded list; images the list does not hold are refused (it is older than the
    dataset, or belongs to another one), naming the first few."""
    keys = image_keys(image_dir, paths, root)
    recorded = [files.get(k) for k in keys]  # one lookup per image: ~1 s for ImageNet
    unlisted = [k for k, d in zip(keys, recorded) if d is None]
    if unlisted:
        listed = ", ".join(unlisted[:MAX_NAMED]) + (" ..." if len(unlisted) > MAX_NAMED else "")
        raise DataIntegrityError(f"data.digests: {list_path} has no digest for {len(unlisted)} image file(s) of the "
                                 f"dataset ({listed}): write it again (`{fingerprint_command(root, dataset)}`) "
                                 f"or set data.digests=off")
    hexes = "".join(recorded)
    try:
        if len(hexes) != 16 * len(keys):
            raise ValueError
        values = np.frombuffer(bytes.fromhex(hexes), dtype=">u8").astype(np.uint64)
    except ValueError:
        raise DataIntegrityError(f"data.digests: {list_path}: an entry is not a {ALGORITHM} digest (16 hex digits); "
                                 f"write the list again (`{fingerprint_command(root, dataset)}`)") from None
    return SplitDigests(values,
                        f"restore the file from a good copy; if it was changed on purpose, write the digest list "
                        f"{list_path} again (`{fingerprint_command(root, dataset)}`) or set data.digests=off")
