"""Stages shared by the glm-based sparse layers of SLDD and Q-SENN (specs/qsenn_sldd.md §2, §4, §5, §8).

features    the shared training-set pass of a model (dense, or the previous Q-SENN round's fine-tuned one) over
            the training and test sets with test-time transforms; every rank writes its rows' RAW pooled
            features (for a sparse model: of the selected channels, before the head's normalisation, spec bug 3)
            to its own shard file and adds them to the streamed FeatureSums (one all-reduce) that give mean, std
            and class sums
glm_select  greedy feature selection, one feature at a time (qpm_dist.glm.path)
<m>_fit     the elastic-net path on the selected, standardised features

Solvers: `glm.solver=fast` runs on every rank over its own shards (gradients all-reduced);
`glm.solver=glm_saga` runs on rank 0 over all rows while the other ranks wait.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from qpm_dist import dist
from qpm_dist.config import Config, ConfigError, to_dict
from qpm_dist.glm.path import PathPoint, fit_path, select_features
from qpm_dist.glm.problem import class_correlation, lambda_grid, lambda_max, optimal_bias
from qpm_dist.glm.shards import ShardWriter, load_rows, read_meta, shards_for, write_meta
from qpm_dist.models.net import Classifier, ModelOutput
from qpm_dist.stages.artifacts import from_main, on_main, read_json, read_npz, write_json
from qpm_dist.stages.runner import RunContext
from qpm_dist.stages.train_pass import Accumulator, TrainingSetPass
from qpm_dist.stats.accumulate import FeatureSums
from qpm_dist.utils import atomic_open, atomic_write_text, log

FEATURE_SUMS = "sums.npz"  # a features stage's all-reduced sums of the training rows
SELECTION = "selection.json"  # glm_select: {"selected": [...], "entry_order": [...], ...}
PATH, PATH_TABLE = "path.npz", "path.json"  # a fit stage's path: arrays, and one readable row per point
SELECT_STAGE = "glm_select"


def candidate_solvers(solver: str, path: str) -> tuple[str, ...]:
    """The solvers that may run `path` ("selection" or "fit") under glm.solver=`solver` (see solver_for)."""
    if solver != "auto":
        return (solver,)
    return ("fast",) if path == "selection" else ("glm_saga", "fast")


def solver_key(cfg: Config, path: str) -> dict[str, Any]:
    """The solver settings a path depends on: those of every solver that may run it, and no others."""
    g = cfg.glm
    solvers = candidate_solvers(g.solver, path)
    part = {"solver": g.solver, "path": to_dict(getattr(g, path))}
    if "glm_saga" in solvers:
        part.update(saga=to_dict(g.saga), seed=cfg.run.seed)
    else:
        part["path"].pop("lookbehind")  # glm-saga's stopping rule
    if "fast" in solvers:
        part["fast"] = to_dict(g.fast)
    if len(solvers) > 1:
        part["saga_max_table"] = g.saga_max_table
    return part


def solver_for(cfg: Config, path: str, rows: int, classes: int) -> str:
    """The solver that runs `path` ("selection" or "fit"): glm.solver, with auto resolved (GLMConfig)."""
    solvers = candidate_solvers(cfg.glm.solver, path)
    if len(solvers) == 1:
        return solvers[0]
    return "glm_saga" if rows * classes <= cfg.glm.saga_max_table else "fast"


# ------------------------------------------------------------------------------------------------ features


def raw_features(out: ModelOutput) -> torch.Tensor:
    """The pooled feature maps of a model's output: for a sparse head the selected channels BEFORE its
    normalisation (the head returns z = (f − μ)/σ as `features`; fitting on z but installing statistics of z
    on raw f was spec bug 3)."""
    return out.feature_maps.float().mean(dim=(2, 3))


class FeatureShards(Accumulator):
    """Every row's feature vector, in this rank's shard file of each split (glm.shards). `features` picks the
    vector from a model output (default: `raw_features`, what the glm-based layers fit; IIS passes the full
    backbone representation, iis.representations); `meta` adds entries to the shards' meta.json."""

    def __init__(self, out_dir: Path, rank: int, dim: int, dtype: str,
                 features: Callable[[ModelOutput], torch.Tensor] = raw_features, meta: dict | None = None) -> None:
        self.out_dir, self.rank, self.dim, self.dtype = out_dir, rank, dim, dtype
        self.features, self.meta = features, meta or {}
        self.rows: dict[str, int] = {}

    def start(self, split: str, rows: int) -> None:
        self.writer = ShardWriter(self.out_dir, split, self.rank, rows, self.dim, self.dtype)

    def update(self, split: str, output: ModelOutput, labels: torch.Tensor) -> None:
        self.writer.add(self.features(output), labels)

    def end(self, split: str) -> None:
        self.rows[split] = self.writer.close()

    def finish(self, out_dir: Path) -> dict[str, Any]:
        every = dist.all_gather_object(self.rows)
        meta = {"world_size": len(every), "dim": self.dim, "dtype": self.dtype,
                "rows": {split: [r[split] for r in every] for split in self.rows}, **self.meta}
        on_main(write_meta, out_dir, meta)
        return {f"{split}_rows": sum(counts) for split, counts in meta["rows"].items()} | {"features": self.dim}


