"""The HTML report of a QPM model's global explanation (rank 0 renders; other ranks wait).

Self-contained: every figure is embedded as a base64 PNG, so the single `report.html` opens offline in a
browser. Contents: the metrics of the dense and the QPM model side by side, the solve, every selected
feature with the classes that use it (and, on the synthetic dataset, the ground-truth part it matches),
class comparisons for the pairs of classes that share the most features, and per class an example image
with the heatmaps of its features. PNGs are also written next to the HTML.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
import torch

from qpm_dist import dist
from qpm_dist.models.io import load_classifier
from qpm_dist.report import figures
from qpm_dist.utils import atomic_write_text, log

METRIC_ROWS = [
    ("accuracy", "Top-1 accuracy (%)"), ("top5", "Top-5 accuracy (%)"), ("SID@5", "SID@5"),
    ("diversity@5", "Diversity@5"), ("class_independence", "Class independence"),
    ("contrastiveness", "Contrastiveness"), ("correlation", "Correlation (Pearson, lower is better)"),
    ("dependence", "Dependence (lower is better)"), ("structural_grounding", "Structural grounding"),
    ("NFfeatures", "Features used"), ("PerClass", "Features per class"),
    ("part_recovery", "Ground-truth class-part links recovered (features matched to parts by class sets)"),
    ("part_recovery_random", "... by a random assignment"),
    ("part_localisation", "Feature peaks inside the matched part's box (features matched by localisation)"),
    ("part_localisation_chance", "... for a peak at a random position"),
    ("part_links_by_localisation", "Class-part links recovered (features matched by localisation)"),
]


def metric_rows(own_ks=()) -> list[tuple[str, str]]:
    """METRIC_ROWS plus SID@k / diversity@k rows for each model's own k (≠ 5) after the paper's @5 rows."""
    rows = list(METRIC_ROWS)
    at = [key for key, _ in rows].index("diversity@5") + 1
    rows[at:at] = [(f"{m}@{k}", f"{label}@{k}") for k in sorted(set(own_ks) - {5})
                   for m, label in (("SID", "SID"), ("diversity", "Diversity"))]
    return rows


def shared_pairs(weights: np.ndarray, count: int) -> list[tuple[int, int, int]]:
    """The `count` class pairs sharing the most features: (c1, c2, shared), most shared first."""
    binary = (weights != 0).astype(np.int64)
    shared = np.triu(binary @ binary.T, k=1)
    order = np.argsort(shared, axis=None)[::-1]
    pairs = []
    for flat in order[:count]:
        c1, c2 = np.unravel_index(flat, shared.shape)
        if c1 < c2 and shared[c1, c2] > 0:
            pairs.append((int(c1), int(c2), int(shared[c1, c2])))
    return pairs


@torch.no_grad()
def best_examples(model, loader, classes: set[int], device: torch.device, limit: int) -> dict[int, tuple]:
    """Per class in `classes`: the best of its first `limit` test images, as (image, feature maps, correct).

    Best = a correctly classified image (if the class has one) whose class features are peaked and strong:
    score Σ_j max_p softmax(M_j) × Σ_j z_j over the class's features j (specs/qpm.md §8.3); only correctly
    classified images compete when there is one (the reference's shift could let a wrong one win, bug 22).
    One pass over the loader in test order, stopping once every class has had `limit` images: WebDataset
    and FFCV shards have no random access, and ImageNet's classes cannot all be held in memory at once.
    """
    class_weights = model.head.class_weights()
    seen = dict.fromkeys(classes, 0)
    best: dict[int, tuple] = {}
    for images, labels in loader:
        keep = []
        for i, y in enumerate(labels.tolist()):
            if seen.get(y, limit) < limit:
                seen[y] += 1
                keep.append(i)
        if keep:
            batch, ys = images[keep].to(device), labels[keep].tolist()
            out = model(batch)
            for row, y in enumerate(ys):
                feats = (class_weights[y] != 0).nonzero().flatten()
                peaks = torch.softmax(out.feature_maps[row, feats].flatten(1).float(), dim=1).amax(dim=1).sum()
                key = (bool(out.logits[row].argmax() == y), float(peaks * out.features[row, feats].float().sum()))
                if y not in best or key > best[y][0]:
                    best[y] = (key, batch[row].cpu(), out.feature_maps[row].cpu())
        if all(n >= limit for n in seen.values()):
            break
    return {c: (image, maps, key[0]) for c, (key, image, maps) in best.items()}


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return html.escape(str(value))


METHOD_LABELS = {"qpm": "QPM", "sldd": "SLDD", "qsenn": "Q-SENN"}


def build_report(ctx, out_dir: Path, method: str = "qpm", evaluate_stage: str = "evaluate",
                 model_stage: str = "finetune", summary_stage: str = "solve") -> Path:
    """The report of `method`'s final model (`model_stage`); `summary_stage`'s summary is shown as its solve."""
    path = out_dir / "report.html"
    if ctx.info.is_main:
        _render(ctx, out_dir, path, method, evaluate_stage, model_stage, summary_stage)
    dist.barrier()
    return path


def _render(ctx, out_dir: Path, path: Path, method: str, evaluate_stage: str, model_stage: str,
            summary_stage: str) -> None:
    cfg, data, device = ctx.cfg, ctx.data, ctx.info.device
    metrics = json.loads((ctx.outputs[evaluate_stage] / "metrics.json").read_text())
    solve = json.loads((ctx.outputs[summary_stage] / "stage.json").read_text()).get("summary", {})
    solve = {k: v for k, v in solve.items() if k != "rank_digests"}
    model = load_classifier(cfg, data.num_classes, ctx.outputs[model_stage] / "model.pt").to(device).eval()
    weights = model.head.class_weights().detach().cpu().numpy()
    selected = model.head.selection.cpu().numpy()
    names = [n.split(".", 1)[-1] for n in data.class_names]
    # name features by the part they localise (where part boxes exist), else by the class-set matching
    qpm_metrics = metrics[method]
    matching = qpm_metrics.get("feature_part_localisation") or qpm_metrics.get("feature_part_matching") or {}
    matching = {int(k): v for k, v in matching.items()}
    part_names = _part_names(Path(cfg.data.root), data.class_parts)

    def feature_label(j: int) -> str:
        """Feature id in the backbone's numbering, and the ground-truth part it matches (synthetic data)."""
        part = matching.get(j)
        return f"f{selected[j]} ≈ {part_names[part]}" if part is not None and part_names else f"f{selected[j]}"

    fig_dir = out_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    mean, std = cfg.data.mean, cfg.data.std
    pairs = shared_pairs(weights, cfg.report.class_pairs)
    listed = range(min(data.num_classes, cfg.report.max_classes))
    loader = data.eval_loader("test", cfg.eval.batch_size, rank=0, world_size=1)
    found = best_examples(model, loader, {c for pair in pairs for c in pair[:2]} | set(listed), device, limit=16)
    examples = {c: (figures.denormalise(img, mean, std), maps, ok) for c, (img, maps, ok) in found.items()}

    log.info("report: rendering figures into %s", fig_dir)
    comparisons = []
    for c1, c2, shared in pairs:
        e1, e2 = examples.get(c1), examples.get(c2)
        if e1 is None or e2 is None:
            continue
        f1, f2 = set(np.flatnonzero(weights[c1])), set(np.flatnonzero(weights[c2]))
        columns = sorted(f1 - f2) + sorted(f1 & f2) + sorted(f2 - f1)
        owner = [names[c1] if j in f1 - f2 else names[c2] if j in f2 - f1 else "shared" for j in columns]
        png = fig_dir / f"compare_{c1:04d}_{c2:04d}.png"
        figures.comparison_figure(png, (names[c1], names[c2]), (e1[0], e2[0]), (e1[1], e2[1]), columns,
                                  [feature_label(j) for j in columns], owner)
        comparisons.append((names[c1], names[c2], shared, png))

    class_rows = []
    for c in listed:
        feats = [int(j) for j in np.flatnonzero(weights[c])]
        sharing = {j: [names[o] for o in np.flatnonzero(weights[:, j]) if o != c] for j in feats}
        ex = examples.get(c)
        png = None
        if ex is not None:
            png = fig_dir / f"class_{c:04d}.png"
            title = names[c] + ("" if ex[2] else " (misclassified)")
            figures.class_strip(png, title, ex[0], ex[1], feats, [feature_label(j) for j in feats])
        class_rows.append((names[c], feats, sharing, png))

    from qpm_dist.report.compare import comparison_html, method_columns

    others = comparison_html(method_columns(Path(cfg.run.out_dir), metrics["dense"]))
    atomic_write_text(path, _html(cfg, metrics, solve, selected, weights, names, feature_label, comparisons,
                                  class_rows, method, others))
    log.info("report: %s", path)


def _part_names(root: Path, class_parts) -> list[str] | None:
    parts_file = root / "parts" / "parts.txt"
    if class_parts is None or not parts_file.is_file():
        return None
    return [line.split(" ", 1)[1] for line in parts_file.read_text().splitlines() if line.strip()]


def _html(cfg, metrics, solve, selected, weights, names, feature_label, comparisons, class_rows,
          method: str = "qpm", comparison: str = "") -> str:
    dense, qpm = metrics["dense"], metrics[method]
    label = METHOD_LABELS.get(method, method)
    k = getattr(cfg, method).n_per_class
    rows = "".join(f"<tr><td>{label}</td><td>{_fmt(dense.get(key))}</td><td>{_fmt(qpm.get(key))}</td></tr>"
                   for key, label in metric_rows([k]) if key in dense or key in qpm)
    solve_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in solve.items())
    feature_rows = "".join(
        f"<tr><td>{html.escape(feature_label(j))}</td><td>{len(np.flatnonzero(weights[:, j]))}</td>"
        f"<td>{html.escape(', '.join(names[c] for c in np.flatnonzero(weights[:, j])))}</td></tr>"
        for j in range(len(selected)))
    compare_html = "".join(
        f"<h3>{html.escape(a)} vs {html.escape(b)}: {s} shared feature(s)</h3>{_img(png)}"
        for a, b, s, png in comparisons) or "<p>No pair of classes shares a feature.</p>"
    class_html = "".join(
        f"<div class='cls'><h3>{html.escape(name)}</h3><p>features: "
        + ", ".join(f"<b>{html.escape(feature_label(j))}</b> (also: {html.escape(', '.join(sharing[j]) or 'none')})"
                    for j in feats)
        + f"</p>{_img(png) if png else ''}</div>"
        for name, feats, sharing, png in class_rows)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{label} report: {html.escape(cfg.run.name)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; font-size: 13px; text-align: left; }}
img {{ max-width: 100%; }}
.cls {{ border-top: 1px solid #ddd; margin-top: 1em; }}
</style></head><body>
<h1>{label} global explanation — {html.escape(cfg.run.name)}</h1>
<p>Dataset <b>{html.escape(cfg.data.dataset)}</b> ({len(names)} classes), backbone <b>{html.escape(cfg.model.arch)}</b>,
{len(selected)} selected features, {k} per class.</p>
<h2>Metrics: dense vs {label}</h2>
<table><tr><th>metric</th><th>dense</th><th>{label}</th></tr>{rows}</table>
{comparison}
<h2>{"Solve" if method == "qpm" else "Sparse layer"}</h2><table>{solve_rows}</table>
<h2>Selected features</h2>
<table><tr><th>feature</th><th>#classes</th><th>classes</th></tr>{feature_rows}</table>
<h2>Class comparisons</h2>{compare_html}
<h2>Classes</h2>{class_html}
</body></html>
"""
