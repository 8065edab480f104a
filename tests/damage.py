"""Fault injection for the tests of `tests/test_faults_*.py`: damage a file the project writes or reads in the
ways storage and transfers damage files (cut short, a flipped byte, a zeroed block), at chosen offsets.

Each fault-injection test damages one artefact at several offsets and asserts one of two outcomes: the damage is
detected with a message naming the file, or the result is bitwise what it would have been without the damage.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator


@dataclass(frozen=True)
class Damage:
    """One way of damaging a file; `apply(path)` edits the file in place."""

    name: str
    apply: Callable[[Path], None]

    def __repr__(self) -> str:  # readable pytest ids
        return self.name


def truncate(keep: int | Callable[[int], int]) -> Damage:
    """Cut the file to `keep` bytes (or `keep(size)`), as an interrupted copy or a full disk does."""
    def apply(path: Path) -> None:
        size = path.stat().st_size
        n = keep(size) if callable(keep) else keep
        with open(path, "r+b") as f:
            f.truncate(max(0, min(n, size)))
    return Damage(f"truncate({keep if not callable(keep) else 'f'})", apply)


def flip_byte(offset: int | Callable[[int], int]) -> Damage:
    """Invert every bit of the byte at `offset` (or `offset(size)`; negative counts from the end)."""
    def apply(path: Path) -> None:
        size = path.stat().st_size
        at = offset(size) if callable(offset) else offset
        at = at % size
        with open(path, "r+b") as f:
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0xFF]))
    return Damage(f"flip_byte({offset if not callable(offset) else 'f'})", apply)


def flip_bit(offset: int | Callable[[int], int], bit: int = 0) -> Damage:
    """Invert one bit of the byte at `offset` (a single-bit error: in a text file the byte often stays a valid
    character, e.g. a hex digit '0' <-> '1', so the file still parses)."""
    def apply(path: Path) -> None:
        size = path.stat().st_size
        at = (offset(size) if callable(offset) else offset) % size
        with open(path, "r+b") as f:
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ (1 << bit)]))
    return Damage(f"flip_bit({offset if not callable(offset) else 'f'},{bit})", apply)


def zero_block(offset: int | Callable[[int], int], length: int = 512) -> Damage:
    """Overwrite `length` bytes from `offset` with zeros, as a bad sector or a sparse hole does."""
    def apply(path: Path) -> None:
        size = path.stat().st_size
        at = (offset(size) if callable(offset) else offset) % size
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(bytes(min(length, size - at)))
    return Damage(f"zero_block({offset if not callable(offset) else 'f'},{length})", apply)


def standard_damages() -> list[Damage]:
    """The damages every artefact is tested with: cut at several points, a byte flipped near the start,
    in the middle and at the end, and a zeroed block in the middle."""
    return [
        truncate(0),
        truncate(lambda size: size // 2),
        truncate(lambda size: size - 100),
        truncate(lambda size: size - 1),
        flip_byte(16),
        flip_byte(lambda size: size // 2),
        flip_byte(-1),
        zero_block(lambda size: size // 2),
    ]


def damaged_copies(src: Path, dst_root: Path, damages: list[Damage] | None = None) -> Iterator[tuple[Damage, Path]]:
    """Yield (damage, path) for a fresh copy of `src` (a file or a folder) under `dst_root`, per damage.
    For a folder, the caller damages the file inside the copy it wants (`damage.apply(copy / name)`)."""
    for i, damage in enumerate(damages or standard_damages()):
        dst = dst_root / f"{i}_{src.name}"
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copyfile(src, dst)
        yield damage, dst


def damaged_folder_copies(src: Path, name: str, dst_root: Path,
                          damages: list[Damage] | None = None) -> Iterator[tuple[Damage, Path]]:
    """Yield (damage, folder) for a copy of folder `src` per damage, with the file `name` in it copied and
    damaged and every other file hard-linked (cheap for large converted folders; never written to)."""
    for i, damage in enumerate(damages or standard_damages()):
        dst = dst_root / f"{i}_{src.name}"
        dst.mkdir(parents=True)
        for entry in src.iterdir():
            if entry.name == name:
                shutil.copyfile(entry, dst / name)
                damage.apply(dst / name)
            else:
                try:
                    (dst / entry.name).hardlink_to(entry)
                except OSError:  # another file system
                    shutil.copyfile(entry, dst / entry.name)
        yield damage, dst


def damaged_tree_copies(src: Path, name: str, dst_root: Path,
                        damages: list[Damage] | None = None) -> Iterator[tuple[Damage, Path]]:
    """Like damaged_folder_copies for a folder with sub-folders (a source dataset): a copy of the tree per damage,
    files hard-linked (copied across file systems), `name` (a path relative to `src`) copied and damaged."""
    def link_or_copy(a: str, b: str) -> None:
        try:
            Path(b).hardlink_to(a)
        except OSError:
            shutil.copyfile(a, b)

    for i, damage in enumerate(damages or standard_damages()):
        dst = dst_root / f"{i}_{src.name}"
        shutil.copytree(src, dst, copy_function=link_or_copy)
        (dst / name).unlink()  # a hard link to the original: replace, do not write through it
        shutil.copyfile(src / name, dst / name)
        damage.apply(dst / name)
        yield damage, dst
