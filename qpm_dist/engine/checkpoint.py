"""Checkpoint directories: atomic publication, a manifest of every file, retention, and choosing where to resume.

Layout: `<stage>/checkpoints/step_000001234/` holding the strategy's files (`state.pt` for DDP,
DeepSpeed's shards otherwise), `meta.json` and `manifest.json`. Every rank writes into `step_….tmp/` and
hashes the files it wrote (in parallel, while they are still in its page cache); rank 0 collects the records,
adds `meta.json` and, last, the manifest (relative path, size and sha256 of every file, itself
digested), then renames the folder. A folder without a valid manifest is therefore incomplete by definition, and
a crash mid-save leaves only a `.tmp` folder, which is ignored (and removed by the next save).

`resume=auto` walks complete checkpoints newest first and takes the first whose every file matches its manifest
(sizes first, which is cheap; then digests, each rank hashing its share). A checkpoint that does not match is
skipped with a warning naming the file and why, so a torn ZeRO shard costs progress, not the run; the verdict is
gathered from every rank, so every rank resumes from the same checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from qpm_dist import dist
from qpm_dist.errors import BadInput
from qpm_dist.utils import atomic_write_text, file_sha256, log

_PREFIX = "step_"
META = "meta.json"
MANIFEST = "manifest.json"
_MANIFEST_FORMAT = "qpm-dist/checkpoint-manifest-v1"


def capture_rng() -> dict:
    """This rank's RNG states, in a form torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def record_files(directory: Path, paths: Iterable[Path]) -> dict[str, dict]:
    """{path relative to `directory`: {"size", "sha256"}} for these files."""
    directory = Path(directory)
    return {Path(p).relative_to(directory).as_posix(): {"size": Path(p).stat().st_size, "sha256": file_sha256(p)}
            for p in paths}


def _files_digest(files: dict[str, dict]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def write_manifest(directory: Path, files: dict[str, dict]) -> None:
    body = {"format": _MANIFEST_FORMAT, "files": files, "digest": _files_digest(files)}
    atomic_write_text(Path(directory) / MANIFEST, json.dumps(body, indent=1, sort_keys=True))


def read_manifest(directory: Path) -> dict[str, dict]:
    """The manifest's file records; ValueError saying what is wrong with it (missing, unreadable, edited)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ValueError("missing (the save did not finish, or a version without manifests wrote it)")
    try:
        body = json.loads(path.read_bytes().decode("utf-8"))
        files = body["files"]
        if body["format"] != _MANIFEST_FORMAT or not all(
                isinstance(r["size"], int) and isinstance(r["sha256"], str) for r in files.values()):
            raise ValueError("unexpected content")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"unreadable ({type(exc).__name__}: {exc})") from None
    if body.get("digest") != _files_digest(files):
        raise ValueError("its own digest does not match (edited or damaged)")
    return files


def damage_of(directory: Path, rank: int = 0, world_size: int = 1) -> list[str]:
    """What is wrong with a published checkpoint ([] if nothing), one entry per file, naming the file.

    Sizes and the file set are checked by every rank (cheap); then this rank hashes its share of the files
    (every `world_size`-th, from `rank`), so together the ranks hash each file once."""
    directory = Path(directory)
    try:
        files = read_manifest(directory)
    except ValueError as exc:
        return [f"{MANIFEST}: {exc}"]
    problems = []
    try:
        present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()} - {MANIFEST}
        for rel in sorted(present - files.keys()):
            problems.append(f"{rel}: not in {MANIFEST} (written after the save?)")
        for rel, record in sorted(files.items()):
            path = directory / rel
            if not path.is_file():
                problems.append(f"{rel}: missing")
            elif path.stat().st_size != record["size"]:
                problems.append(f"{rel}: {path.stat().st_size} bytes, {record['size']} recorded")
        if problems:
            return problems
        for i, (rel, record) in enumerate(sorted(files.items())):
            if i % world_size == rank and file_sha256(directory / rel) != record["sha256"]:
                problems.append(f"{rel}: sha256 differs from the recorded one (content changed)")
    except OSError as exc:  # a bad sector, a vanished file: this rank must still report, or the others wait
        problems.append(f"{Path(exc.filename or directory).name}: unreadable ({exc.strerror or exc})")
    return problems


class DamagedCheckpoint(BadInput, ValueError):
    """The checkpoint the user named (run.resume=<dir>) does not match its manifest: bad input, exit 2."""


class CheckpointManager:
    def __init__(self, root: Path, keep: int) -> None:
        self.root = Path(root)
        self.keep = keep

    def save(self, strategy: Any, global_step: int, client_state: dict, meta: dict) -> Path:
        """Collective: every rank calls it with the same step."""
        tag = f"{_PREFIX}{global_step:09d}"
        final, tmp = self.root / tag, self.root / f"{tag}.tmp"
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        written = strategy.save(tmp, client_state)  # the files this rank wrote
        records = dist.all_gather_object(record_files(tmp, written))  # also: every rank's files are complete
        if dist.is_main():
            atomic_write_text(tmp / META, json.dumps({**meta, "global_step": global_step}, indent=1))
            files = {rel: record for rank_records in records for rel, record in rank_records.items()}
            unclaimed = [p for p in sorted(tmp.rglob("*"))
                         if p.is_file() and p.relative_to(tmp).as_posix() not in files]
            files.update(record_files(tmp, unclaimed))  # meta.json, and anything a strategy did not report
            write_manifest(tmp, files)  # last: it makes the checkpoint complete
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        for old in self.complete()[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)
        for partial in self.root.glob(f"{_PREFIX}*.tmp"):
            shutil.rmtree(partial, ignore_errors=True)

    def complete(self) -> list[Path]:
        """Published checkpoints, newest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob(f"{_PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp")]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def damage(self, path: Path) -> list[str]:
        """Collective: what every rank found wrong with checkpoint `path` (the same list on every rank)."""
        found = dist.all_gather_object(damage_of(path, dist.rank(), dist.world_size()))
        return list(dict.fromkeys(problem for rank_problems in found for problem in rank_problems))

    def find_resumable(self) -> Path | None:
        """Collective: the newest checkpoint whose every file matches its manifest, the same on every rank;
        None (and a warning saying why, if there were checkpoints) to start fresh."""
        partial = sorted(self.root.glob(f"{_PREFIX}*.tmp")) if self.root.is_dir() else []
        candidates = dist.broadcast_object([str(p) for p in self.complete()])  # rank 0's listing for every rank
        reasons = [f"{p.name}: its save did not finish" for p in partial]
        if dist.is_main():
            for p in partial:
                log.warning("skipping partial checkpoint %s (its save did not finish)", p)
        for candidate in map(Path, candidates):
            problems = self.damage(candidate)
            if not problems:
                return candidate
            if dist.is_main():
                log.warning("skipping damaged checkpoint %s: %s", candidate, "; ".join(problems))
            reasons.append(f"{candidate.name}: {'; '.join(problems)}")
        if reasons and dist.is_main():
            log.warning("starting fresh: every checkpoint in %s is damaged (%s)", self.root, " | ".join(reasons))
        return None

    def require_intact(self, path: Path) -> None:
        """Collective: raise, naming the damaged files, unless checkpoint `path` matches its manifest."""
        problems = self.damage(path)
        if problems:
            raise DamagedCheckpoint(f"run.resume: checkpoint {path} is damaged: {'; '.join(problems)}")


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / META).read_text())
