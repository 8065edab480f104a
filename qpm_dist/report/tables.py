"""What the metric keys of metrics.json are called in tables, which of them have a baseline, and the tables.

A column is one evaluated model (the dense model or a method's final model); rows are the metrics present in
any column, in the paper's order. Shared by the single-method report, `runs/compare.html` and the text
printed by `qpm-dist compare` / `qpm-dist demo`.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

METRIC_ROWS = [
    ("accuracy", "Top-1 accuracy (%)"), ("top5", "Top-5 accuracy (%)"), ("SID@5", "SID@5"),
    ("diversity@5", "Diversity@5"), ("class_independence", "Class independence"),
    ("contrastiveness", "Contrastiveness"), ("correlation", "Correlation (Pearson, lower is better)"),
    ("dependence", "Dependence (lower is better)"),
    ("structural_grounding", "Structural grounding (signed weights; can exceed 1)"),
    ("structural_grounding_positive", "Structural grounding (positive weights)"),
    ("NFfeatures", "Features used"), ("PerClass", "Features per class"),
    ("part_recovery", "Ground-truth class-part links recovered (features matched to parts by class sets)"),
    ("part_recovery_random", "... by a random head with the same links per class"),
    ("part_precision", "Precision of the class-part links"), ("part_f1", "F1 of the class-part links"),
    ("negative_links_on_absent_parts", "Negative weights on parts the class lacks (share)"),
    ("part_localisation", "Feature peaks inside the matched part's box (features matched by localisation)"),
    ("part_localisation_chance", "... for a peak at a random position"),
    ("parts_covered", "Distinct parts the features localise"),
    ("part_links_by_localisation", "Class-part links recovered (features matched by localisation)"),
    ("pointing_game", "Pointing game: Grad-CAM peak within 15 px of the object boxes (mean over classes)"),
    ("stochastic_pointing", "Stochastic pointing game: Grad-CAM mass within 15 px of the boxes (exact)"),
    ("stochastic_pointing_sampled", "... sampled (100 points per image)"),
    ("content_heatmap", "Content heatmap: Grad-CAM mass inside the object boxes"),
    # prototype networks (specs/pixpnet.md §4): per pixel-space mapping of a prototype's best cell
    *[(f"{metric}_{mapping}", label if mapping == "ours" else f"... {text}")
      for metric, label in (
          ("consistency_hard", "Prototype consistency (share of prototypes on one part in >= 80 % of images): RF box"),
          ("consistency_soft", "Prototype consistency (soft: mean best-part hit rate): RF box"),
          ("stability_hard", "Prototype stability under noise (same parts hit): RF box"),
          ("stability_soft", "Prototype stability under noise (Jaccard of parts hit): RF box"),
          ("rot_area", "Relevance ordering test: area (higher is better): RF heat map"),
          ("rot_pct", "Relevance ordering test: % pixels to the original similarity (lower is better): RF heat map"))
      for mapping, text in (("ours", ""), ("upsample", "upsampling mapping (ProtoPNet)"),
                            ("random", "random mapping"))],
    ("iis", "IIS of the backbone (area under accuracy retention, first concept library)"),
    *[(f"iis_{library}", f"... IIS with the {text} library") for library, text in (
        ("prototype", "prototype concepts"), ("cluster", "k-means concepts"), ("text", "text concepts (LF-CBM)"))],
    ("iis_normalised", "IIS / width of the ratio grid"),
    ("iis_dense_probe", "IIS: the backbone's dense linear probe (%)"),
]

# metric -> the value it must beat: what the same score gives by chance
BASELINES = {"part_recovery": "part_recovery_random", "part_localisation": "part_localisation_chance"}

# short names for figure axes
SHORT_LABELS = {
    "accuracy": "top-1 accuracy (%)", "SID@5": "SID@5", "diversity@5": "diversity@5",
    "class_independence": "class independence", "contrastiveness": "contrastiveness",
    "correlation": "correlation (lower is better)", "dependence": "dependence (lower is better)",
    "structural_grounding": "structural grounding", "part_recovery": "class-part links recovered",
    "part_precision": "link precision", "part_coverage": "parts covered (share)",
    "part_localisation": "peaks inside the part's box", "pointing_game": "pointing game",
    "stochastic_pointing": "stochastic pointing game", "content_heatmap": "content heatmap",
    "consistency_hard_ours": "prototype consistency", "stability_hard_ours": "prototype stability",
    "rot_area_ours": "relevance ordering area",
}


@dataclass(frozen=True)
class Column:
    """One evaluated model: `name` is its key in metrics.json ("dense" or a method), `source` its file."""

    name: str
    label: str
    metrics: dict
    source: str = ""


def metric_rows(own_ks=()) -> list[tuple[str, str]]:
    """METRIC_ROWS plus SID@k / diversity@k rows for each model's own k (≠ 5) after the paper's @5 rows."""
    rows = list(METRIC_ROWS)
    at = [key for key, _ in rows].index("diversity@5") + 1
    rows[at:at] = [(f"{m}@{k}", f"{label}@{k}") for k in sorted(set(own_ks) - {5})
                   for m, label in (("SID", "SID"), ("diversity", "Diversity"))]
    return rows


def fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return html.escape(str(value))


def rows(columns: list[Column]) -> list[tuple[str, list]]:
    """Metric rows present in any column; a sparse model with fewer than 5 features per class has no SID@5,
    so its own SID@k / diversity@k rows follow the paper's @5."""
    ks = {round(c.metrics["PerClass"]) for c in columns if 0 < (c.metrics.get("PerClass") or 5) < 5}
    return [(label, [c.metrics.get(key) for c in columns]) for key, label in metric_rows(ks)
            if any(key in c.metrics for c in columns)]


def table_html(columns: list[Column]) -> str:
    head = "".join(f"<th>{html.escape(c.label)}</th>" for c in columns)
    body = "".join(f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td>{fmt(v)}</td>" for v in values) + "</tr>"
                   for label, values in rows(columns))
    return f"<table><tr><th>metric</th>{head}</tr>{body}</table>"


def table_text(columns: list[Column]) -> str:
    found = rows(columns)
    width = max([len(label) for label, _ in found] + [6])
    widths = [max(10, len(c.label)) for c in columns]
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{c.label:>{w}}" for c, w in zip(columns, widths))]
    for label, values in found:
        lines.append(f"{label:<{width}}  " + "  ".join(f"{fmt(v):>{w}}" for v, w in zip(values, widths)))
    return "\n".join(lines)
