"""The HTML report of a method's final model (rendered on rank 0).

Self-contained: every figure is embedded as a base64 PNG, so the single `report.html` opens offline in a
browser. Generic part: what was trained on what, then the comparison of this run's dense and final model with
every other method evaluated under the same run.out_dir (one table, then pictures). Then the method's own
sections (its spec's `report_sections`, e.g. the solve and the sparse head's global explanation, see
report.sparse). PNGs are also written next to the HTML.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from qpm_dist.report.compare import baseline_key, comparison_section, method_columns
from qpm_dist.report.tables import Column, fmt
from qpm_dist.stages.artifacts import RECORD
from qpm_dist.utils import atomic_write_text, log


@dataclass
class ReportInputs:
    """What a report section may read: the run (ctx: config, data, stage folders), this method's metrics.json,
    its final model (on the device, eval mode) and the folder for figures."""

    ctx: Any  # stages.runner.RunContext
    method: str
    label: str
    metrics: dict  # {"dense": ..., method: ...}
    model: nn.Module
    k: int  # features per class the method aims at
    fig_dir: Path

    def stage_summary(self, stage: str) -> dict:
        """The summary a finished stage returned (its stage.json), without per-rank digests."""
        record = json.loads((self.ctx.outputs[stage] / RECORD).read_text())
        return {k: v for k, v in (record.get("summary") or {}).items() if k != "rank_digests"}


def img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(Path(path).name)}">'


def summary_section(title: str, summary: dict) -> tuple[str, str]:
    """A stage's summary as a two-column table."""
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{fmt(v)}</td></tr>" for k, v in summary.items())
    return title, f"<table>{rows}</table>"


def render_report(inputs: ReportInputs, sections, path: Path) -> None:
    """Write `path` (report.html): the generic part, then `sections(inputs)`."""
    cfg, data = inputs.ctx.cfg, inputs.ctx.data
    inputs.fig_dir.mkdir(exist_ok=True)
    own = [Column(name, "dense" if name == "dense" else inputs.label, metrics)
           for name, metrics in inputs.metrics.items()]
    own_dense_key = baseline_key(inputs.ctx.outputs[f"{inputs.method}_evaluate"])
    columns = method_columns(Path(cfg.run.out_dir), own=own, own_dense_key=own_dense_key)
    intro = (f"This run's models ({html.escape(', '.join(c.label for c in own))}) and the newest evaluation of "
             f"every other method under {html.escape(cfg.run.out_dir)}.")
    log.info("report: rendering figures into %s", inputs.fig_dir)
    body = "".join(f"<h2>{html.escape(title)}</h2>{content}" for title, content in sections(inputs))
    title = f"{inputs.label} report: {html.escape(cfg.run.name)}"
    atomic_write_text(path, f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; font-size: 13px; text-align: left; }}
img {{ max-width: 100%; }}
.cls {{ border-top: 1px solid #ddd; margin-top: 1em; }}
</style></head><body>
<h1>{inputs.label} global explanation — {html.escape(cfg.run.name)}</h1>
<p>Dataset <b>{html.escape(cfg.data.dataset)}</b> ({data.num_classes} classes), backbone
<b>{html.escape(cfg.model.arch)}</b>, method <b>{inputs.label}</b>.</p>
{comparison_section(columns, intro)}
{body}
</body></html>
""")
    log.info("report: %s", path)
