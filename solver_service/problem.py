"""The QPM selection/assignment problem as data: validation, hashing and the `.npz` file format.

Everything that can be wrong with an input is checked here, before any expensive work, and every
error names the field and what was expected. A problem is identified by a content hash so that a
solve is never repeated for the same input (the service caches by it, the trainer keys stages by it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import zipfile
import zlib
from typing import Any, Mapping

import numpy as np

from .util import atomic_write_bytes

ARRAY_FIELDS = ("A", "R", "b")
INT_FIELDS = ("n_features", "n_per_class")

BACKENDS = ("auto", "fast", "highs", "gurobi")
PENALTY_MODES = ("clique", "all")

# Solver options that may travel inside problem.npz. Types are checked in `normalise_options`.
OPTION_TYPES: dict[str, type] = {
    "backend": str,         # one of BACKENDS
    "time_limit": float,    # seconds of wall time for the backend (hard cap)
    "mip_gap": float,       # relative gap at which exact backends stop
    "threads": int,         # solver threads (exact backends; BLAS threads in the service worker)
    "seed": int,            # random seed (fast: all randomness; gurobi/highs: solver seed)
    "tau": float,           # penalise exactly the pairs with R+ >= tau (skips the clique search)
    "penalty": str,         # "clique" (spec 5.5, default) or "all" (every pair with R+ > 0)
    "effort": float,        # multiplies the iteration budgets of `fast` (1.0 = default)
    "prefer_gurobi": bool,  # lets `auto` pick gurobi when it is installed and licensed
}
# Absolute bounds of the numeric options, whoever solves (a service may set narrower ones, see limits.py):
# more threads than any machine has only costs memory; Gurobi's Seed parameter ends at 2e9; effort 1e4 is
# 2e7 tabu iterations; a week is longer than any solve this problem needs.
OPTION_BOUNDS: dict[str, tuple[float, float]] = {
    "threads": (0, 1024),
    "seed": (0, 2_000_000_000),
    "effort": (0, 1e4),
    "time_limit": (0, 7 * 86400.0),
}
MAX_NPZ_MEMBERS = 64  # the fields and one entry per option are far fewer


class ProblemError(ValueError):
    """An invalid problem; `field` names the offending input."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def normalise_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Type-check and canonicalise solver options (unknown keys are errors, None values are dropped)."""
    out: dict[str, Any] = {}
    for key, value in (options or {}).items():
        if value is None:
            continue
        if key not in OPTION_TYPES:
            raise ProblemError(key, f"unknown option; expected one of {sorted(OPTION_TYPES)}")
        typ = OPTION_TYPES[key]
        if isinstance(value, np.ndarray):
            if value.ndim != 0:
                raise ProblemError(key, f"expected a scalar, got an array of shape {value.shape}")
            value = value.item()
        if typ is bool:
            if not isinstance(value, (bool, np.bool_)):
                raise ProblemError(key, f"expected a bool, got {value!r}")
            value = bool(value)
        elif typ is int:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ProblemError(key, f"expected an integer, got {value!r}")
            value = int(value)
            if value < 0:
                raise ProblemError(key, f"expected an integer >= 0, got {value}")
        elif typ is float:
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ProblemError(key, f"expected a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise ProblemError(key, f"expected a finite number, got {value}")
        elif typ is str:
            if not isinstance(value, str):
                raise ProblemError(key, f"expected a string, got {value!r}")
        out[key] = value
    if "backend" in out and out["backend"] not in BACKENDS:
        raise ProblemError("backend", f"expected one of {BACKENDS}, got {out['backend']!r}")
    if "penalty" in out and out["penalty"] not in PENALTY_MODES:
        raise ProblemError("penalty", f"expected one of {PENALTY_MODES}, got {out['penalty']!r}")
    if "tau" in out and out.get("penalty", "clique") != "clique":
        raise ProblemError("tau", "give either tau or penalty='all', not both")
    for key in ("time_limit", "effort"):
        if key in out and out[key] <= 0:
            raise ProblemError(key, f"expected a positive number, got {out[key]}")
    for key, (low, high) in OPTION_BOUNDS.items():
        if key in out and not low <= out[key] <= high:
            raise ProblemError(key, f"expected a value in [{low:g}, {high:g}], got {out[key]:g}")
    if "mip_gap" in out and not 0 <= out["mip_gap"] < 1:
        raise ProblemError("mip_gap", f"expected 0 <= mip_gap < 1, got {out['mip_gap']}")
    return out


def npz_member_headers(data: bytes) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{member name without .npy: (shape, dtype)} of an `.npz` archive, read from each member's npy header
    only: nothing is expanded beyond the first bytes of each member, so the caller can refuse an upload by
    the size it would take in memory before loading it."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            members = zf.infolist()
            if len(members) > MAX_NPZ_MEMBERS:
                raise ProblemError("problem.npz", f"{len(members)} entries, more than the {MAX_NPZ_MEMBERS} allowed")
            headers = {}
            for info in members:
                with zf.open(info) as fp:
                    version = np.lib.format.read_magic(fp)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
                    else:
                        raise ValueError(f"npy format version {version} of {info.filename} is not supported")
                headers[info.filename.removesuffix(".npy")] = (tuple(shape), np.dtype(dtype))
            return headers
    except ProblemError:
        raise
    except Exception as exc:  # zipfile, zlib and npy header errors surface as many types
        raise ProblemError("problem.npz", f"expected a numpy .npz archive ({exc})") from exc


def _check_real_array(name: str, value: Any, ndim: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise ProblemError(name, f"expected a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ProblemError(name, f"expected a {ndim}-D array, got shape {arr.shape}")
    if arr.size and not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ProblemError(name, f"expected finite values, found {bad} NaN/inf entries")
    return arr


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, np.ndarray):
        if value.ndim != 0:
            raise ProblemError(name, f"expected a scalar integer, got an array of shape {value.shape}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ProblemError(name, f"expected an integer, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """A validated QPM problem. Construct with `Problem.create(...)` or `Problem.load(path)`.

    A: F x C feature-class correlation in [-1, 1]; R: F x F symmetric feature similarity;
    b: F locality bias; select `n_features` features and `n_per_class` of them for every class.
    """

    A: np.ndarray
    R: np.ndarray
    b: np.ndarray
    n_features: int
    n_per_class: int
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def create(cls, A, R, b, n_features, n_per_class, options=None, **more_options) -> "Problem":
        opts = dict(options or {})
        opts.update(more_options)
        A = _check_real_array("A", A, 2)
        F, C = A.shape
        if F < 1 or C < 1:
            raise ProblemError("A", f"expected at least one feature and one class, got shape {A.shape}")
        if A.size and np.max(np.abs(A)) > 1 + 1e-6:
            raise ProblemError("A", f"expected values normalised to [-1, 1] (spec 5.2), max |A| = {np.max(np.abs(A)):.6g}")
        R = _check_real_array("R", R, 2)
        if R.shape != (F, F):
            raise ProblemError("R", f"expected shape (F, F) = ({F}, {F}) to match A, got {R.shape}")
        asym = float(np.max(np.abs(R - R.T))) if R.size else 0.0
        if asym > 1e-6 * max(1.0, float(np.max(np.abs(R)))):
            raise ProblemError("R", f"expected a full symmetric matrix (spec 5.3), max |R - R^T| = {asym:.3g}")
        b = _check_real_array("b", b, 1)
        if b.shape != (F,):
            raise ProblemError("b", f"expected shape (F,) = ({F},) to match A, got {b.shape}")
        n = _check_int("n_features", n_features)
        k = _check_int("n_per_class", n_per_class)
        if not 1 <= n <= F:
            raise ProblemError("n_features", f"expected 1 <= n_features <= F = {F}, got {n}")
        if not 1 <= k <= n:
            raise ProblemError("n_per_class", f"expected 1 <= n_per_class <= n_features = {n}, got {k}")
        if C > math.comb(n, k):
            raise ProblemError(
                "n_per_class",
                f"{C} classes need distinct sets of {k} out of {n} features, but only C({n},{k}) = "
                f"{math.comb(n, k)} exist; increase n_features or change n_per_class",
            )
        return cls(A, R, b, n, k, normalise_options(opts))

    # ----------------------------------------------------------------------------------------
    @property
    def n_all_features(self) -> int:
        return int(self.A.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.A.shape[1])

    def option(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)

    def with_options(self, **options) -> "Problem":
        """A copy with options updated (None leaves an option unchanged)."""
        merged = dict(self.options)
        merged.update({k: v for k, v in options.items() if v is not None})
        return dataclasses.replace(self, options=normalise_options(merged))

    def content_hash(self) -> str:
        """sha256 over each array's name, dtype, shape and bytes, then the integer fields."""
        h = hashlib.sha256()
        for name in ARRAY_FIELDS:
            arr = np.ascontiguousarray(getattr(self, name))
            h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
            h.update(arr.tobytes())
        h.update(f"n_features={self.n_features}|n_per_class={self.n_per_class}".encode())
        return h.hexdigest()

    def options_hash(self) -> str:
        """sha256 of the canonical JSON of the options (a different backend or seed is a different job)."""
        return hashlib.sha256(json.dumps(dict(self.options), sort_keys=True).encode()).hexdigest()

    def job_id(self) -> str:
        return f"{self.content_hash()[:32]}-{self.options_hash()[:16]}"

    # ----------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The `.npz` file format: arrays, 0-d integer fields, one 0-d entry per option. No pickle."""
        payload: dict[str, np.ndarray] = {name: np.asarray(getattr(self, name)) for name in ARRAY_FIELDS}
        payload["n_features"] = np.asarray(self.n_features, dtype=np.int64)
        payload["n_per_class"] = np.asarray(self.n_per_class, dtype=np.int64)
        for key, value in self.options.items():
            payload[f"option_{key}"] = np.asarray(value)
        buf = io.BytesIO()
        np.savez(buf, **payload)
        return buf.getvalue()

    def save(self, path) -> None:
        atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> "Problem":
        try:
            npz = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as exc:  # zipfile/format errors surface as many types
            raise ProblemError("problem.npz", f"expected a numpy .npz archive ({exc})") from exc
        return cls._from_npz(npz)

    @classmethod
    def load(cls, path) -> "Problem":
        try:
            npz = np.load(path, allow_pickle=False)
        except OSError:  # missing/unreadable file: the OS error says it best
            raise
        except Exception as exc:
            raise ProblemError(str(path), f"expected a numpy .npz archive ({exc})") from exc
        return cls._from_npz(npz, str(path))

    @classmethod
    def _from_npz(cls, npz, source: str = "problem.npz") -> "Problem":
        with npz:
            keys = set(npz.files)
            missing = [f for f in ARRAY_FIELDS + INT_FIELDS if f not in keys]
            if missing:
                raise ProblemError(missing[0], f"missing from problem.npz (required: {ARRAY_FIELDS + INT_FIELDS})")
            unknown = sorted(k for k in keys - set(ARRAY_FIELDS + INT_FIELDS) if not k.startswith("option_"))
            if unknown:
                raise ProblemError(unknown[0], "unknown entry in problem.npz")
            try:
                fields = {name: npz[name] for name in ARRAY_FIELDS + INT_FIELDS}
                options = {k[len("option_"):]: npz[k] for k in keys if k.startswith("option_")}
            except ValueError as exc:  # object arrays need pickle, which we refuse
                raise ProblemError(source, f"contains object arrays, which are not allowed ({exc})") from exc
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:  # damaged: CRC, cut short
                raise ProblemError(source, f"damaged archive ({exc})") from exc
        for key, value in options.items():
            if value.dtype.kind == "U":
                options[key] = str(value)
        return cls.create(options=options, **fields)
