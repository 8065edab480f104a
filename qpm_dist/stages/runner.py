"""Stages with content-keyed, cached outputs.

A method is a list of stages. Each stage's output folder is `<run_dir>/<name>-<key>`, where the key
hashes everything the stage depends on: the config fields it reads, the dataset fingerprint and the keys
of the stages it consumes. A finished stage (its `stage.json` exists) is skipped on rerun; a changed
input gives a new key and thus a new folder, so a stale result is never reused, and an unfinished one is
resumed from its checkpoints.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from qpm_dist.config import Config, fingerprint
from qpm_dist.data.loaders import DataSource
from qpm_dist.dist import DistInfo
from qpm_dist.engine.evaluate import autocast_for
from qpm_dist.stages.artifacts import RECORD, on_main, write_json
from qpm_dist.utils import log

# Part of every stage key: raised when what a stage folder holds changes form (2: model files carry their head
# type, stage names carry their method's prefix), so a folder written by older code is never reused.
ARTEFACTS_VERSION = 2


@dataclass
class RunContext:
    cfg: Config
    info: DistInfo
    run_dir: Path
    data: DataSource
    method: Any = None  # the running method's spec (qpm_dist.methods.MethodSpec): label, report sections
    outputs: dict[str, Path] = field(default_factory=dict)  # stage name -> its output folder
    keys: dict[str, str] = field(default_factory=dict)

    def autocast(self):
        """An autocast context for the run's engine.precision on this rank's device (fp32 on CPU)."""
        return autocast_for(self.cfg.engine.precision, self.info.device)()


class Stage(Protocol):
    name: str
    depends: tuple[str, ...]

    def config_parts(self, cfg: Config) -> dict[str, Any]:
        """The config fields this stage reads (they enter its key)."""

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        """Do the work, write outputs into `out_dir`, return a small summary for stage.json."""


def stage_key(stage: Stage, ctx: RunContext) -> str:
    upstream = {name: ctx.keys[name] for name in stage.depends}
    return fingerprint(ARTEFACTS_VERSION, stage.name, stage.config_parts(ctx.cfg), ctx.data.fingerprint, upstream)


def _needed(stages: list[Stage], target: str | None) -> set[str]:
    """Names of `target` and its transitive dependencies (all stages when target is None)."""
    by_name = {s.name: s for s in stages}
    if target is None:
        return set(by_name)
    if target not in by_name:
        raise ValueError(f"unknown stage {target!r}; this method has: {', '.join(by_name)}")
    needed, todo = set(), [target]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(by_name[name].depends)
    return needed


def run_stages(stages: list[Stage], ctx: RunContext, target: str | None = None) -> dict[str, dict]:
    """Run `target` (default: every stage) and whatever it needs that is not finished yet."""
    names = [s.name for s in stages]
    duplicate = sorted({n for n in names if names.count(n) > 1})
    if duplicate:
        raise ValueError(f"stage names must be unique; repeated: {', '.join(duplicate)}")
    needed = _needed(stages, target)
    summaries: dict[str, dict] = {}
    for stage in stages:
        missing = [d for d in stage.depends if d not in ctx.keys]
        if missing:
            raise ValueError(f"stage {stage.name} depends on {', '.join(missing)}, which no earlier stage produces")
        key = stage_key(stage, ctx)
        out_dir = ctx.run_dir / f"{stage.name}-{key[:12]}"
        ctx.keys[stage.name], ctx.outputs[stage.name] = key, out_dir
        if stage.name not in needed:
            continue
        marker = out_dir / RECORD
        if marker.is_file():
            log.info("stage %s: finished earlier, reusing %s", stage.name, out_dir)
            summaries[stage.name] = json.loads(marker.read_text())
            continue
        log.info("stage %s: running into %s", stage.name, out_dir)
        on_main(out_dir.mkdir, parents=True, exist_ok=True)
        start = time.time()
        summary = stage.run(ctx, out_dir)
        record = {"stage": stage.name, "key": key, "config": stage.config_parts(ctx.cfg),
                  "dataset": ctx.data.fingerprint, "upstream": {d: ctx.keys[d] for d in stage.depends},
                  "seconds": round(time.time() - start, 2), "summary": summary}
        write_json(marker, record)
        summaries[stage.name] = record
    return summaries
