"""Report sections of a sparse class-feature head (QPM and the glm-based methods): its global explanation.

Every selected feature with the classes that use it (and, on the synthetic dataset, the ground-truth part it
matches), class comparisons for the pairs of classes that share the most features, and per class an example
image with the heatmaps of its features (specs/qpm.md §8).
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import torch

from qpm_dist.report import figures
from qpm_dist.report.build import ReportInputs, img
from qpm_dist.utils import progress

# The headline metrics (MethodSpec.headline) of a method whose final model has a sparse class-feature head:
# accuracy, how its class similarities match the ground truth, and the part recovery and localisation scores.
HEADLINE = ("accuracy", "structural_grounding", "class_independence", "contrastiveness", "dependence",
            "part_recovery", "part_localisation")


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
    Only the images still needed are run through the model (not whole batches). Progress counts them, out of
    `limit` per class (on ImageNet the pass reads a large part of the test set; it ends short of the total
    when a class has fewer test images).
    """
    class_weights = model.head.class_weights()
    seen = dict.fromkeys(classes, 0)
    best: dict[int, tuple] = {}
    bar = progress(limit * len(seen), "report: example images", unit="images")
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
        bar.update(len(keep))
        if all(n >= limit for n in seen.values()):
            break
    bar.close()
    return {c: (image, maps, key[0]) for c, (key, image, maps) in best.items()}


def part_names(root: Path, class_parts) -> list[str] | None:
    parts_file = Path(root) / "parts" / "parts.txt"
    if class_parts is None or not parts_file.is_file():
        return None
    return [line.split(" ", 1)[1] for line in parts_file.read_text().splitlines() if line.strip()]


def sparse_head_sections(inputs: ReportInputs) -> list[tuple[str, str]]:
    """"Selected features", "Class comparisons" and "Classes" of a model whose head has a feature selection."""
    ctx, model = inputs.ctx, inputs.model
    cfg, data, device = ctx.cfg, ctx.data, ctx.info.device
    weights = model.head.class_weights().detach().cpu().numpy()
    selected = model.head.selection.cpu().numpy()
    names = [n.split(".", 1)[-1] for n in data.display_names]  # CUB's "001.Black_footed_Albatross"; ImageNet's words
    # name features by the part they localise (where part boxes exist), else by the class-set matching
    own = inputs.metrics[inputs.method]
    matching = own.get("feature_part_localisation") or own.get("feature_part_matching") or {}
    matching = {int(k): v for k, v in matching.items()}
    parts = part_names(Path(cfg.data.root), data.class_parts)

    def feature_label(j: int) -> str:
        """Feature id in the backbone's numbering, and the ground-truth part it matches (synthetic data)."""
        part = matching.get(j)
        return f"f{selected[j]} ≈ {parts[part]}" if part is not None and parts else f"f{selected[j]}"

    mean, std = cfg.data.mean, cfg.data.std
    pairs = shared_pairs(weights, cfg.report.class_pairs)
    listed = range(min(data.num_classes, cfg.report.max_classes))
    loader = data.eval_loader("test", cfg.eval.batch_size, rank=0, world_size=1)
    found = best_examples(model, loader, {c for pair in pairs for c in pair[:2]} | set(listed), device, limit=16)
    examples = {c: (figures.denormalise(image, mean, std), maps, ok) for c, (image, maps, ok) in found.items()}

    comparisons = []
    for c1, c2, shared in pairs:
        e1, e2 = examples.get(c1), examples.get(c2)
        if e1 is None or e2 is None:
            continue
        f1, f2 = set(np.flatnonzero(weights[c1])), set(np.flatnonzero(weights[c2]))
        columns = sorted(f1 - f2) + sorted(f1 & f2) + sorted(f2 - f1)
        owner = [names[c1] if j in f1 - f2 else names[c2] if j in f2 - f1 else "shared" for j in columns]
        png = inputs.fig_dir / f"compare_{c1:04d}_{c2:04d}.png"
        figures.comparison_figure(png, (names[c1], names[c2]), (e1[0], e2[0]), (e1[1], e2[1]), columns,
                                  [feature_label(j) for j in columns], owner)
        comparisons.append((names[c1], names[c2], shared, png))

    class_rows = []
    bar = progress(len(listed), "report: class figures", unit="classes")
    for c in listed:
        feats = [int(j) for j in np.flatnonzero(weights[c])]
        sharing = {j: [names[o] for o in np.flatnonzero(weights[:, j]) if o != c] for j in feats}
        ex = examples.get(c)
        png = None
        if ex is not None:
            png = inputs.fig_dir / f"class_{c:04d}.png"
            title = names[c] + ("" if ex[2] else " (misclassified)")
            figures.class_strip(png, title, ex[0], ex[1], feats, [feature_label(j) for j in feats])
        class_rows.append((names[c], feats, sharing, png))
        bar.update()
    bar.close()

    feature_rows = "".join(
        f"<tr><td>{html.escape(feature_label(j))}</td><td>{len(np.flatnonzero(weights[:, j]))}</td>"
        f"<td>{html.escape(', '.join(names[c] for c in np.flatnonzero(weights[:, j])))}</td></tr>"
        for j in range(len(selected)))
    compare_html = "".join(
        f"<h3>{html.escape(a)} vs {html.escape(b)}: {s} shared feature(s)</h3>{img(png)}"
        for a, b, s, png in comparisons) or "<p>No pair of classes shares a feature.</p>"
    class_html = "".join(
        f"<div class='cls'><h3>{html.escape(name)}</h3><p>features: "
        + ", ".join(f"<b>{html.escape(feature_label(j))}</b> (also: {html.escape(', '.join(sharing[j]) or 'none')})"
                    for j in feats)
        + f"</p>{img(png) if png else ''}</div>"
        for name, feats, sharing, png in class_rows)
    return [
        ("Selected features", f"<p>{len(selected)} selected features, {inputs.k} per class.</p>"
                              f"<table><tr><th>feature</th><th>#classes</th><th>classes</th></tr>{feature_rows}</table>"),
        ("Class comparisons", compare_html),
        ("Classes", class_html),
    ]
