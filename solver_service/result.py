"""The result every backend returns, and its `.npz` file format (plain arrays and strings, no pickle)."""
from __future__ import annotations

import dataclasses
import io
import json
import math
from typing import Any

import numpy as np

from .util import atomic_write_bytes

_FLOATS = ("objective", "assignment_term", "penalty_term", "bias_term", "bound", "gap", "tau")
_STRINGS = ("status", "backend", "log", "problem_hash", "options_hash")


class ResultError(ValueError):
    """A result that breaks a guarantee (cardinalities, distinct classes, objective)."""


@dataclasses.dataclass(eq=False)
class Result:
    selected: np.ndarray        # n ascending feature ids
    assignment: np.ndarray      # C x n bool, columns in the order of `selected`
    objective: float            # assignment_term - penalty_term + bias_term
    assignment_term: float
    penalty_term: float
    bias_term: float
    bound: float                # valid upper bound on the optimum, NaN if unknown
    gap: float                  # (bound - objective) / max(|objective|, 1e-9), NaN if no bound
    status: str                 # "optimal", "time_limit" or "heuristic"
    backend: str
    log: str = ""
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    tau: float = math.nan
    n_penalised_pairs: int = 0
    problem_hash: str = ""
    options_hash: str = ""
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @staticmethod
    def relative_gap(objective: float, bound: float) -> float:
        if not math.isfinite(bound):
            return math.nan
        return max(0.0, bound - objective) / max(abs(objective), 1e-9)

    def summary(self) -> str:
        return (
            f"backend={self.backend} status={self.status} objective={self.objective:.6f} "
            f"(assign {self.assignment_term:.4f} - penalty {self.penalty_term:.4f} + bias {self.bias_term:.4f}) "
            f"bound={self.bound:.6f} gap={self.gap:.3%}"
        )

    # ----------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        payload: dict[str, np.ndarray] = {
            "selected": np.asarray(self.selected, dtype=np.int64),
            "assignment": np.asarray(self.assignment, dtype=bool),
            "n_penalised_pairs": np.asarray(self.n_penalised_pairs, dtype=np.int64),
            "timings": np.asarray(json.dumps(self.timings, sort_keys=True)),
            "options": np.asarray(json.dumps(self.options, sort_keys=True)),
        }
        payload.update({f: np.asarray(float(getattr(self, f))) for f in _FLOATS})
        payload.update({f: np.asarray(str(getattr(self, f))) for f in _STRINGS})
        buf = io.BytesIO()
        np.savez_compressed(buf, **payload)
        return buf.getvalue()

    def save(self, path) -> None:
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "result.npz") -> "Result":
        """Parse a result file's bytes; any damage raises ResultError naming `source` (a file, or a job and URL)."""
        return cls._parse(lambda: np.load(io.BytesIO(data), allow_pickle=False), source)

    @classmethod
    def load(cls, path) -> "Result":
        return cls._parse(lambda: np.load(path, allow_pickle=False), str(path))

    @classmethod
    def _parse(cls, open_npz, source: str) -> "Result":
        """A damaged .npz fails in many ways (BadZipFile, zlib.error, EOFError, ValueError, ...): all become
        one ResultError naming the source, so callers can drop the file or fall back instead of crashing."""
        try:
            return cls._from_npz(open_npz())
        except FileNotFoundError:  # missing, not damaged: the caller decides
            raise
        except ResultError as exc:
            raise ResultError(f"{source}: {exc}") from None
        except Exception as exc:
            raise ResultError(f"{source}: unreadable result file ({type(exc).__name__}: {exc})") from exc

    @classmethod
    def _from_npz(cls, npz) -> "Result":
        with npz:
            missing = [k for k in ("selected", "assignment", *_FLOATS, *_STRINGS) if k not in npz.files]
            if missing:
                raise ResultError(f"lacks {missing}")
            kw: dict[str, Any] = {f: float(npz[f]) for f in _FLOATS}
            kw.update({f: str(npz[f]) for f in _STRINGS})
            kw["selected"] = npz["selected"]
            kw["assignment"] = npz["assignment"]
            kw["n_penalised_pairs"] = int(npz["n_penalised_pairs"]) if "n_penalised_pairs" in npz.files else 0
            kw["timings"] = json.loads(str(npz["timings"])) if "timings" in npz.files else {}
            kw["options"] = json.loads(str(npz["options"])) if "options" in npz.files else {}
        sel, W = kw["selected"], kw["assignment"]
        if sel.ndim != 1 or sel.dtype.kind not in "iu":
            raise ResultError(f"selected: expected a 1-D integer array, got {sel.dtype} {sel.shape}")
        if W.dtype != bool or W.ndim != 2 or W.shape[1] != sel.size:
            raise ResultError(f"assignment: expected a bool array of shape (C, {sel.size}), got {W.dtype} {W.shape}")
        bad = [f for f in ("objective", "assignment_term", "penalty_term", "bias_term") if not math.isfinite(kw[f])]
        if bad:
            raise ResultError(f"{bad[0]}: expected a finite number, got {kw[bad[0]]}")
        return cls(**kw)


def check_selection(selected, assignment, n_all_features: int, n_classes: int, n: int, k: int) -> None:
    """Raise ResultError unless the selection obeys the problem's constraints: exactly n distinct features
    (ascending ids in [0, F)), a C x n bool assignment with exactly k per class. Needs only the problem's
    sizes, so the service can check a cached result cheaply (validate.py adds the objective check)."""
    F, C = n_all_features, n_classes
    sel = np.asarray(selected)
    if sel.ndim != 1 or sel.dtype.kind not in "iu":
        raise ResultError(f"selected: expected a 1-D integer array, got dtype {sel.dtype} shape {sel.shape}")
    if sel.size != n:
        raise ResultError(f"selected: expected exactly n = {n} features, got {sel.size}")
    if sel.size and (sel.min() < 0 or sel.max() >= F):
        raise ResultError(f"selected: feature ids must lie in [0, {F}), got [{sel.min()}, {sel.max()}]")
    if np.any(np.diff(sel) <= 0):
        raise ResultError("selected: expected distinct feature ids in ascending order")
    W = np.asarray(assignment)
    if W.dtype != bool or W.shape != (C, n):
        raise ResultError(f"assignment: expected a bool array of shape (C, n) = ({C}, {n}), got {W.dtype} {W.shape}")
    counts = W.sum(axis=1)
    bad = np.flatnonzero(counts != k)
    if bad.size:
        raise ResultError(f"assignment: expected exactly k = {k} features per class; class {bad[0]} has "
                          f"{counts[bad[0]]} ({bad.size} classes wrong)")
