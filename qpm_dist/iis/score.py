"""IIS, the inherent interpretability score, from a manifest of head results (specs/iis.md §4).

ARR(s) = A(s) / A_dense, the accuracy retention of the interpretable-prediction head at sparsity ratio s, and

    IIS = Σ_i (s_{i+1} − s_i) · (A(s_i) + A(s_{i+1})) / (2 · A_dense)        over the sorted ratios s_0 < … < s_n

the trapezoid rule exactly as the reference computes it, NOT divided by the width of the grid (paper-compatible:
on the 8-point grid 0 … 0.98 an all-ones ARR gives 0.98). `Score.iis_normalised` = IIS / (s_n − s_0) is reported
beside it, so that grids of different widths can be compared; it is undefined (None) for a single ratio, where the
IIS itself is 0 (the reference's one-ratio sweep, bug 3).

A(s) is the best test accuracy over the lr grid at ratio s, and A_dense is the best over the SAME lr grid of the
dense linear probe: the reference took whichever dense result `os.listdir` listed last (bug 6).

The inputs are read from a JSON manifest, never parsed out of file names (bug 6: the reference parsed
`<K>##<s>##<lr>##…` names and could not read the text pipeline's results). The manifest:

    {"records": [{"library": "dense", "ratio": null, "lr": 0.01, "accuracy": 0.80, ...},
                 {"library": "prototype", "ratio": 0.5, "lr": 0.01, "accuracy": 0.77, ...}, ...]}

one record per (library, ratio, lr) job, as `iis.heads.train_head` returns it (further fields are kept but not
read). The dense probe is the library "dense" with ratio null; it is shared by every library of the backbone,
and every library is scored over one ratio grid. A job missing from the grid is an error that names it: a best-
over-lr taken over the jobs that happened to finish would silently change the score.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from qpm_dist.errors import BadInput
from qpm_dist.utils import atomic_write_text

DENSE = "dense"  # the library name of the dense linear probe's records (ratio null)
MAX_LISTED = 8  # missing jobs named in one error message; the rest are counted


class BadManifest(BadInput, ValueError):
    """An IIS manifest is unreadable, has a malformed record, or lacks jobs of the grid being scored."""


@dataclass(frozen=True)
class Score:
    """The IIS of one concept library of one backbone, with everything it was computed from."""

    library: str
    ratios: list[float]  # sorted
    accuracies: list[float]  # A(s) per ratio: the best over the lr grid
    best_lrs: list[float]  # the lr that gave A(s)
    dense_accuracy: float  # A_dense: the best dense probe over the same lr grid
    dense_lr: float
    arr: list[float]  # A(s) / A_dense
    iis: float  # the trapezoid, not normalised (paper-compatible)
    iis_normalised: float | None  # iis / (s_n − s_0); None for a single ratio

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def iis_area(ratios: Sequence[float], accuracies: Sequence[float], dense_accuracy: float) -> float:
    """The reference's trapezoid over sorted ratios of (A(s_i) + A(s_{i+1})) / (2 A_dense); 0 for one ratio."""
    if len(ratios) != len(accuracies) or not ratios:
        raise ValueError(f"IIS: {len(ratios)} ratios and {len(accuracies)} accuracies; expected the same number, >= 1")
    if any(b <= a for a, b in zip(ratios, ratios[1:])):
        raise ValueError(f"IIS: ratios {list(ratios)} are not strictly increasing")
    if not dense_accuracy > 0:
        raise ValueError(f"IIS: dense accuracy {dense_accuracy}; expected > 0")
    return math.fsum((s1 - s0) * (a0 + a1) / (2 * dense_accuracy)
                     for s0, s1, a0, a1 in zip(ratios, ratios[1:], accuracies, accuracies[1:]))


