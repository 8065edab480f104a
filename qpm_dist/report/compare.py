"""Dense, QPM, SLDD and Q-SENN side by side: the metrics.json of every method run under one run.out_dir.

Every evaluate stage writes `metrics.json` as {"dense": ..., <method>: ...}. This module finds them
(`<out_dir>/<run>/<...evaluate>-<key>/metrics.json`), keeps the newest per method and lays them out as one
table: in every report (section "Methods compared") and as `qpm-dist compare OUT_DIR` (text + HTML file).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from qpm_dist.report.build import METHOD_LABELS, _fmt, metric_rows

ORDER = ["qpm", "sldd", "qsenn"]


def find_metrics(out_dir: Path) -> dict[str, dict]:
    """method -> {"metrics", "dense", "path", "run"} of the newest evaluation of that method under out_dir."""
    found: dict[str, tuple[float, dict]] = {}
    for path in Path(out_dir).glob("*/*/metrics.json"):
        if "evaluate-" not in path.parent.name:
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        mtime = path.stat().st_mtime
        for method, metrics in data.items():
            if method == "dense" or not isinstance(metrics, dict):
                continue
            if method not in found or mtime > found[method][0]:
                found[method] = (mtime, {"metrics": metrics, "dense": data.get("dense"), "path": str(path),
                                         "run": path.parent.parent.name})
    return {m: v for m, (_, v) in found.items()}


def method_columns(out_dir: Path, dense: dict | None = None) -> list[tuple[str, str, dict]]:
    """[(header, source, metrics)]: the dense model (given, or the newest run's), then each method found."""
    found = find_metrics(out_dir)
    methods = [m for m in ORDER if m in found] + sorted(m for m in found if m not in ORDER)
    columns = []
    if dense is None and methods:
        newest = max(methods, key=lambda m: Path(found[m]["path"]).stat().st_mtime)
        dense = found[newest]["dense"]
    if dense is not None:
        columns.append(("dense", "", dense))
    for m in methods:
        columns.append((METHOD_LABELS.get(m, m), found[m]["path"], found[m]["metrics"]))
    return columns


def _rows(columns: list[tuple[str, str, dict]]) -> list[tuple[str, list]]:
    """METRIC_ROWS present in any column; a sparse model with fewer than 5 features per class has no SID@5,
    so its own SID@k / diversity@k rows follow the paper's @5 (as in the single-method report)."""
    ks = {round(c[2]["PerClass"]) for c in columns if 0 < (c[2].get("PerClass") or 5) < 5}
    return [(label, [c[2].get(key) for c in columns]) for key, label in metric_rows(ks)
            if any(key in c[2] for c in columns)]


def comparison_html(columns: list[tuple[str, str, dict]]) -> str:
    if len(columns) < 2:
        return ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _, _ in columns)
    body = "".join(f"<tr><td>{label}</td>" + "".join(f"<td>{_fmt(v)}</td>" for v in values) + "</tr>"
                   for label, values in _rows(columns))
    sources = "".join(f"<li>{html.escape(h)}: {html.escape(src)}</li>" for h, src, _ in columns if src)
    return (f"<h2>Methods compared</h2><p>The newest evaluation of each method under this output folder "
            f"(dense: this run's dense model).</p><table><tr><th>metric</th>{head}</tr>{body}</table>"
            f"<ul>{sources}</ul>")


def comparison_text(columns: list[tuple[str, str, dict]]) -> str:
    rows = _rows(columns)
    width = max([len(label) for label, _ in rows] + [6])
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{h:>10}" for h, _, _ in columns)]
    for label, values in rows:
        lines.append(f"{label:<{width}}  " + "  ".join(f"{_fmt(v):>10}" for v in values))
    return "\n".join(lines)


def write_comparison(out_dir: Path, html_path: Path | None = None) -> tuple[str, Path | None]:
    """`qpm-dist compare`: the text table, and an HTML page (default <out_dir>/compare.html)."""
    from qpm_dist.utils import atomic_write_text

    columns = method_columns(Path(out_dir))
    if not columns:
        return f"no evaluate-*/metrics.json under {out_dir}", None
    html_path = Path(html_path) if html_path else Path(out_dir) / "compare.html"
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Methods compared</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}</style></head><body>"
            f"{comparison_html(columns) or '<p>Only one model evaluated so far.</p>'}</body></html>\n")
    atomic_write_text(html_path, page)
    return comparison_text(columns), html_path