class TrainingFeatureSums(Accumulator):
    """Streamed sums of the raw training features (mean, std, class sums), one all-reduce."""

    def __init__(self, dim: int, num_classes: int, device: torch.device) -> None:
        self.sums = FeatureSums.zeros(dim, num_classes, device)

    def update(self, split: str, output: ModelOutput, labels: torch.Tensor) -> None:
        if split == "train":
            self.sums.update(raw_features(output), labels)

    def finish(self, out_dir: Path) -> dict[str, Any]:
        sums = self.sums.all_reduce().cpu()
        on_main(sums.save, out_dir / FEATURE_SUMS)
        return {"zero_variance_features": int((sums.std <= 0).sum())}


def features_stage(name: str, model_stage: str) -> TrainingSetPass:
    """The training-set pass writing feature shards (train and test) and the training rows' sums."""

    def accumulators(ctx: RunContext, model: Classifier, out_dir: Path) -> list[Accumulator]:
        dim = int(model.head.class_weights().shape[1])  # the features the head reads (selected ones if sparse)
        return [FeatureShards(out_dir, ctx.info.rank, dim, ctx.cfg.glm.features_dtype),
                TrainingFeatureSums(dim, ctx.data.num_classes, ctx.info.device)]

    return TrainingSetPass(name, model_stage, accumulators, batch_size=lambda cfg: cfg.glm.batch_size,
                           splits=("train", "test"), key=lambda cfg: {"dtype": cfg.glm.features_dtype})


class GLMData:
    """What a path needs from a features stage: statistics, λ_max and the (sharded or gathered) rows."""

    def __init__(self, ctx: RunContext, features_stage: str, columns: torch.Tensor | None = None) -> None:
        self.ctx = ctx
        self.folder = ctx.outputs[features_stage]
        sums = FeatureSums.load(self.folder / FEATURE_SUMS)
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

    def solver(self, cfg: Config, name: str, path_name: str, with_test: bool, log_path: Path | None = None):
        """A FastGLM on this rank's rows (`name` fast), or (glm_saga, rank 0 only) a SagaGLM on all rows."""
        g = cfg.glm
        bias = optimal_bias(self.class_counts)
        if name == "fast":
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


def on_solver_ranks(solver: str, walk: Callable[[], Any]) -> Any:
    """Run a path walk where `solver` runs: every rank for fast (collectives inside; the ranks agree), rank 0
    alone for glm_saga. Returns the walk's result on rank 0 (and, for fast, everywhere), else None."""
    return walk() if solver == "fast" or dist.is_main() else None


def _progress(message: str) -> None:
    log.info("%s", message)  # INFO is shown on rank 0 only (utils.setup_logging)


# ------------------------------------------------------------------------------------------------ select


class SelectStage:
    """glm_select: the first `n_features` features to enter the group-lasso path (shared by SLDD and Q-SENN;
    `section` names the method section whose n_features it reads)."""

    name = SELECT_STAGE

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
        name = solver_for(cfg, "selection", int(data.count), data.num_classes)

        def greedy() -> dict:
            solver = data.solver(cfg, name, "selection", with_test=False, log_path=out_dir / "glm_saga.log")
            order, records = select_features(solver, n_features, p.epsilon * lam_max, progress=_progress)
            return {"selected": sorted(order), "entry_order": order, "lambda_max": lam_max,
                    "ridge": p.epsilon * lam_max, "solver": name, "steps": records}

        result = on_solver_ranks(name, greedy)
        payload = from_main(lambda: result)
        write_json(out_dir / SELECTION, payload)
        return {k: v for k, v in payload.items() if k != "steps"}


def load_selection(ctx: RunContext) -> torch.Tensor:
    return torch.tensor(read_json(ctx.outputs[SELECT_STAGE] / SELECTION)["selected"])


