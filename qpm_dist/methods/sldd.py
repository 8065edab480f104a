"""SLDD-Model ("Take 5", specs/qsenn_sldd.md §4–§6) as a sequence of cached stages:

    dense -> features -> glm_select -> sldd_fit -> sldd_sparse -> sldd_finetune -> sldd_evaluate -> sldd_report

dense          shared with QPM and Q-SENN (same stage, same cache key for the same settings)
features       per-rank feature shards + all-reduced statistics of the dense model (shared with Q-SENN)
glm_select     n_features features by the group-lasso path (shared with Q-SENN's round 0)
sldd_fit       elastic-net path (α = 0.99) on the selected, standardised features, walked until it is denser
               than n_per_class / drop_rate non-zeros per class
sldd_sparse    the densest path point under that cap, pruned to n_per_class·C weights with every class keeping
               at least `min_per_class`; installed as the sparse head (frozen W and b, trainable mean/std)
sldd_finetune  the backbone and the head's mean/std fine-tuned (finetune.*, the generic fine-tuning)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qpm_dist.config import Config, bounded
from qpm_dist.glm.config import GLMConfig
from qpm_dist.glm.rules import choose_sldd_point, fill_empty_rows, prune_sldd
from qpm_dist.methods import MethodSpec, register
from qpm_dist.methods.glm_stages import (SELECT_STAGE, FitStage, SelectStage, check_sparse_section, features_stage,
                                         load_selection, read_path, sparse_head_options)
from qpm_dist.models.backbones import check_feature_count
from qpm_dist.models.sparse import SparseHead
from qpm_dist.report.build import summary_section
from qpm_dist.report.sparse import HEADLINE, sparse_head_sections
from qpm_dist.stages.artifacts import MODEL, load_model, save_model
from qpm_dist.stages.evaluate import EvaluateStage
from qpm_dist.stages.report import ReportStage
from qpm_dist.stages.runner import RunContext, Stage
from qpm_dist.stages.train import DenseStage, TrainStage
from qpm_dist.utils import log


@dataclass
class SLDDConfig:
    n_features: int = bounded(50, ge=1)
    n_per_class: int = bounded(5, ge=1)
    # Path point: the densest with at most n_per_class / drop_rate non-zero weights per class (reference 0.5).
    drop_rate: float = bounded(0.5, gt=0, le=1)
    # Pruning keeps n_per_class·C weights, but first each class's largest `min_per_class` (the reference's
    # global cut could leave a class empty).
    min_per_class: int = bounded(1, ge=0)
    dropout: float = bounded(0.1, ge=0, lt=1)
    dropout_before_norm: bool = False
    train_normalisation: bool = True  # the head's mean/std are fine-tuned (W and b stay frozen)

    def check(self, key: str) -> None:
        check_sparse_section(self, key)


def sldd_layer(path: dict[str, np.ndarray], n_per_class: int, drop_rate: float, min_per_class: int) -> dict:
    """The SLDD layer from a fit path: chosen point, filled empty classes, pruned weights."""
    weights = path["weight"]
    per_class = [float(np.count_nonzero(W)) / W.shape[0] for W in weights]
    cap = n_per_class / drop_rate
    index = choose_sldd_point(per_class, cap)
    weight, filled = fill_empty_rows(weights[index], list(weights[index + 1:]))
    pruned = prune_sldd(weight, n_per_class, min_per_class)
    return {"index": index, "weight": pruned, "bias": path["bias"][index], "filled_classes": filled,
            "per_class_at_point": per_class[index], "cap": cap}


class SLDDSparseStage:
    name = "sldd_sparse"
    depends: tuple[str, ...] = ("dense", SELECT_STAGE, "sldd_fit")

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        s = cfg.sldd
        return {"n_per_class": s.n_per_class, "drop_rate": s.drop_rate, "min_per_class": s.min_per_class,
                "dropout": s.dropout, "dropout_before_norm": s.dropout_before_norm,
                "train_normalisation": s.train_normalisation}

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        cfg = ctx.cfg
        path = read_path(ctx.outputs["sldd_fit"])
        layer = sldd_layer(path, cfg.sldd.n_per_class, cfg.sldd.drop_rate, cfg.sldd.min_per_class)
        if layer["filled_classes"]:
            log.warning("sldd: classes %s had no weight at the chosen path point; they take their row from the "
                        "first denser point", layer["filled_classes"])
        model = load_model(ctx, "dense")
        model.head = SparseHead(load_selection(ctx), torch.from_numpy(layer["weight"]),
                                torch.from_numpy(path["mean"]), torch.from_numpy(path["std"]),
                                bias=torch.from_numpy(layer["bias"]), **sparse_head_options(cfg.sldd))
        digests = save_model(out_dir / MODEL, model)
        W = layer["weight"]
        counts = (W != 0).sum(axis=1)
        return {"point": layer["index"], "lambda": float(path["lam"][layer["index"]]),
                "per_class_at_point": layer["per_class_at_point"], "cap": layer["cap"],
                "linear_test_acc_at_point": float(path["test_acc"][layer["index"]]),
                "nonzero_weights": int(counts.sum()), "per_class_min": int(counts.min()),
                "per_class_max": int(counts.max()), "features_used": int((W != 0).any(axis=0).sum()),
                "filled_classes": layer["filled_classes"], "rank_digests": digests}


def stages(cfg: Config) -> list[Stage]:
    k = lambda c: c.sldd.n_per_class  # noqa: E731
    return [
        DenseStage(),
        features_stage("features", "dense"),
        SelectStage("sldd"),
        FitStage("sldd_fit", "features", select_columns=True, stop_rule="sldd", section="sldd"),
        SLDDSparseStage(),
        TrainStage("sldd_finetune", "finetune", lambda c: c.finetune, model_stage="sldd_sparse", seed_offset=1),
        EvaluateStage("sldd", "sldd_finetune", k),
        ReportStage("sldd", "sldd_finetune", k, extra=("sldd_sparse",)),
    ]


def report_sections(inputs) -> list[tuple[str, str]]:
    return [summary_section("Sparse layer", inputs.stage_summary("sldd_sparse")), *sparse_head_sections(inputs)]


def validate(cfg: Config) -> None:
    check_feature_count(cfg.sldd.n_features, "sldd.n_features", cfg.model)


SPEC = register(MethodSpec(
    name="sldd", label="SLDD", sections={"sldd": SLDDConfig, "glm": GLMConfig}, stages=stages, head=SparseHead,
    report_sections=report_sections, validate=validate, demo_config="demo_sldd.yaml", order=20,
    headline=HEADLINE,
))
