"""QPM as a sequence of cached stages (specs/qpm.md §1, DESIGN.md "data flow of one QPM run"):

    dense -> stats -> solve -> sparse -> finetune -> evaluate -> report

dense     backbone + dense head trained with CE + FDL (or taken from model.weights when dense.epochs=0)
stats     one streamed pass over the training set (test-time transforms) on all ranks; all-reduced sums
          give mean/std, A, R and B (`constants.npz`); no N x F matrix is ever held in memory
solve     rank 0 solves the selection/assignment problem (in process or via the solver service), the
          result is written to disk and broadcast to every rank
sparse    selected channels + frozen binary class weights + frozen training mean/std; checked identical
          on every rank
finetune  the backbone is fine-tuned through the frozen sparse head (CE + FDL)
evaluate  accuracy and the interpretability metrics of the dense and the QPM model (`metrics.json`)
report    class-comparison figures and a self-contained HTML report of the global explanation
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from qpm_dist import dist
from qpm_dist.config import Config, to_dict
from qpm_dist.engine.trainer import Trainer
from qpm_dist.losses import ClassificationLoss
from qpm_dist.methods.common import (DenseStage, autocast, data_key, prepare_for_training, save_model,
                                     seed_rank_streams, trainer_setup)
from qpm_dist.methods.stages import RunContext, Stage
from qpm_dist.models.io import load_classifier, state_digest
from qpm_dist.models.net import Classifier
from qpm_dist.models.sparse import SparseHead
from qpm_dist.stats.accumulate import collect_feature_sums
from qpm_dist.stats.constants import compute_A, compute_B, compute_R
from qpm_dist.utils import atomic_write_text, log


class StatsStage:
    name = "stats"
    depends: tuple[str, ...] = ("dense",)

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        return {"data": data_key(cfg), "precision": cfg.engine.precision}

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        info = ctx.info
        model = load_classifier(ctx.cfg, ctx.data.num_classes, ctx.outputs["dense"] / "model.pt").to(info.device)
        per_rank = max(1, ctx.cfg.qpm.stats_batch_size // info.world_size)
        loader = ctx.data.eval_loader("train", per_rank, info.rank, info.world_size,
                                      pin_memory=info.device.type == "cuda")
        with tqdm(total=len(loader), desc="stats: training set", leave=False, disable=not info.is_main) as bar:
            sums = collect_feature_sums(model, loader, ctx.data.num_classes, info.device, autocast(ctx),
                                        progress=bar)
        sums = sums.cpu()
        summary = {"images": int(sums.count), "features": int(sums.sum.numel()), "classes": ctx.data.num_classes,
                   "zero_variance_features": int((sums.std <= 0).sum())}
        if info.is_main:
            A = compute_A(sums)
            R, B = compute_R(A), compute_B(sums)
            sums.save(out_dir / "sums.npz")
            np.savez(out_dir / "constants.npz", A=A, R=R, b=B, mean=sums.mean.numpy(), std=sums.std.numpy())
            log.info("stats: %d images, A %s, R %s, B in [%.3f, %.3f]", summary["images"], A.shape, R.shape,
                     B.min(), B.max())
        dist.barrier()
        return summary


class SolveStage:
    name = "solve"
    depends: tuple[str, ...] = ("stats",)

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        s = cfg.qpm.solver
        return {"n_features": cfg.qpm.n_features, "n_per_class": cfg.qpm.n_per_class, "seed": cfg.run.seed,
                "backend": s.backend, "time_limit": s.time_limit, "mip_gap": s.mip_gap, "threads": s.threads}

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        from qpm_dist.solving import solve_and_broadcast

        A = R = b = None
        if ctx.info.is_main:
            with np.load(ctx.outputs["stats"] / "constants.npz") as c:
                A, R, b = c["A"], c["R"], c["b"]
                if ctx.cfg.qpm.n_features > A.shape[0]:
                    raise ValueError(f"qpm.n_features={ctx.cfg.qpm.n_features} exceeds the model's "
                                     f"{A.shape[0]} features")
        return solve_and_broadcast(A, R, b, ctx.cfg.qpm, ctx.cfg.run.seed, out_dir)["summary"]


def build_sparse_model(ctx: RunContext) -> Classifier:
    """The dense model with its head replaced by QPM's sparse head; identical on every rank."""
    from qpm_dist.solving import load_solution

    cfg = ctx.cfg
    model = load_classifier(cfg, ctx.data.num_classes, ctx.outputs["dense"] / "model.pt")
    solution = load_solution(ctx.outputs["solve"])
    stats = dist.broadcast_object(
        {k: v for k, v in np.load(ctx.outputs["stats"] / "constants.npz").items() if k in ("mean", "std")}
        if ctx.info.is_main else None)
    selection = torch.from_numpy(solution["selected"])
    weight = torch.from_numpy(solution["assignment"].astype(np.float32))
    model.head = SparseHead(selection, weight, torch.from_numpy(stats["mean"]), torch.from_numpy(stats["std"]),
                            dropout=cfg.qpm.dropout, dropout_before_norm=cfg.qpm.dropout_before_norm)
    return model


