"""The report stage: `<method>_report/report.html`, the global explanation of a method's final model next to
every other method evaluated under the same run.out_dir (rendered on rank 0; qpm_dist.report)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from qpm_dist.config import Config, to_dict
from qpm_dist.stages.artifacts import METRICS, load_model, on_main
from qpm_dist.stages.runner import RunContext


class ReportStage:
    """`<method>_report`: reads `<method>_evaluate`'s metrics and `final_stage`'s model; `extra` names further
    stages the method's report sections read (their outputs enter this stage's key)."""

    def __init__(self, method: str, final_stage: str, k: Callable[[Config], int], extra: tuple[str, ...] = ()) -> None:
        self.name, self.method, self.final_stage, self.k = f"{method}_report", method, final_stage, k
        self.evaluate_stage = f"{method}_evaluate"
        self.depends: tuple[str, ...] = (self.evaluate_stage, final_stage, *extra)

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        return {"report": to_dict(cfg.report)}

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        path = out_dir / "report.html"
        on_main(self.render, ctx, out_dir, path)
        return {"report": str(path)}

    def render(self, ctx: RunContext, out_dir: Path, path: Path) -> None:
        from qpm_dist.report.build import ReportInputs, render_report

        spec = ctx.method
        model = load_model(ctx, self.final_stage).to(ctx.info.device).eval()
        metrics = json.loads((ctx.outputs[self.evaluate_stage] / METRICS).read_text())
        inputs = ReportInputs(ctx=ctx, method=self.method, label=spec.label, metrics=metrics, model=model,
                              k=self.k(ctx.cfg), fig_dir=out_dir / "figures")
        render_report(inputs, spec.report_sections, path)