# ------------------------------------------------------------------------------------------------ fit


def path_epsilon(cfg: Config, solver: str) -> float:
    """Where a fit path ends, as a share of λ_max: glm.fit.epsilon (the default of every method)."""
    return cfg.glm.fit.epsilon


class FitStage:
    """The elastic-net path on the selected features; `stop` decides where the walk may end, `epsilon(cfg,
    solver)` where the λ grid ends (default glm.fit.epsilon)."""

    def __init__(self, name: str, features_stage: str, select_columns: bool, stop_rule: str, section: str,
                 epsilon: Callable[[Config, str], float] = path_epsilon) -> None:
        self.name, self.features_stage, self.select_columns = name, features_stage, select_columns
        self.stop_rule, self.section, self.epsilon = stop_rule, section, epsilon
        self.depends: tuple[str, ...] = (features_stage, SELECT_STAGE) if select_columns else (features_stage,)

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        parts = {"stop_rule": self.stop_rule, **solver_key(cfg, "fit"),
                 "epsilon": {name: self.epsilon(cfg, name) for name in ("glm_saga", "fast")}}
        if self.stop_rule == "sldd":
            s = getattr(cfg, self.section)
            parts["cap"] = s.n_per_class / s.drop_rate
        return parts

    def _stop(self, cfg: Config, num_classes: int) -> Callable[[list[PathPoint]], bool] | None:
        if self.stop_rule != "sldd":
            return None
        s = getattr(cfg, self.section)
        cap = s.n_per_class / s.drop_rate
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
        name = solver_for(cfg, "fit", int(data.count), data.num_classes)
        lam_max = lambda_max(data.corr, p.alpha, group=False)
        lams = lambda_grid(lam_max, p.path_points, self.epsilon(cfg, name))

        def walk() -> list[PathPoint]:
            solver = data.solver(cfg, name, "fit", with_test=True, log_path=out_dir / "glm_saga.log")
            return fit_path(solver, lams, p.alpha, self._stop(cfg, data.num_classes), progress=_progress)

        points = on_solver_ranks(name, walk)
        on_main(write_path, out_dir, points, data.mean, data.std)
        return from_main(lambda: {"solver": name, "lambda_max": lam_max, "lambda_min": lams[-1], "points": len(points),
                                  "last_per_class": points[-1].per_class, "last_train_acc": points[-1].train_acc,
                                  "last_test_acc": points[-1].test_acc,
                                  "seconds": round(sum(q.seconds for q in points), 2)})


def write_path(out_dir: Path, points: list[PathPoint], mean: torch.Tensor, std: torch.Tensor) -> None:
    with atomic_open(out_dir / PATH) as fh:
        np.savez(fh, lam=np.array([q.lam for q in points]), weight=np.stack([q.weight for q in points]),
                 bias=np.stack([q.bias for q in points]), nnz=np.array([q.nnz for q in points]),
                 train_acc=np.array([q.train_acc for q in points]), test_acc=np.array([q.test_acc for q in points]),
                 mean=mean.numpy(), std=std.numpy())
    atomic_write_text(out_dir / PATH_TABLE, json.dumps(
        [{"index": q.index, "lam": q.lam, "per_class": q.per_class, "train_acc": q.train_acc,
          "test_acc": q.test_acc, "seconds": q.seconds, **q.info} for q in points], indent=1))


def read_path(folder: Path) -> dict[str, np.ndarray]:
    """A fit stage's path, read on rank 0 and broadcast (identical arrays on every rank)."""
    return read_npz(folder / PATH)


def sparse_head_options(section) -> dict[str, Any]:
    """The sparse head settings of an SLDD / Q-SENN config section (its mean/std are fine-tuned by default)."""
    return {"dropout": section.dropout, "dropout_before_norm": section.dropout_before_norm,
            "train_normalisation": section.train_normalisation}


def check_sparse_section(section, key: str) -> None:
    """The checks an SLDD / Q-SENN section shares (n_per_class, min_per_class)."""
    if not 1 <= section.n_per_class <= section.n_features:
        raise ConfigError(f"{key}.n_per_class ({section.n_per_class}) must be between 1 and {key}.n_features "
                          f"({section.n_features})")
    if not 0 <= section.min_per_class <= section.n_per_class:
        raise ConfigError(f"{key}.min_per_class ({section.min_per_class}) must be between 0 and {key}.n_per_class "
                          f"({section.n_per_class})")