def score(records: Iterable[dict], library: str, ratios: Sequence[float] | None = None,
          lrs: Sequence[float] | None = None, source: str = "IIS manifest") -> Score:
    """The IIS of `library` over the grid ratios × lrs (default: every ratio of the library's records, every lr of
    its and the dense probe's records). Every job of the grid must be present, the dense probe at every lr."""
    table = _index(list(records), source)
    own = {key: acc for key, acc in table.items() if key[0] == library}
    dense = {key: acc for key, acc in table.items() if key[0] == DENSE}
    if library == DENSE:
        raise BadManifest(f"{source}: library {DENSE!r} is the dense probe (the denominator); name a concept library")
    if not own:
        known = sorted({key[0] for key in table} - {DENSE})
        raise BadManifest(f"{source}: no records of library {library!r}; found libraries: {', '.join(known) or 'none'}")
    if not dense:
        raise BadManifest(f"{source}: no dense probe records (library {DENSE!r}, ratio null): A_dense is missing")
    grid_ratios = sorted({_ratio(r, source) for r in ratios} if ratios is not None else {key[1] for key in own})
    grid_lrs = sorted({float(lr) for lr in lrs} if lrs is not None else {key[2] for key in (*own, *dense)})
    missing = [f"{DENSE} lr={lr:g}" for lr in grid_lrs if (DENSE, None, lr) not in dense]
    missing += [f"{library} ratio={s:g} lr={lr:g}" for s in grid_ratios for lr in grid_lrs
                if (library, s, lr) not in own]
    if missing:
        listed = ", ".join(missing[:MAX_LISTED]) + (f" and {len(missing) - MAX_LISTED} more" if
                                                    len(missing) > MAX_LISTED else "")
        raise BadManifest(f"{source}: {len(missing)} job(s) of the grid ratios {grid_ratios} x lrs {grid_lrs} have "
                          f"no record: {listed}")
    dense_lr = max(grid_lrs, key=lambda lr: (dense[(DENSE, None, lr)], -lr))
    dense_accuracy = dense[(DENSE, None, dense_lr)]
    if not dense_accuracy > 0:
        raise BadManifest(f"{source}: the best dense probe accuracy is {dense_accuracy}; ARR needs it > 0")
    best_lrs = [max(grid_lrs, key=lambda lr: (own[(library, s, lr)], -lr)) for s in grid_ratios]
    accuracies = [own[(library, s, lr)] for s, lr in zip(grid_ratios, best_lrs)]
    area = iis_area(grid_ratios, accuracies, dense_accuracy)
    width = grid_ratios[-1] - grid_ratios[0]
    return Score(library=library, ratios=grid_ratios, accuracies=accuracies, best_lrs=best_lrs,
                 dense_accuracy=dense_accuracy, dense_lr=dense_lr, arr=[a / dense_accuracy for a in accuracies],
                 iis=area, iis_normalised=area / width if width > 0 else None)


def read_manifest(path: Path) -> list[dict]:
    """The records of a manifest file, each checked (`score` checks the grid)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadManifest(f"IIS manifest {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadManifest(f"IIS manifest {path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise BadManifest(f"IIS manifest {path}: expected an object with a list 'records', found "
                          f"{type(data).__name__}{' without records' if isinstance(data, dict) else ''}")
    _index(data["records"], f"IIS manifest {path}")
    return data["records"]


def write_manifest(path: Path, records: Iterable[dict]) -> None:
    """Write records (checked) as a manifest, atomically."""
    records = list(records)
    _index(records, f"IIS manifest {path}")
    atomic_write_text(Path(path), json.dumps({"records": records}, indent=1))


def score_manifest(path: Path, library: str, ratios: Sequence[float] | None = None,
                   lrs: Sequence[float] | None = None) -> Score:
    return score(read_manifest(path), library, ratios, lrs, source=f"IIS manifest {path}")


def _index(records: list, source: str) -> dict[tuple[str, float | None, float], float]:
    """{(library, ratio, lr): accuracy}; a malformed or repeated record raises BadManifest naming it."""
    table: dict[tuple[str, float | None, float], float] = {}
    for i, rec in enumerate(records):
        where = f"{source}: record {i}"
        if not isinstance(rec, dict):
            raise BadManifest(f"{where}: expected an object, found {type(rec).__name__}")
        for name in ("library", "ratio", "lr", "accuracy"):
            if name not in rec:
                raise BadManifest(f"{where}: no {name!r} (expected library, ratio, lr, accuracy)")
        library = rec["library"]
        if not isinstance(library, str) or not library:
            raise BadManifest(f"{where}: library {library!r}; expected a non-empty string")
        if library == DENSE:
            if rec["ratio"] is not None:
                raise BadManifest(f"{where}: the dense probe has ratio {rec['ratio']!r}; expected null")
            ratio = None
        else:
            ratio = _ratio(rec["ratio"], where)
        lr, accuracy = rec["lr"], rec["accuracy"]
        if not _number(lr) or not 0 < lr < math.inf:
            raise BadManifest(f"{where}: lr {lr!r}; expected a positive number")
        if not _number(accuracy) or not 0 <= accuracy <= 1:
            raise BadManifest(f"{where}: accuracy {accuracy!r}; expected a fraction in [0, 1]")
        key = (library, ratio, float(lr))
        if key in table:
            raise BadManifest(f"{where}: a second record for library {library!r} ratio {ratio} lr {lr:g}")
        table[key] = float(accuracy)
    return table


def _ratio(value: Any, where: str) -> float:
    if not _number(value) or not 0 <= value <= 1:
        raise BadManifest(f"{where}: ratio {value!r}; expected a number in [0, 1]")
    return float(value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
