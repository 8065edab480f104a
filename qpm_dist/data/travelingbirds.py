"""TravelingBirds (Koh et al. 2020, "Concept Bottleneck Models"): CUB-200-2011's images with the birds pasted
onto Places365 backgrounds, to measure how much a model relies on the background (specs/qpm.md §2.1).

Layout, as downloaded (CodaLab bundle `CUB_fixed`) and as the QPM reference reads it::

    TravelingBirds/CUB_fixed/train/<class>/<image>.jpg    every CUB image, on its class's train background
    TravelingBirds/CUB_fixed/test/<class>/<image>.jpg     every CUB image, on a different class's background

Both folders hold all 11,788 images under CUB's relative paths. Nothing in them says which image is a train
image, so the split comes from CUB's own files (data.cub_root): the train split reads `train/` restricted to
CUB's train images, the test split `test/` restricted to CUB's test images, in images.txt order (the
reference's img_id order). Labels and boxes are CUB's too: the generator pastes the bird pixels unchanged
into a background resized to the CUB image's size, so CUB's boxes apply to these images.

Each folder must hold exactly CUB's images: the reference silently shifts every label after a missing image
(it masks by position), so here a missing or extra image stops the run, naming it.
"""

from __future__ import annotations

import os
from pathlib import Path

from qpm_dist.data.cub import CUBMetadata
from qpm_dist.errors import MissingInput

__all__ = ["resolve_image_root", "check_same_images"]

VARIANT = "CUB_fixed"  # the folder the reference reads (the download also has CUB_black/, CUB_random/)
MAX_LISTED = 5


def resolve_image_root(root: str | Path) -> Path:
    """The folder holding train/ and test/: `root` itself or root/CUB_fixed (the reference's data.root)."""
    root = Path(root)
    for candidate in (root, root / VARIANT):
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    raise MissingInput(f"data.root: {root} holds neither train/ and test/ nor {VARIANT}/train/ and "
                            f"{VARIANT}/test/ (TravelingBirds: one sub-folder per CUB class in each)")


def _listing(folder: Path) -> set[str]:
    """'<class>/<file>' of every file one level below `folder` (hidden files such as .DS_Store ignored)."""
    found = set()
    for entry in os.scandir(folder):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            found.add(entry.name)  # a stray file next to the class folders
            continue
        found.update(f"{entry.name}/{f.name}" for f in os.scandir(entry.path) if not f.name.startswith("."))
    return found


def check_same_images(folder: Path, meta: CUBMetadata) -> None:
    """`folder` holds exactly the images of CUB's images.txt (one listing per class folder, no file reads)."""
    found, expected = _listing(folder), set(meta.paths)
    for error, what, names in ((MissingInput, "missing", sorted(expected - found)),
                               (ValueError, "not in CUB's images.txt", sorted(found - expected))):
        if names:
            listed = ", ".join(str(folder / n) for n in names[:MAX_LISTED]) + (" ..." if len(names) > MAX_LISTED
                                                                                else "")
            raise error(f"data.root: {len(names)} TravelingBirds image(s) {what} ({meta.root / 'images.txt'} "
                        f"lists {len(expected)}; data.cub_root must be the CUB these images were made from): {listed}")
