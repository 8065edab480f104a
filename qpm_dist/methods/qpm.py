"""QPM (specs/qpm.md) as a sequence of cached stages (DESIGN.md "data flow of one QPM run"):

    dense -> stats -> qpm_solve -> qpm_sparse -> qpm_finetune -> qpm_evaluate -> qpm_report

dense         shared: backbone + dense head trained with CE + FDL (or model.weights when dense.epochs=0)
stats         the shared streamed training-set pass (test-time transforms, every rank) with QPM's
              accumulator: all-reduced float64 sums give mean/std, A, R and B (`constants.npz`); no N x F
              matrix is ever held in memory
qpm_solve     rank 0 solves the selection/assignment problem (in process or via the solver service); the
              result is written to disk and broadcast to every rank
qpm_sparse    selected channels + frozen binary class weights + frozen training mean/std; checked identical
              on every rank
qpm_finetune  the backbone is fine-tuned through the frozen sparse head (CE + FDL, the generic fine-tuning)
qpm_evaluate  accuracy and the interpretability metrics of the dense and the QPM model (`metrics.json`)
qpm_report    class-comparison figures and a self-contained HTML report of the global explanation
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qpm_dist.config import Config, ConfigError, bounded
from qpm_dist.methods import MethodSpec, register
from qpm_dist.models.backbones import check_feature_count
from qpm_dist.models.net import Classifier, ModelOutput
from qpm_dist.models.sparse import SparseHead
from qpm_dist.report.build import summary_section
from qpm_dist.report.sparse import HEADLINE, sparse_head_sections
from qpm_dist.solving import SolverConfig, load_solution, solve_and_broadcast
from qpm_dist.stages.artifacts import MODEL, load_model, on_main, read_npz, save_model
from qpm_dist.stages.evaluate import EvaluateStage
from qpm_dist.stages.report import ReportStage
from qpm_dist.stages.runner import RunContext, Stage
from qpm_dist.stages.train import DenseStage, TrainStage
from qpm_dist.stages.train_pass import Accumulator, TrainingSetPass
from qpm_dist.stats.accumulate import FeatureSums
from qpm_dist.stats.constants import compute_A, compute_B, compute_R
from qpm_dist.utils import atomic_open, log

SUMS, CONSTANTS = "sums.npz", "constants.npz"  # the stats stage's files


@dataclass
class QPMConfig:
    n_features: int = bounded(50, ge=1)
    n_per_class: int = bounded(5, ge=1)
    solver: SolverConfig = field(default_factory=SolverConfig)
    # Sparse head: dropout on the normalised features; True reproduces the reference's order (spec bug 23).
    dropout: float = bounded(0.1, ge=0, lt=1)
    dropout_before_norm: bool = False
    # Global batch of the streamed statistics pass (test-time transforms, no gradients).
    stats_batch_size: int = bounded(128, ge=1)

    def check(self, key: str) -> None:
        if not 1 <= self.n_per_class <= self.n_features:
            raise ConfigError(f"{key}.n_per_class ({self.n_per_class}) must be between 1 and {key}.n_features "
                              f"({self.n_features})")


class QPMStatistics(Accumulator):
    """Float64 feature sums with the locality sums of the maps (stats.accumulate), then A, R and B."""

    def __init__(self, model: Classifier, num_classes: int, device: torch.device) -> None:
        self.sums = FeatureSums.zeros(model.num_features, num_classes, device)

    def update(self, split: str, output: ModelOutput, labels: torch.Tensor) -> None:
        self.sums.update(output.features, labels, output.feature_maps)

    def finish(self, out_dir: Path) -> dict[str, Any]:
        sums = self.sums.all_reduce().cpu()
        on_main(self.write, sums, out_dir)
        return {"images": int(sums.count), "features": int(sums.sum.numel()), "classes": int(sums.class_counts.numel()),
                "zero_variance_features": int((sums.std <= 0).sum())}

    @staticmethod
    def write(sums: FeatureSums, out_dir: Path) -> None:
        A = compute_A(sums)
        R, B = compute_R(A), compute_B(sums)
        sums.save(out_dir / SUMS)
        with atomic_open(out_dir / CONSTANTS) as fh:
            np.savez(fh, A=A, R=R, b=B, mean=sums.mean.numpy(), std=sums.std.numpy())
        log.info("stats: %d images, A %s, R %s, B in [%.3f, %.3f]", int(sums.count), A.shape, R.shape, B.min(), B.max())


def stats_stage() -> TrainingSetPass:
    return TrainingSetPass("stats", "dense", lambda ctx, model, out_dir: [QPMStatistics(model, ctx.data.num_classes,
                                                                                         ctx.info.device)],
                           batch_size=lambda cfg: cfg.qpm.stats_batch_size)


class SolveStage:
    name = "qpm_solve"
    depends: tuple[str, ...] = ("stats",)

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        s = cfg.qpm.solver
        return {"n_features": cfg.qpm.n_features, "n_per_class": cfg.qpm.n_per_class, "seed": cfg.run.seed,
                "backend": s.backend, "time_limit": s.time_limit, "mip_gap": s.mip_gap, "threads": s.threads}

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        q = ctx.cfg.qpm
        problem = lambda: _problem_constants(ctx.outputs["stats"] / CONSTANTS, q.n_features)  # noqa: E731
        return solve_and_broadcast(problem, q.n_features, q.n_per_class, q.solver, ctx.cfg.run.seed, out_dir)["summary"]


def _problem_constants(path: Path, n_features: int) -> tuple:
    with np.load(path) as c:
        A, R, b = c["A"], c["R"], c["b"]
    if n_features > A.shape[0]:
        raise ValueError(f"qpm.n_features={n_features} exceeds the model's {A.shape[0]} features")
    return A, R, b


class SparseStage:
    """The dense model with its head replaced by QPM's sparse head (selection, binary weights, frozen
    training mean/std); every rank builds it and the ranks' copies are checked identical."""

    name = "qpm_sparse"
    depends: tuple[str, ...] = ("dense", "stats", "qpm_solve")

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        return {"dropout": cfg.qpm.dropout, "dropout_before_norm": cfg.qpm.dropout_before_norm}

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        cfg = ctx.cfg
        model = load_model(ctx, "dense")
        solution = load_solution(ctx.outputs["qpm_solve"])
        stats = read_npz(ctx.outputs["stats"] / CONSTANTS)
        model.head = SparseHead(torch.from_numpy(solution["selected"]),
                                torch.from_numpy(solution["assignment"].astype(np.float32)),
                                torch.from_numpy(stats["mean"]), torch.from_numpy(stats["std"]),
                                dropout=cfg.qpm.dropout, dropout_before_norm=cfg.qpm.dropout_before_norm)
        digests = save_model(out_dir / MODEL, model)
        head = model.head
        return {"selected": head.selection.tolist(), "n_features": head.selection.numel(),
                "nonzero_weights": int((head.weight != 0).sum()), "rank_digests": digests}


def stages(cfg: Config) -> list[Stage]:
    k = lambda c: c.qpm.n_per_class  # noqa: E731
    return [DenseStage(), stats_stage(), SolveStage(), SparseStage(),
            TrainStage("qpm_finetune", "finetune", lambda c: c.finetune, model_stage="qpm_sparse", seed_offset=1),
            EvaluateStage("qpm", "qpm_finetune", k), ReportStage("qpm", "qpm_finetune", k, extra=("qpm_solve",))]


def report_sections(inputs) -> list[tuple[str, str]]:
    return [summary_section("Solve", inputs.stage_summary("qpm_solve")), *sparse_head_sections(inputs)]


def validate(cfg: Config) -> None:
    check_feature_count(cfg.qpm.n_features, "qpm.n_features", cfg.model)


SPEC = register(MethodSpec(
    name="qpm", label="QPM", sections={"qpm": QPMConfig}, stages=stages, head=SparseHead,
    report_sections=report_sections, validate=validate, demo_config="demo.yaml", order=10,
    headline=HEADLINE,
))