class SparseStage:
    name = "sparse"
    depends: tuple[str, ...] = ("dense", "stats", "solve")

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        return {"dropout": cfg.qpm.dropout, "dropout_before_norm": cfg.qpm.dropout_before_norm}

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        model = build_sparse_model(ctx)
        digests = dist.all_gather_object(state_digest(model.state_dict()))
        if len(set(digests)) != 1:
            raise RuntimeError(f"sparse models differ across ranks: {digests}")
        save_model(model, out_dir / "model.pt")
        head = model.head
        return {"selected": head.selection.tolist(), "n_features": head.selection.numel(),
                "nonzero_weights": int((head.weight != 0).sum()), "rank_digests": digests}


class FinetuneStage:
    name = "finetune"
    depends: tuple[str, ...] = ("sparse",)

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        phase = to_dict(cfg.finetune)
        phase["eval_every_epochs"] = 1  # evaluation cadence does not change weights
        return {"data": data_key(cfg), "model": to_dict(cfg.model), "finetune": phase, "seed": cfg.run.seed,
                "strategy": cfg.engine.strategy, "precision": cfg.engine.precision}

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        model = prepare_for_training(load_classifier(ctx.cfg, ctx.data.num_classes,
                                                     ctx.outputs["sparse"] / "model.pt"), ctx.cfg)
        seed_rank_streams(ctx.cfg.run.seed + 1, ctx.info.rank)
        phase = ctx.cfg.finetune
        criterion = ClassificationLoss(phase.fdl_beta, phase.fdl_detach_weights, phase.label_smoothing)
        return Trainer(trainer_setup(ctx, "finetune", out_dir), model, criterion, ctx.data, ctx.info).fit()


class EvaluateStage:
    name = "evaluate"
    depends: tuple[str, ...] = ("dense", "finetune")

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        return {"eval": to_dict(cfg.eval), "n_per_class": cfg.qpm.n_per_class, "seed": cfg.run.seed}

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        from qpm_dist.metrics.collect import evaluate_model, ground_truth_class_similarity

        gt = ground_truth_class_similarity(Path(ctx.cfg.data.root), ctx.data.class_parts)
        results = {}
        for name, stage in (("dense", "dense"), ("qpm", "finetune")):
            model = load_classifier(ctx.cfg, ctx.data.num_classes, ctx.outputs[stage] / "model.pt").to(ctx.info.device)
            log.info("evaluate: %s model", name)
            results[name] = evaluate_model(model, ctx.data, ctx.info, ctx.cfg.eval, autocast(ctx), ctx.cfg.run.seed,
                                           gt_similarity=gt, class_parts=ctx.data.class_parts,
                                           n_per_class=ctx.cfg.qpm.n_per_class)
        if ctx.info.is_main:
            atomic_write_text(out_dir / "metrics.json", json.dumps(results, indent=1))
        dist.barrier()
        return {name: {k: v for k, v in r.items() if not isinstance(v, (list, dict))} for name, r in results.items()}


class ReportStage:
    name = "report"
    depends: tuple[str, ...] = ("evaluate",)

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        return {"report": to_dict(cfg.report)}

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        from qpm_dist.report.build import build_report

        path = build_report(ctx, out_dir)
        return {"report": str(path)}


def stages() -> list[Stage]:
    return [DenseStage(), StatsStage(), SolveStage(), SparseStage(), FinetuneStage(), EvaluateStage(), ReportStage()]
