"""The evaluate stage: accuracy and the interpretability metrics of a method's final model and its baseline.

`metrics.json` maps a model name to its metrics: {"dense": {...}, "<method>": {...}} (the baseline, the dense
model, is left out for a method that has none). Every model is scored by the same streamed, all-reduced passes
(metrics.collect) against the same ground truth, so the comparison of methods is like for like.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from qpm_dist.config import Config, to_dict
from qpm_dist.metrics.collect import attributes_root, evaluate_model, ground_truth_class_similarity
from qpm_dist.stages.artifacts import METRICS, load_model, write_json
from qpm_dist.stages.runner import RunContext
from qpm_dist.utils import log


class EvaluateStage:
    """`<method>_evaluate`: the model of `final_stage` (and of `baseline`, default the dense stage).

    `k(cfg)` is the number of features per class the method aims at: SID@k / diversity@k are reported up to
    it, and a dense model's class-part links are read from its top-k weights per class."""

    def __init__(self, method: str, final_stage: str, k: Callable[[Config], int], baseline: str | None = "dense"):
        self.name, self.method, self.final_stage, self.k, self.baseline = f"{method}_evaluate", method, final_stage, k, baseline
        self.depends: tuple[str, ...] = (baseline, final_stage) if baseline else (final_stage,)

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        return {"eval": to_dict(cfg.eval), "n_per_class": self.k(cfg), "seed": cfg.run.seed}

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        gt = ground_truth_class_similarity(attributes_root(ctx.cfg.data), ctx.data.class_parts)
        models = ([("dense", self.baseline)] if self.baseline else []) + [(self.method, self.final_stage)]
        results = {}
        for name, stage in models:
            model = load_model(ctx, stage).to(ctx.info.device)
            log.info("evaluate: %s model", name)
            results[name] = evaluate_model(model, ctx.data, ctx.info, ctx.cfg.eval, ctx.autocast, ctx.cfg.run.seed,
                                           gt_similarity=gt, class_parts=ctx.data.class_parts,
                                           n_per_class=self.k(ctx.cfg))
        write_json(out_dir / METRICS, results)
        return {name: {k: v for k, v in r.items() if not isinstance(v, (list, dict))} for name, r in results.items()}
