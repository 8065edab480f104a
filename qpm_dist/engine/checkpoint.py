"""Checkpoint directories: atomic publication, retention, and choosing where to resume.

Layout: `<stage>/checkpoints/step_000001234/` holding the strategy's files (`state.pt` for DDP,
DeepSpeed's shards otherwise) and `meta.json`. Every rank writes into `step_….tmp/`; after a barrier rank
0 adds `meta.json` and renames the folder, so a folder without the `.tmp` suffix is always complete. A
crash mid-save leaves only a `.tmp` folder, which is ignored (and removed by the next save).
`resume=auto` walks complete checkpoints newest first and skips any that cannot be read back, with a
warning, so a corrupted newest checkpoint costs progress, not the run.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from qpm_dist import dist
from qpm_dist.utils import atomic_write_text, log

_PREFIX = "step_"


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
        strategy.save(tmp, client_state)
        dist.barrier()
        if dist.is_main():
            atomic_write_text(tmp / "meta.json", json.dumps({**meta, "global_step": global_step}, indent=1))
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

    def find_resumable(self, verify: Callable[[Path], None]) -> Path | None:
        """Rank 0 picks the newest checkpoint that reads back; the choice is broadcast to every rank."""
        choice = None
        if dist.is_main():
            for partial in sorted(self.root.glob(f"{_PREFIX}*.tmp")):
                log.warning("skipping partial checkpoint %s (its save did not finish)", partial)
            for path in self.complete():
                try:
                    if not (path / "meta.json").is_file():
                        raise FileNotFoundError("meta.json missing")
                    json.loads((path / "meta.json").read_text())
                    verify(path)
                except Exception as exc:  # noqa: BLE001 - any failure means: do not resume from it
                    log.warning("skipping unreadable checkpoint %s: %s", path, exc)
                    continue
                choice = str(path)
                break
        choice = dist.broadcast_object(choice)
        return Path(choice) if choice else None


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())
