"""Reader for CUB-200-2011 style metadata (real CUB and ``data_prep.synthetic``).

Both datasets share the CUB file names, so one reader serves both::

    images.txt              <image_id> <path relative to images/>
    image_class_labels.txt  <image_id> <class_id (1-based)>
    train_test_split.txt    <image_id> <1=train | 0=test>
    bounding_boxes.txt      <image_id> <x> <y> <width> <height>
    classes.txt             <class_id> <NNN.class_name>
    parts/parts.txt         <part_id> <part name>                     (optional)
    class_parts.txt         C rows of P 0/1 values                    (optional, synthetic only)
    parts/part_boxes.txt    <image_id> <part_id> <x> <y> <w> <h> <is_distractor>  (synthetic only)

The per-image files must list the image ids of images.txt in the same order
(as CUB and the generator write them). Errors name the file and, for bad
content, the line number. Only numpy is used. To keep ~1.3M-line files fast,
numeric tables go through np.loadtxt's C parser and images.txt through one
regex check and one str.split; a slow per-line pass runs only to locate an error.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["CUBMetadata", "load_cub_metadata", "load_part_boxes"]

_REQUIRED = {
    "images.txt": "'<image_id> <path relative to images/>' per image",
    "image_class_labels.txt": "'<image_id> <class_id>' per image (1-based class ids)",
    "train_test_split.txt": "'<image_id> <1=train|0=test>' per image",
    "bounding_boxes.txt": "'<image_id> <x> <y> <width> <height>' per image",
    "classes.txt": "'<class_id> <class_name>' per class",
}


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields make == ambiguous
class CUBMetadata:
    """All per-image metadata of a CUB-layout dataset, in images.txt order."""

    root: Path
    image_ids: np.ndarray  # int64, as in images.txt
    paths: list[str]  # relative to root / "images"
    labels: np.ndarray  # int64, 0-based class index
    is_train: np.ndarray  # bool
    boxes: np.ndarray  # float32, N x 4: x, y, width, height (pixels)
    class_names: list[str]  # e.g. "001.Black_footed_Albatross", index = label
    part_names: list[str] | None  # index = part_id - 1; None if parts/parts.txt is absent
    class_parts: np.ndarray | None  # uint8, C x P ground truth; None if class_parts.txt is absent

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_dir(self) -> Path:
        return self.root / "images"

    def split(self, train: bool) -> CUBMetadata:
        """The train (``train=True``) or test subset; class and part info are shared."""
        return self.subset(np.flatnonzero(self.is_train == bool(train)))

    def subset(self, index: np.ndarray) -> CUBMetadata:
        """Rows ``index`` (integer positions) of the per-image fields."""
        index = np.asarray(index, dtype=np.int64)
        return dataclasses.replace(
            self,
            image_ids=self.image_ids[index],
            paths=[self.paths[i] for i in index],
            labels=self.labels[index],
            is_train=self.is_train[index],
            boxes=self.boxes[index],
        )


# ---------------------------------------------------------------------------
# Low-level parsing


def _require(path: Path, content: str) -> None:
    """Raise FileNotFoundError naming the file and what it should contain."""
    if not path.is_file():
        raise FileNotFoundError(f"missing metadata file {path} (should contain {content})")


def _line_number(path: Path, row: int) -> int:
    """1-based line number of data row ``row`` (blank lines are not rows); error path only."""
    seen = -1
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                seen += 1
                if seen == row:
                    return number
    return row + 1  # not reached for rows that exist


def _find_bad_line(path: Path, ncols: int) -> str | None:
    """Describe the first line that does not hold ``ncols`` numbers (slow; error path only)."""
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != ncols:
                return f"{path}, line {number}: expected {ncols} fields, got {len(fields)}: {line.rstrip()!r}"
            try:
                [float(x) for x in fields]
            except ValueError:
                return f"{path}, line {number}: not a number in {line.rstrip()!r}"
    return None


def _load_numeric(path: Path, ncols: int, content: str) -> np.ndarray:
    """Numeric table with ``ncols`` columns as float64 (rows x ncols)."""
    _require(path, content)
    try:
        with warnings.catch_warnings():  # an empty file is reported below, not warned about
            warnings.simplefilter("ignore", UserWarning)
            table = np.loadtxt(path, dtype=np.float64, comments=None, ndmin=2)
    except ValueError as e:
        raise ValueError(_find_bad_line(path, ncols) or f"{path}: {e}") from None
    if table.size == 0:
        raise ValueError(f"{path} is empty (should contain {content})")
    if table.shape[1] != ncols:
        raise ValueError(f"{path}, line {_line_number(path, 0)}: expected {ncols} fields, got {table.shape[1]}")
    return table


def _int_column(table: np.ndarray, col: int, path: Path, what: str) -> np.ndarray:
    """Column ``col`` as int64, rejecting non-integers (e.g. '3.5')."""
    values = table[:, col]
    bad = np.flatnonzero(values != np.round(values))
    if len(bad):
        raise ValueError(f"{path}, line {_line_number(path, int(bad[0]))}: {what} must be an integer, got {values[bad[0]]}")
    return values.astype(np.int64)


def _check_ids(ids: np.ndarray, expected: np.ndarray, path: Path) -> None:
    """Per-image files must list the images.txt ids in the same order."""
    n = min(len(ids), len(expected))
    bad = np.flatnonzero(ids[:n] != expected[:n])
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"{path}, line {_line_number(path, i)}: image id {ids[i]} where images.txt has {expected[i]} "
            f"(per-image files must follow the order of images.txt)"
        )
    if len(ids) < len(expected):
        raise ValueError(
            f"{path} ends after {len(ids)} entries but images.txt has {len(expected)}: "
            f"no entry for image id {expected[n]}"
        )
    if len(ids) > len(expected):
        raise ValueError(f"{path}, line {_line_number(path, n)}: extra entry, images.txt has only {n} images")


def _load_id_names(path: Path, content: str) -> list[str]:
    """'<id> <name ...>' file with ids 1..n in order (classes.txt, parts.txt): the names."""
    _require(path, content)
    names = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            fields = line.split(maxsplit=1)
            if not fields:
                continue
            if len(fields) != 2 or fields[0] != str(len(names) + 1):
                raise ValueError(f"{path}, line {number}: expected '{len(names) + 1} <name>', got {line.rstrip()!r}")
            names.append(fields[1].strip())
    if not names:
        raise ValueError(f"{path} is empty (should contain {content})")
    return names


# Any non-blank line that is not exactly two whitespace-separated fields.
_NOT_TWO_FIELDS = re.compile(r"^(?![^\S\n]*\S+[^\S\n]+\S+[^\S\n]*$)[^\n]*\S[^\n]*$", re.M)


def _load_images_txt(path: Path) -> tuple[np.ndarray, list[str]]:
    """images.txt as (ids, relative paths); one regex scan + one split instead of per-line work."""
    _require(path, _REQUIRED["images.txt"])
    text = path.read_text()
    bad = _NOT_TWO_FIELDS.search(text)
    if bad:
        number = text.count("\n", 0, bad.start()) + 1
        raise ValueError(f"{path}, line {number}: expected '<image_id> <path>', got {bad.group().strip()!r}")
    tokens = text.split()
    if not tokens:
        raise ValueError(f"{path} is empty (should contain {_REQUIRED['images.txt']})")
    try:
        ids = np.array(tokens[0::2], dtype=np.int64)
    except ValueError:
        row = next(i for i, t in enumerate(tokens[0::2]) if not t.lstrip("+-").isdigit())
        raise ValueError(f"{path}, line {_line_number(path, row)}: image id {tokens[2 * row]!r} is not an integer") from None
    uniq, first = np.unique(ids, return_index=True)
    if len(uniq) != len(ids):
        dup = np.setdiff1d(np.arange(len(ids)), first)[0]
        raise ValueError(f"{path}, line {_line_number(path, int(dup))}: duplicate image id {ids[dup]}")
    return ids, tokens[1::2]


# ---------------------------------------------------------------------------
# Public API


def _resolve_root(root: str | Path) -> Path:
    """Accept the dataset folder itself or the folder that contains CUB_200_2011/."""
    root = Path(root)
    if not (root / "images.txt").exists() and (root / "CUB_200_2011" / "images.txt").exists():
        return root / "CUB_200_2011"
    return root


def load_cub_metadata(root: str | Path) -> CUBMetadata:
    """Read and cross-check the metadata of a CUB-layout dataset at ``root``."""
    root = _resolve_root(root)
    ids, paths = _load_images_txt(root / "images.txt")

    class_names = _load_id_names(root / "classes.txt", _REQUIRED["classes.txt"])

    path = root / "image_class_labels.txt"
    table = _load_numeric(path, 2, _REQUIRED["image_class_labels.txt"])
    _check_ids(_int_column(table, 0, path, "image id"), ids, path)
    class_ids = _int_column(table, 1, path, "class id")
    bad = np.flatnonzero((class_ids < 1) | (class_ids > len(class_names)))
    if len(bad):
        raise ValueError(
            f"{path}, line {_line_number(path, int(bad[0]))}: class id {class_ids[bad[0]]} "
            f"not in 1..{len(class_names)} (classes.txt)"
        )

    path = root / "train_test_split.txt"
    table = _load_numeric(path, 2, _REQUIRED["train_test_split.txt"])
    _check_ids(_int_column(table, 0, path, "image id"), ids, path)
    bad = np.flatnonzero((table[:, 1] != 0) & (table[:, 1] != 1))
    if len(bad):
        raise ValueError(f"{path}, line {_line_number(path, int(bad[0]))}: split must be 1 (train) or 0 (test), got {table[bad[0], 1]}")
    is_train = table[:, 1] == 1

    path = root / "bounding_boxes.txt"
    table = _load_numeric(path, 5, _REQUIRED["bounding_boxes.txt"])
    _check_ids(_int_column(table, 0, path, "image id"), ids, path)
    boxes = table[:, 1:5]
    bad = np.flatnonzero(~np.isfinite(boxes).all(axis=1) | (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0))
    if len(bad):
        raise ValueError(f"{path}, line {_line_number(path, int(bad[0]))}: box needs finite x, y and width, height > 0")

    part_names = None
    if (root / "parts" / "parts.txt").exists():
        part_names = _load_id_names(root / "parts" / "parts.txt", "'<part_id> <part name>' per part")

    class_parts = None
    path = root / "class_parts.txt"
    if path.exists():
        num_parts = len(part_names) if part_names is not None else None
        class_parts = _load_class_parts(path, len(class_names), num_parts)

    return CUBMetadata(
        root=root,
        image_ids=ids,
        paths=paths,
        labels=class_ids - 1,
        is_train=is_train,
        boxes=boxes.astype(np.float32),
        class_names=class_names,
        part_names=part_names,
        class_parts=class_parts,
    )


def _load_class_parts(path: Path, num_classes: int, num_parts: int | None) -> np.ndarray:
    """The C x P ground-truth 0/1 matrix, checked against classes.txt and parts.txt."""
    content = "one row of 0/1 values per class, one column per part"
    if num_parts is None:  # no parts.txt: take the width from the first line
        with open(path) as f:
            num_parts = len(f.readline().split())
    table = _load_numeric(path, num_parts, content)
    if len(table) != num_classes:
        raise ValueError(f"{path} has {len(table)} rows but classes.txt has {num_classes} classes")
    bad = np.argwhere((table != 0) & (table != 1))
    if len(bad):
        raise ValueError(f"{path}, line {_line_number(path, int(bad[0, 0]))}: entries must be 0 or 1")
    return table.astype(np.uint8)


def load_part_boxes(root: str | Path) -> dict[int, np.ndarray]:
    """parts/part_boxes.txt as image id -> float32 rows (part_id, x, y, w, h, is_distractor).

    Only the synthetic dataset has this file. Images without drawn parts have
    no key. part_id is 1-based, as in parts/parts.txt.
    """
    path = _resolve_root(root) / "parts" / "part_boxes.txt"
    table = _load_numeric(path, 7, "'<image_id> <part_id> <x> <y> <width> <height> <is_distractor>' per drawn part")
    image_ids = _int_column(table, 0, path, "image id")
    _int_column(table, 1, path, "part id")
    order = np.argsort(image_ids, kind="stable")
    image_ids, rows = image_ids[order], table[order, 1:].astype(np.float32)
    starts = np.flatnonzero(np.r_[True, image_ids[1:] != image_ids[:-1]])
    return {int(image_ids[s]): block for s, block in zip(starts, np.split(rows, starts[1:]))}
