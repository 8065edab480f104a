"""Integrity checks of converted data, shared by the loaders (the cheap ones, at open, on every rank) and
`python -m data_prep verify` (all of them).

Why at open: a cut or overwritten .beton otherwise trains without a word (FFCV reads whatever bytes its
allocation table points at, so the rows after the cut get wrong pixels), and a damaged tar shard fails hours
later with a bare tarfile error. The open-time checks read file sizes, and for a .beton its header, field
descriptors, metadata and allocation table: O(samples) numpy work, well under a second at ImageNet scale, no
image bytes. Hashing whole files (`qpm_dist.utils.file_sha256`, recorded in dataset.json at conversion) is
`verify`'s job. A changed byte inside one image is also found when that image is read, by its own digest where
one was recorded (wds samples, folder images with a digest list: qpm_dist.data.digests); inside a .beton only
`verify` finds it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from qpm_dist.errors import BadInput

MAX_NAMED = 5


class DataIntegrityError(BadInput, ValueError):
    """Damaged or inconsistent input data; the message names the file and the fix. A ValueError: bad input
    (exit code 2), not a bug."""


class CorruptImageError(DataIntegrityError):
    """An image file or record that no decoder can read (or whose bytes differ from their recorded digest); the
    message names it. Bad input data (exit code 2). Raised by qpm_dist.data.decode and .digests."""


def repair_hint(folder: str | Path, fmt: str) -> str:
    return (f"the converted data is damaged or was changed after conversion: check it with `python -m data_prep "
            f"verify {folder}` and reconvert (`python -m data_prep to-{fmt} {folder} ... --force`)")


def plain_message(exc: BaseException) -> str:
    """The one-line message of an exception, also when a DataLoader worker re-raised it (torch then puts
    "Caught X in DataLoader worker process N" and the worker's whole traceback into the message)."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        text = re.sub(r"^[\w.]+: ", "", text.splitlines()[-1])
    return text


def size_problem(path: Path, expected_bytes: int | None) -> str | None:
    """A missing file, or a size other than the one dataset.json recorded (None: fine or not recorded)."""
    if not path.is_file():
        return f"{path}: listed in dataset.json but missing"
    size = path.stat().st_size
    if expected_bytes is not None and size != int(expected_bytes):
        return f"{path}: {size} bytes, dataset.json says {int(expected_bytes)} (cut short or overwritten)"
    return None


def beton_problems(path: str | Path, expected_bytes: int | None = None, expected_rows: int | None = None) -> list[str]:
    """What is structurally wrong with a .beton (empty: nothing found): its size against dataset.json, and
    FFCV's header, metadata and allocation table against each other and the file size. Each entry names the file.

    FFCV's own Reader checks none of this: a truncated allocation table is read short, and rows whose data
    pointer is no longer in it are fed from wrong bytes."""
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType, get_metadata_type

    path = Path(path)
    problem = size_problem(path, expected_bytes)
    if problem:
        return [problem]
    size = path.stat().st_size
    if size < HeaderType.itemsize:
        return [f"{path}: {size} bytes, shorter than a FFCV header"]
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if int(header["version"]) != CURRENT_VERSION:
        return [f"{path}: FFCV format version {int(header['version'])}, expected {CURRENT_VERSION} (damaged header?)"]
    rows, table_at = int(header["num_samples"]), int(header["alloc_table_ptr"])
    if expected_rows is not None and rows != int(expected_rows):
        return [f"{path}: header says {rows} rows, dataset.json says {int(expected_rows)}"]
    descriptors_end = HeaderType.itemsize + int(header["num_fields"]) * FieldDescType.itemsize
    if descriptors_end > size:
        return [f"{path}: header says {int(header['num_fields'])} fields, more than the file holds"]
    descriptors = np.fromfile(path, dtype=FieldDescType, count=int(header["num_fields"]), offset=HeaderType.itemsize)
    try:
        from ffcv.types import get_handlers

        metadata_type = get_metadata_type(get_handlers(descriptors))
    except Exception as exc:  # noqa: BLE001 - unknown field type ids or arguments: a damaged header
        return [f"{path}: unreadable field descriptors ({type(exc).__name__}: {exc})"]
    metadata_end = descriptors_end + rows * metadata_type.itemsize
    if not metadata_end <= table_at <= size:
        return [f"{path}: allocation table at byte {table_at}, outside the data area {metadata_end}..{size} "
                f"(file cut short or damaged header)"]
    if (size - table_at) % ALLOC_TABLE_TYPE.itemsize:
        return [f"{path}: allocation table of {size - table_at} bytes is not a whole number of "
                f"{ALLOC_TABLE_TYPE.itemsize}-byte entries (file cut short?)"]
    table = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=table_at)
    ptr, length = table["ptr"].astype(np.int64), table["size"].astype(np.int64)  # exact where the next line holds
    sane = (table["ptr"] >= metadata_end) & (table["ptr"] <= table_at) & (table["size"] <= table_at)
    outside = np.flatnonzero(~sane | (ptr + length > table_at) | (table["sample_id"] >= rows))
    if len(outside):
        return [f"{path}: {len(outside)} allocation table entries point outside the data area"]
    metadata = np.fromfile(path, dtype=metadata_type, count=rows, offset=descriptors_end)
    known = np.sort(ptr)
    problems = []
    for name in metadata_type.names:
        field = metadata[name]
        if field.dtype.names is None or "data_ptr" not in field.dtype.names:
            continue  # stored in the metadata itself (ints, floats)
        wanted = field["data_ptr"].astype(np.int64)
        slot = np.minimum(np.searchsorted(known, wanted), max(len(known) - 1, 0))
        lost = np.flatnonzero(known[slot] != wanted) if len(known) else np.arange(rows)
        if len(lost):
            listed = ", ".join(str(r) for r in lost[:MAX_NAMED]) + (" ..." if len(lost) > MAX_NAMED else "")
            problems.append(f"{path}: {len(lost)} rows point to data missing from the allocation table "
                            f"(rows {listed}; file cut short?)")
    return problems


def shard_problems(root: Path, shards: list[dict]) -> list[str]:
    """Missing shards and shards whose size differs from dataset.json's record, one entry each."""
    found = (size_problem(root / s["file"], s.get("bytes")) for s in shards)
    return [p for p in found if p]


def raise_if_damaged(problems: list[str], folder: str | Path, fmt: str) -> None:
    """Refuse the data at open: the first few problems, then what to do."""
    if problems:
        more = f" (and {len(problems) - MAX_NAMED} more)" if len(problems) > MAX_NAMED else ""
        raise DataIntegrityError(f"data.converted: {'; '.join(problems[:MAX_NAMED])}{more}; {repair_hint(folder, fmt)}")
