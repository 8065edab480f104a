"""Stages shared by SLDD and Q-SENN (specs/qsenn_sldd.md §2, §4, §5, §8): the glm-based sparse layer.

features  one pass of a model (dense, or the previous Q-SENN round's fine-tuned one) over the training and
          test sets with test-time transforms; every rank writes its rows' RAW pooled features (for a sparse
          model: of the selected channels, before the head's normalisation, spec bug 3) to its own shard file
          and adds them to the streamed FeatureSums (one all-reduce) that give mean, std and class sums
select    feature selection along the group-lasso path (qpm_dist.glm.path)
fit       the elastic-net path on the selected, standardised features
finetune  the backbone (and the head's mean/std) fine-tuned through the frozen sparse weights and bias
evaluate  accuracy and interpretability metrics of the dense and the final model
report    the HTML report, with a comparison of every method run under the same run.out_dir

Solvers: `glm.solver=fast` runs on every rank over its own shards (gradients all-reduced);
`glm.solver=glm_saga` runs on rank 0 over all rows while the other ranks wait.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from qpm_dist import dist
from qpm_dist.config import Config, PhaseConfig, to_dict
from qpm_dist.engine.trainer import Trainer, TrainerSetup
from qpm_dist.glm.path import PathPoint, fit_path, scores_at_start, select_features
from qpm_dist.glm.problem import class_correlation, lambda_grid, lambda_max, optimal_bias
from qpm_dist.glm.shards import ShardWriter, load_rows, read_meta, shards_for, write_meta
from qpm_dist.losses import ClassificationLoss
from qpm_dist.methods.common import autocast, data_key, prepare_for_training, save_model, seed_rank_streams
from qpm_dist.methods.stages import RunContext
from qpm_dist.models.io import load_classifier, state_digest
from qpm_dist.models.net import Classifier, ModelOutput
from qpm_dist.stats.accumulate import FeatureSums
from qpm_dist.utils import atomic_write_text, log


def solver_key(cfg: Config, path: str) -> dict[str, Any]:
    """The solver settings a path depends on (the other solver's settings do not enter the key)."""
    g = cfg.glm
    part = {"solver": g.solver, "path": to_dict(getattr(g, path))}
    if g.solver == "glm_saga":
        part["saga"] = to_dict(g.saga)
        part["seed"] = cfg.run.seed
    else:
        part["fast"] = to_dict(g.fast)
        part["path"].pop("lookbehind")
    return part


# ------------------------------------------------------------------------------------------------ features


def raw_features(out: ModelOutput) -> torch.Tensor:
    """The pooled feature maps of a model's output: for a sparse head the selected channels BEFORE its
    normalisation (the head returns z = (f − μ)/σ as `features`; fitting on z but installing statistics of z
    on raw f was spec bug 3)."""
    return out.feature_maps.float().mean(dim=(2, 3))


class FeaturesStage:
    def __init__(self, name: str = "features", model_stage: str = "dense") -> None:
        self.name, self.model_stage = name, model_stage
        self.depends: tuple[str, ...] = (model_stage,)

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        return {"data": data_key(cfg), "precision": cfg.engine.precision, "dtype": cfg.glm.features_dtype}

    @torch.no_grad()
    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        info, cfg = ctx.info, ctx.cfg
        model = load_classifier(cfg, ctx.data.num_classes, ctx.outputs[self.model_stage] / "model.pt").to(info.device)
        model.eval()
        per_rank = max(1, cfg.glm.batch_size // info.world_size)
        head = model.head
        dim = int(head.selection.numel()) if hasattr(head, "selection") else model.num_features
        sums = FeatureSums.zeros(dim, ctx.data.num_classes, info.device)
        rows: dict[str, int] = {}
        for split in ("train", "test"):
            loader = ctx.data.eval_loader(split, per_rank, info.rank, info.world_size,
                                          pin_memory=info.device.type == "cuda")
            # every backend's eval loader yields rows rank, rank + W, ... of the split (no padding)
            rows_here = len(range(info.rank, ctx.data.num_samples(split), info.world_size))
            writer = ShardWriter(out_dir, split, info.rank, rows_here, dim, cfg.glm.features_dtype)
            with tqdm(total=len(loader), desc=f"features: {split}", leave=False, disable=not info.is_main) as bar:
                for images, labels in loader:
                    images, labels = images.to(info.device, non_blocking=True), labels.to(info.device)
                    with autocast(ctx)():
                        out = model(images)
                    pooled = raw_features(out)
                    writer.add(pooled, labels)
                    if split == "train":
                        sums.update(pooled, labels)
                    bar.update(1)
            rows[split] = writer.close()
        sums = sums.all_reduce().cpu()
        all_rows = dist.all_gather_object(rows)
        if info.is_main:
            sums.save(out_dir / "sums.npz")
            write_meta(out_dir, {"world_size": info.world_size, "dim": dim, "dtype": cfg.glm.features_dtype,
                                 "rows": {s: [r[s] for r in all_rows] for s in ("train", "test")}})
        dist.barrier()
        return {"train_rows": sum(r["train"] for r in all_rows), "test_rows": sum(r["test"] for r in all_rows),
                "features": dim, "zero_variance_features": int((sums.std <= 0).sum()), "model": self.model_stage}


class GLMData:
    """What a path needs from a features stage: statistics, λ_max and the (sharded or gathered) rows."""

    def __init__(self, ctx: RunContext, features_stage: str, columns: torch.Tensor | None = None) -> None:
        self.ctx = ctx
        self.folder = ctx.outputs[features_stage]
        sums = FeatureSums.load(self.folder / "sums.npz")
        self.columns = columns
        cols = slice(None) if columns is None else columns
        self.mean, self.std = sums.mean[cols], sums.std[cols]
        self.class_counts = sums.class_counts
        self.count = float(sums.count)
        self.corr = class_correlation(sums.class_sums[:, cols], sums.class_counts, self.mean, self.std, self.count)
        self.num_classes = ctx.data.num_classes
        self.dim = int(self.mean.numel())

    def rows(self, split: str, gathered: bool) -> tuple[torch.Tensor, torch.Tensor]:
        meta = read_meta(self.folder)
        info = self.ctx.info
        shards = list(range(meta["world_size"])) if gathered else shards_for(meta["world_size"], info.rank,
                                                                             info.world_size)
        return load_rows(self.folder, split, shards, self.mean, self.std, info.device, self.columns)

    def solver(self, cfg: Config, path_name: str, with_test: bool, log_path: Path | None = None):
        """A FastGLM on this rank's rows, or (glm_saga, rank 0 only) a SagaGLM on all rows."""
        g = cfg.glm
        bias = optimal_bias(self.class_counts)
        if g.solver == "fast":
            from qpm_dist.glm.fast import FastGLM, FastOptions

            X, y = self.rows("train", gathered=False)
            test = self.rows("test", gathered=False) if with_test else None
            opts = FastOptions(tol=g.fast.tol, max_iter=g.fast.max_iter, screening=g.fast.screening)
            return FastGLM(X, y, self.num_classes, int(self.count), bias, opts, reduce=True, test=test)
        from qpm_dist.glm.saga import SagaGLM, SagaOptions

        X, y = self.rows("train", gathered=True)
        test = self.rows("test", gathered=True) if with_test else None
        s = g.saga
        opts = SagaOptions(batch_size=s.batch_size, lr=s.lr, max_epochs=s.max_epochs, tol=s.tol,
                           lookbehind=getattr(g, path_name).lookbehind, seed=cfg.run.seed)
        return SagaGLM(X, y, self.num_classes, bias, opts, test=test, log_path=log_path)


def _participates(cfg: Config) -> bool:
    """fast: every rank walks the path (collectives inside); glm_saga: rank 0 alone."""
    return cfg.glm.solver == "fast" or dist.is_main()


def _progress(ctx: RunContext) -> Callable[[str], None] | None:
    return (lambda msg: log.info("%s", msg)) if ctx.info.is_main else None


# ------------------------------------------------------------------------------------------------ select


class SelectStage:
    name = "select"

    def __init__(self, section: str, features_stage: str = "features") -> None:
        self.section, self.features_stage = section, features_stage
        self.depends: tuple[str, ...] = (features_stage,)

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        return {"n_features": getattr(cfg, self.section).n_features, **solver_key(cfg, "selection")}

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        cfg = ctx.cfg
        n_features = getattr(cfg, self.section).n_features
        data = GLMData(ctx, self.features_stage)
        if n_features > data.dim:
            raise ValueError(f"{self.section}.n_features={n_features} exceeds the model's {data.dim} features")
        p = cfg.glm.selection
        lam_max = lambda_max(data.corr, p.alpha, group=True)
        lams = lambda_grid(lam_max, p.path_points, p.epsilon)
        payload = None
        if _participates(cfg):
            solver = data.solver(cfg, "selection", with_test=False, log_path=out_dir / "glm_saga.log")
            order, records = select_features(solver, lams, p.alpha, n_features, scores_at_start(data.corr, True),
                                             progress=_progress(ctx))
            payload = {"selected": sorted(order), "entry_order": order, "lambda_max": lam_max,
                       "solver": cfg.glm.solver, "path_points_visited": len(records), "path": records}
        payload = dist.broadcast_object(payload)
        if ctx.info.is_main:
            atomic_write_text(out_dir / "selection.json", json.dumps(payload, indent=1))
        dist.barrier()
        return {k: v for k, v in payload.items() if k != "path"}


def load_selection(ctx: RunContext) -> torch.Tensor:
    return torch.tensor(json.loads((ctx.outputs["select"] / "selection.json").read_text())["selected"])


# ------------------------------------------------------------------------------------------------ fit


class FitStage:
    """The elastic-net path on the selected features; `stop` decides where the walk may end."""

    def __init__(self, name: str, features_stage: str, select_columns: bool, stop_rule: str, section: str) -> None:
        self.name, self.features_stage, self.select_columns = name, features_stage, select_columns
        self.stop_rule, self.section = stop_rule, section
        self.depends: tuple[str, ...] = (features_stage, "select") if select_columns else (features_stage,)

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        parts = {"stop_rule": self.stop_rule, **solver_key(cfg, "fit")}
        if self.stop_rule == "sldd":
            s = cfg.sldd
            parts["cap"] = s.n_per_class / s.drop_rate
        return parts

    def _stop(self, cfg: Config, num_classes: int) -> Callable[[list[PathPoint]], bool] | None:
        if self.stop_rule != "sldd":
            return None
        cap = cfg.sldd.n_per_class / cfg.sldd.drop_rate
        seen = np.zeros(num_classes, dtype=bool)

        def stop(points: list[PathPoint]) -> bool:
            """Past the densest usable point, and every class has had a weight somewhere on the path."""
            seen[:] |= points[-1].weight.any(axis=1)
            return points[-1].per_class > cap and bool(seen.all())

        return stop

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        cfg = ctx.cfg
        columns = load_selection(ctx) if self.select_columns else None
        data = GLMData(ctx, self.features_stage, columns)
        p = cfg.glm.fit
        lam_max = lambda_max(data.corr, p.alpha, group=False)
        lams = lambda_grid(lam_max, p.path_points, p.epsilon)
        points = None
        if _participates(cfg):
            solver = data.solver(cfg, "fit", with_test=True, log_path=out_dir / "glm_saga.log")
            points = fit_path(solver, lams, p.alpha, self._stop(cfg, data.num_classes), progress=_progress(ctx))
        if ctx.info.is_main:
            np.savez(out_dir / "path.npz", lam=np.array([q.lam for q in points]),
                     weight=np.stack([q.weight for q in points]), bias=np.stack([q.bias for q in points]),
                     nnz=np.array([q.nnz for q in points]), train_acc=np.array([q.train_acc for q in points]),
                     test_acc=np.array([q.test_acc for q in points]), mean=data.mean.numpy(), std=data.std.numpy())
            atomic_write_text(out_dir / "path.json", json.dumps(
                [{"index": q.index, "lam": q.lam, "per_class": q.per_class, "train_acc": q.train_acc,
                  "test_acc": q.test_acc, "seconds": q.seconds, **q.info} for q in points], indent=1))
        summary = None
        if ctx.info.is_main:
            last = points[-1]
            summary = {"solver": cfg.glm.solver, "lambda_max": lam_max, "points": len(points),
                       "last_per_class": last.per_class, "last_train_acc": last.train_acc,
                       "last_test_acc": last.test_acc, "seconds": round(sum(q.seconds for q in points), 2)}
        dist.barrier()
        return dist.broadcast_object(summary)


def read_path(folder: Path) -> dict[str, np.ndarray]:
    """A fit stage's path, read on rank 0 and broadcast (identical arrays on every rank)."""
    payload = None
    if dist.is_main():
        with np.load(folder / "path.npz") as f:
            payload = {k: f[k] for k in f.files}
    return dist.broadcast_object(payload)


# ------------------------------------------------------------------------------------------------ sparse model


def install_and_save(ctx: RunContext, model: Classifier, out_dir: Path) -> list[str]:
    """Check the sparse model is identical on every rank, save it; returns the ranks' digests."""
    digests = dist.all_gather_object(state_digest(model.state_dict()))
    if len(set(digests)) != 1:
        raise RuntimeError(f"sparse models differ across ranks: {digests}")
    save_model(model, out_dir / "model.pt")
    return digests


# ------------------------------------------------------------------------------------------------ fine-tuning


class FinetuneStage:
    """Fine-tune the model of `model_stage` with `phase(cfg)` (SLDD: finetune; Q-SENN: that round's settings)."""

    def __init__(self, name: str, model_stage: str, phase: Callable[[Config], PhaseConfig], seed_offset: int = 1) -> None:
        self.name, self.model_stage, self.phase, self.seed_offset = name, model_stage, phase, seed_offset
        self.depends: tuple[str, ...] = (model_stage,)

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        phase = dataclasses.replace(self.phase(cfg), eval_every_epochs=1)  # evaluation cadence does not change weights
        return {"data": data_key(cfg), "model": to_dict(cfg.model), "finetune": to_dict(phase), "seed": cfg.run.seed,
                "strategy": cfg.engine.strategy, "precision": cfg.engine.precision}

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        cfg = ctx.cfg
        model = prepare_for_training(load_classifier(cfg, ctx.data.num_classes,
                                                     ctx.outputs[self.model_stage] / "model.pt"), cfg)
        seed_rank_streams(cfg.run.seed + self.seed_offset, ctx.info.rank)
        phase = self.phase(cfg)
        criterion = ClassificationLoss(phase.fdl_beta, phase.fdl_detach_weights, phase.label_smoothing)
        setup = TrainerSetup(phase="finetune", cfg=phase, engine=cfg.engine, wandb=cfg.wandb, stage_dir=out_dir,
                             run_name=f"{cfg.run.name}/{self.name}", resume=cfg.run.resume, config_dict=to_dict(cfg))
        return Trainer(setup, model, criterion, ctx.data, ctx.info).fit()


# ------------------------------------------------------------------------------------------------ evaluate, report


class EvaluateStage:
    """metrics.json: {"dense": ..., <method>: ...} with the same metrics as QPM's evaluation."""

    def __init__(self, name: str, method: str, final_stage: str) -> None:
        self.name, self.method, self.final_stage = name, method, final_stage
        self.depends: tuple[str, ...] = ("dense", final_stage)

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        return {"eval": to_dict(cfg.eval), "n_per_class": getattr(cfg, self.method).n_per_class, "seed": cfg.run.seed}

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        from qpm_dist.metrics.collect import evaluate_model, ground_truth_class_similarity

        gt = ground_truth_class_similarity(Path(ctx.cfg.data.root), ctx.data.class_parts)
        results = {}
        for name, stage in (("dense", "dense"), (self.method, self.final_stage)):
            model = load_classifier(ctx.cfg, ctx.data.num_classes, ctx.outputs[stage] / "model.pt").to(ctx.info.device)
            log.info("evaluate: %s model", name)
            results[name] = evaluate_model(model, ctx.data, ctx.info, ctx.cfg.eval, autocast(ctx), ctx.cfg.run.seed,
                                           gt_similarity=gt, class_parts=ctx.data.class_parts,
                                           n_per_class=getattr(ctx.cfg, self.method).n_per_class)
        if ctx.info.is_main:
            atomic_write_text(out_dir / "metrics.json", json.dumps(results, indent=1))
        dist.barrier()
        return {name: {k: v for k, v in r.items() if not isinstance(v, (list, dict))} for name, r in results.items()}


class ReportStage:
    def __init__(self, name: str, method: str, evaluate_stage: str, final_stage: str, summary_stage: str) -> None:
        self.name, self.method = name, method
        self.evaluate_stage, self.final_stage, self.summary_stage = evaluate_stage, final_stage, summary_stage
        self.depends: tuple[str, ...] = (evaluate_stage, final_stage, summary_stage)

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        return {"report": to_dict(cfg.report)}

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        from qpm_dist.report.build import build_report

        path = build_report(ctx, out_dir, method=self.method, evaluate_stage=self.evaluate_stage,
                            model_stage=self.final_stage, summary_stage=self.summary_stage)
        return {"report": str(path)}
