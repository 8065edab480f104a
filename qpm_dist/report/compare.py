"""Every method side by side: the metrics.json of every method evaluated under one run.out_dir.

Every evaluate stage writes `metrics.json` as {"dense": ..., <method>: ...}. This module finds them
(`<out_dir>/<run>/<method>_evaluate-<key>/metrics.json`), keeps the newest per method and lays them out once:
a table, then pictures of the methods' headline metrics (qpm_dist.methods): accuracy against each
interpretability metric (one mark per model) and ground-truth recovery against what chance gives. The
same section is in every report and in `qpm-dist compare OUT_DIR` (text + `compare.html`).

IIS scores (`<out_dir>/<run>/iis_score-<key>/`, qpm_dist.methods.iis) join the column of the model they scored,
matched by the model's stage KEY, not by the method's name: a column shows one model, and an IIS computed on a
model trained anew under another config (same stage name, other key) gets its own "(IIS only)" column (merge_iis).
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

from qpm_dist import methods
from qpm_dist.report import figures
from qpm_dist.report.tables import BASELINES, SHORT_LABELS, Column, table_html, table_text
from qpm_dist.utils import atomic_write_text

# methods.iis.BACKBONE_STAGE, the stage holding a random init, a weights file or a stage folder's model (not imported:
# the method modules import report.build, which imports this module)
BACKBONE_STAGE = "iis_backbone"


def baseline_key(evaluation: Path) -> str | None:
    """The key of the dense stage an evaluate stage folder compared against (its stage.json), or None."""
    try:
        record = json.loads((Path(evaluation) / "stage.json").read_text())
        key = record.get("upstream", {}).get("dense")
    except (OSError, ValueError, AttributeError):
        return None
    return key if isinstance(key, str) else None


def evaluated_models(evaluation: Path) -> dict[str, str]:
    """{stage: key} of the model(s) an evaluate stage folder scored besides its dense baseline: its stage.json's
    inputs other than "dense" (EvaluateStage depends on exactly (baseline, final_stage)); {} without stage.json."""
    try:
        upstream = json.loads((Path(evaluation) / "stage.json").read_text()).get("upstream", {})
        return {stage: key for stage, key in upstream.items() if stage != "dense" and isinstance(key, str)}
    except (OSError, ValueError, AttributeError):
        return {}


def _content_key(metrics) -> str:
    return "metrics:" + json.dumps(metrics, sort_keys=True, default=str)


def find_metrics(out_dir: Path) -> dict[str, dict]:
    """method -> {"metrics", "dense", "dense_key", "models", "path", "run"} of the newest evaluation of that method
    under out_dir; "dense_key" identifies its baseline (the dense stage's key; its metrics if stage.json is
    missing), "models" the evaluated model ({stage: key}, evaluated_models). merge_iis then adds the IIS scores
    (an entry it adds for a model no evaluation shows has a "label")."""
    found: dict[str, tuple[float, dict]] = {}
    for path in Path(out_dir).glob("*/*/metrics.json"):
        if "evaluate-" not in path.parent.name:
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        mtime = path.stat().st_mtime
        for method, metrics in data.items():
            if method == "dense" or not isinstance(metrics, dict):
                continue
            if method not in found or mtime > found[method][0]:
                found[method] = (mtime, {"metrics": metrics, "dense": data.get("dense"), "path": str(path),
                                         "dense_key": baseline_key(path.parent) or _content_key(data.get("dense")),
                                         "models": evaluated_models(path.parent), "run": path.parent.parent.name})
    result = {m: v for m, (_, v) in found.items()}
    merge_iis(out_dir, result)
    return result


@dataclass(frozen=True)
class ScoredBackbone:
    """One model scored by IIS (an iis_score folder): `stage` and `key` identify the model (the stage that wrote
    it and that stage's output key, as an evaluate stage's stage.json records its inputs), `name` is the name it
    was scored under (the owning method, "dense", "random init (...)", ...)."""

    name: str
    stage: str | None
    key: str | None
    metrics: dict
    path: str

    @property
    def column(self) -> str:
        """Its own column's name when no evaluation shows this model (never a method's name)."""
        return f"{self.name} @{(self.key or '?')[:8]}"

    @property
    def label(self) -> str:
        """e.g. "gc_train @0d12acfa (IIS only)": which model, and that the column has no evaluation of it."""
        what = self.name if self.stage in (None, BACKBONE_STAGE) else self.stage
        return f"{what} @{(self.key or '?')[:8]} (IIS only)"


def scored_model(backbone: dict) -> tuple[str | None, str | None]:
    """(stage, key) of the model an iis_score folder scored, from its backbone.json: "model_stage"/"model_key"
    when IIS read a stage folder by path (the folder's own stage and output key, methods.iis.folder_model), else
    the backbone stage and its key; None for what is missing or not text."""
    stage, key = backbone.get("model_stage", backbone.get("stage")), backbone.get("model_key", backbone.get("key"))
    return (stage if isinstance(stage, str) else None), (key if isinstance(key, str) else None)


def find_iis(out_dir: Path) -> list[ScoredBackbone]:
    """Every model scored by an iis_score folder under out_dir, the newest score per model (stage and key; two
    scores of one model with other IIS settings: the newest wins). metrics.json is {scored name: {"iis": ...}}
    (qpm_dist.methods.iis)."""
    found: dict[tuple, tuple[float, ScoredBackbone]] = {}
    for path in Path(out_dir).glob("*/iis_score-*/metrics.json"):
        try:
            data = json.loads(path.read_text())
            backbone = json.loads((path.parent / "backbone.json").read_text())
            mtime = path.stat().st_mtime
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or not isinstance(backbone, dict):
            continue
        stage, key = scored_model(backbone)
        for name, metrics in data.items():
            identity = (stage, key) if key is not None else (stage, None, name)
            if isinstance(metrics, dict) and (identity not in found or mtime > found[identity][0]):
                found[identity] = (mtime, ScoredBackbone(name, stage, key, metrics, str(path)))
    return [scored for _, scored in sorted(found.values(), key=lambda item: item[0])]


def merge_iis(out_dir: Path, found: dict[str, dict]) -> None:
    """Put the IIS of every scored model into the column of `found` (find_metrics' result) that evaluates the SAME
    model: a method's column when its evaluation read the scored stage with the scored key (stage.json), the dense
    baseline of every evaluation whose dense stage it is (same key). Any other score (another key: a model trained
    anew under another config; random init; a weights file) gets a column of its own, labelled with its stage and
    key and "(IIS only)", so no IIS sits next to another model's accuracy (issue 17: `--backbone gc_train` under
    demo_iis.yaml retrained GC at 64 px and its IIS was shown in the demo's 48 px GC column)."""
    for scored in find_iis(out_dir):
        if scored.key is not None and scored.stage == "dense":
            matched = [v for v in found.values() if v["dense"] is not None and v["dense_key"] == scored.key]
            for v in matched:
                v["dense"] = {**v["dense"], **scored.metrics}
        elif scored.key is not None:
            matched = [v for v in found.values() if v.get("models", {}).get(scored.stage) == scored.key]
            for v in matched:
                v["metrics"] = {**v["metrics"], **scored.metrics}
        else:
            matched = []
        if not matched:
            found[scored.column] = {"metrics": scored.metrics, "dense": None, "dense_key": None, "models": {},
                                    "path": scored.path, "run": Path(scored.path).parent.parent.name,
                                    "label": scored.label}


def method_columns(out_dir: Path, own: list[Column] | None = None, own_dense_key: str | None = None) -> list[Column]:
    """The dense baselines, then each method in registry order (unknown ones last): the models of `own` (a
    report's own run, whose baseline is the dense stage `own_dense_key`) first, the newest evaluation under
    `out_dir` for every other method.

    Methods may compare against different dense models (the demo: the sparse-head methods share one, GC trains its
    own baseline). Each distinct baseline is one column, labelled with the methods it is the baseline of when
    there are several, so no method is shown next to another's baseline under the name "dense"."""
    found = find_metrics(out_dir)
    own = own or []
    taken = {c.name for c in own}
    order = {name: i for i, name in enumerate(methods.names())}
    rank = lambda name: (order.get(name, len(order)), name)  # noqa: E731
    others = sorted((m for m in found if m not in taken), key=rank)
    columns = [Column(m, found[m].get("label") or methods.label(m), found[m]["metrics"], found[m]["path"])
               for m in others]
    # baseline key -> (metrics, source, methods using it), in the order of the first method using it
    baselines: dict[str, tuple[dict, str, list[str]]] = {}
    own_dense = [c for c in own if c.name == "dense"]
    own_methods = sorted((c.name for c in own if c.name != "dense"), key=rank)
    if own_dense:
        baselines[own_dense_key or "own"] = (own_dense[0].metrics, own_dense[0].source, own_methods)
    for m in sorted(others, key=lambda m: -Path(found[m]["path"]).stat().st_mtime):  # newest first wins a key
        if found[m]["dense"] is not None:
            metrics, source, users = baselines.setdefault(found[m]["dense_key"],
                                                          (found[m]["dense"], found[m]["path"], []))
            users.append(m)
    groups = sorted(baselines.values(), key=lambda b: min((rank(m) for m in b[2]), default=(-1, "")))
    dense = [Column("dense", "dense" if len(groups) == 1 else
                    f"dense ({', '.join(methods.label(m) for m in sorted(users, key=rank))})", metrics, source)
             for metrics, source, users in groups]
    merged = [c for c in own if c.name != "dense"] + columns
    merged.sort(key=lambda c: rank(c.name))
    return dense + merged


def headline_metrics(columns: list[Column]) -> list[str]:
    """The interpretability metrics (not accuracy) any compared method names as headline, in registry order,
    that at least two models report."""
    keys: list[str] = []
    for c in columns:
        if c.name in methods.names():
            keys += [k for k in methods.get(c.name).headline if k != "accuracy" and k not in keys]
    return [k for k in keys if sum(c.metrics.get(k) is not None for c in columns) >= 2]


def _png(fig) -> str:
    buffer = io.BytesIO()
    figures.save(fig, buffer)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="comparison figure">'


def comparison_figures(columns: list[Column]) -> str:
    """Accuracy against each headline metric, and the metrics with a chance baseline as paired bars."""
    keys = headline_metrics(columns)
    parts = []
    scatter = [k for k in keys if any(c.metrics.get("accuracy") is not None for c in columns)]
    if scatter:
        parts.append(_png(figures.accuracy_scatter(
            [(c.label, c.metrics) for c in columns], scatter, [SHORT_LABELS.get(k, k) for k in scatter])))
    bars = [k for k in keys if k in BASELINES]
    if bars:
        parts.append(_png(figures.baseline_bars(
            [(c.label, c.metrics) for c in columns], [(k, BASELINES[k]) for k in bars],
            [SHORT_LABELS.get(k, k) for k in bars])))
    return "".join(parts)


def comparison_section(columns: list[Column], intro: str) -> str:
    """The table and the pictures, as one HTML section."""
    sources = "".join(f"<li>{html.escape(c.label)}: {html.escape(c.source)}</li>" for c in columns if c.source)
    return (f"<h2>Methods compared</h2><p>{intro}</p>{table_html(columns)}"
            f"{comparison_figures(columns)}<ul>{sources}</ul>")


def write_comparison(out_dir: Path, html_path: Path | None = None) -> tuple[str, Path | None]:
    """`qpm-dist compare`: the text table, and an HTML page (default <out_dir>/compare.html)."""
    columns = method_columns(Path(out_dir))
    if not columns:
        return f"no <method>_evaluate-*/metrics.json under {out_dir}", None
    html_path = Path(html_path) if html_path else Path(out_dir) / "compare.html"
    intro = (f"The newest evaluation of each method under {html.escape(str(out_dir))}, and the dense model each "
             f"compares against (one column per distinct dense model).")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Methods compared</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%}</style></head><body>"
            f"{comparison_section(columns, intro)}</body></html>\n")
    atomic_write_text(html_path, page)
    return table_text(columns), html_path
