"""The files stages hand to each other, and the rank bookkeeping of writing and reading them.

Every stage runs on every rank. A file is written once, by rank 0, atomically, and every rank waits until it
exists (`on_main`); a value every rank must hold identically is read or computed on rank 0 and broadcast
(`from_main`), so ranks can never disagree about what a file said. Stage bodies call these helpers instead
of testing their rank and placing barriers themselves.

The generic files every stage folder may hold are named here; a method's own files are named once, next to
the stage that writes them, and read through that module's reader.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
from torch import nn

from qpm_dist import dist
from qpm_dist.errors import BadInput
from qpm_dist.models.io import load_classifier, save_classifier, state_digest
from qpm_dist.models.net import Classifier
from qpm_dist.utils import atomic_write_text, file_sha256

MODEL = "model.pt"  # a classifier (models.io), written by every stage that produces a model
RESULT = "result.json"  # a training phase's result (test accuracy, steps, ...)
METRICS = "metrics.json"  # an evaluate stage's metrics: {model name: {metric: value}}
RECORD = "stage.json"  # the runner's record of a finished stage (key, config, summary); marks it finished
STAGE_CONFIG = "stage_config.json"  # what entered a stage's key, written when it starts (compared by later runs)

# Files whose numbers must all be finite before the runner marks a stage finished: weights and a training
# phase's result. Other files may hold NaN/inf on purpose (an undefined metric, a solver without a bound).
MUST_BE_FINITE = (MODEL, RESULT)
# What a stage folder holds besides its outputs: resumable state, logs appended to while it runs, the marker.
NOT_OUTPUTS = ("checkpoints", "wandb", "metrics.jsonl", RECORD, STAGE_CONFIG)


class DamagedOutput(BadInput, ValueError):
    """A finished stage's file is missing or differs from what the stage wrote; the message names it."""

T = TypeVar("T")


def on_main(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Rank 0 runs `fn(*args, **kwargs)`; every rank waits until it is done."""
    if dist.is_main():
        fn(*args, **kwargs)
    dist.barrier()


def from_main(fn: Callable[[], T]) -> T:
    """Rank 0 computes `fn()`; every rank returns that value (broadcast)."""
    return dist.broadcast_object(fn() if dist.is_main() else None)


def write_json(path: Path, obj: Any) -> None:
    on_main(atomic_write_text, Path(path), json.dumps(obj, indent=1, default=str))


def read_json(path: Path) -> Any:
    return from_main(lambda: json.loads(Path(path).read_text()))


def read_npz(path: Path) -> dict[str, np.ndarray]:
    def read() -> dict[str, np.ndarray]:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}

    return from_main(read)


def same_on_every_rank(digest: str, what: str) -> list[str]:
    """Every rank's `digest` (rank order); raises if they differ (e.g. a sparse head built on every rank)."""
    digests = dist.all_gather_object(digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"{what} differs across ranks: {digests}")
    return digests


def save_model(path: Path, model: nn.Module) -> list[str]:
    """Check that every rank holds the same model, write it once; returns the ranks' digests."""
    digests = same_on_every_rank(state_digest(model.state_dict()), f"the model for {path}")
    on_main(save_classifier, Path(path), model)
    return digests


def load_model(ctx, stage: str) -> Classifier:
    """The classifier `stage` wrote (every rank reads the file itself)."""
    return load_classifier(ctx.outputs[stage] / MODEL, ctx.cfg.model)


def output_files(out_dir: Path) -> list[Path]:
    """The files a stage wrote into `out_dir` (its outputs), in a fixed order."""
    out_dir = Path(out_dir)
    return sorted(p for p in out_dir.rglob("*")
                  if p.is_file() and p.relative_to(out_dir).parts[0] not in NOT_OUTPUTS)


def output_digests(out_dir: Path) -> dict[str, str]:
    """{path relative to out_dir: sha256} of a stage's outputs, recorded when the stage is marked finished."""
    return {p.relative_to(out_dir).as_posix(): file_sha256(p) for p in output_files(out_dir)}


def record_digest(record: dict) -> str:
    """sha256 of a stage record as stored (JSON), without its own `digest` entry."""
    stored = json.loads(json.dumps({k: v for k, v in record.items() if k != "digest"}, default=str))
    return hashlib.sha256(json.dumps(stored, sort_keys=True).encode()).hexdigest()


def check_outputs(out_dir: Path, record: dict) -> None:
    """Raise DamagedOutput if a finished stage's record or outputs are not what the stage wrote."""
    out_dir = Path(out_dir)
    if "digest" in record and record_digest(record) != record["digest"]:
        raise DamagedOutput(f"{out_dir / RECORD}: damaged (its content does not match its digest); delete "
                            f"{out_dir} to recompute the stage")
    for name, digest in (record.get("outputs") or {}).items():  # records of older code have none
        path = out_dir / name
        problem = ("missing" if not path.is_file() else
                   "differs from what the stage wrote" if file_sha256(path) != digest else "")
        if problem:
            raise DamagedOutput(f"{path}: {problem} (sha256 recorded in {out_dir / RECORD}); the file was damaged "
                                f"or edited: delete {out_dir} to recompute the stage")


def read_record(out_dir: Path) -> dict:
    """A finished stage's record (rank 0 reads and checks it with the outputs, every rank gets the verdict)."""
    def read() -> dict | str:
        path = Path(out_dir) / RECORD
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            return f"{path}: damaged, not a readable stage record ({exc}); delete {out_dir} to recompute the stage"
        try:
            check_outputs(out_dir, record)
        except DamagedOutput as exc:
            return str(exc)
        return record

    result = from_main(read)
    if isinstance(result, str):
        raise DamagedOutput(result)
    return result


def nonfinite_numbers(path: Path) -> list[str]:
    """Where a model file or a result JSON holds NaN/inf ("<tensor or key>=<value>", at most a few)."""
    path = Path(path)
    if path.suffix == ".json":
        bad: list[str] = []

        def walk(value: Any, where: str) -> None:
            if isinstance(value, float) and not math.isfinite(value):
                bad.append(f"{where}={value}")
            elif isinstance(value, dict):
                for k, v in value.items():
                    walk(v, f"{where}.{k}" if where else str(k))
            elif isinstance(value, list):
                for i, v in enumerate(value):
                    walk(v, f"{where}[{i}]")

        walk(json.loads(path.read_text()), "")
        return bad[:5]
    import torch

    saved = torch.load(path, map_location="cpu", weights_only=True)
    state = saved.get("state_dict", saved) if isinstance(saved, dict) else {}
    return [f"{name} ({int((~torch.isfinite(t)).sum())} NaN/inf values)" for name, t in state.items()
            if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())][:5]


def nonfinite_outputs(out_dir: Path) -> list[str]:
    """The MUST_BE_FINITE files of a stage folder that hold NaN/inf, each with where ("<file>: <where>, ...")."""
    found = []
    for name in MUST_BE_FINITE:
        path = Path(out_dir) / name
        if path.is_file():
            bad = nonfinite_numbers(path)
            if bad:
                found.append(f"{path}: {', '.join(bad)}")
    return found
