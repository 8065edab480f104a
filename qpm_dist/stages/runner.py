"""Stages with content-keyed, cached outputs.

A method is a list of stages. Each stage's output folder is `<run_dir>/<name>-<key>`, where the key
hashes everything the stage's output depends on: the config fields that change it (`config_parts`), the
dataset fingerprint and the keys of the stages it consumes. A finished stage (its `stage.json` exists) is
skipped on rerun; a changed input gives a new key and thus a new folder, so a stale result is never reused, and
an unfinished one is resumed from its checkpoints.

The rule for `config_parts`: exactly the fields that change what the stage writes, so that changing anything
else (batch sizes of evaluation, loader workers, logging, progress and checkpoint cadence, wandb, a data check
that does not transform the data) reuses or resumes the stage instead of starting over. A stage may keep a field
out of its folder key although it changes the output, if a longer run continues a shorter one (a training
stage's `epochs`, under a schedule that does not depend on the total): it then names that field in
`output_parts` (later stages' keys include it, so they are recomputed from the longer run) and decides in
`extends(record, cfg, folder)` whether its finished folder must train on. Every stage folder holds its config
parts (`stage_config.json`, and the record), so a stage starting fresh beside a folder of the same stage logs
which fields differ.

Runs may share a run folder (a sweep's tasks with one `run.name`): a stage they both need has the same folder,
and a lock per stage folder (`stages.lock`, taken by rank 0) lets one run do it while the others wait and then
reuse it, so a sweep trains its dense model once per seed.

A stage is marked finished only if its weights and results are finite (`artifacts.MUST_BE_FINITE`); its record
holds the sha256 of every output file (and of itself), checked whenever the stage is reused, so a damaged
file is reported by name instead of being read by the next stage. Every stage runs under the run's stop
request (SIGTERM/SIGUSR1, `engine.preemption`): a stop ends the run with `Preempted` and never marks the
stage in progress finished.
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
from qpm_dist import dist
from qpm_dist.engine.preemption import Preempted, StopRequest, stop_requests
from qpm_dist.engine.trainer import NonFiniteError
from qpm_dist.stages.lock import StageLock, describe, poll_seconds
from qpm_dist.stages.artifacts import (RECORD, STAGE_CONFIG, from_main, nonfinite_outputs, on_main, output_digests,
                                       read_record,
                                       record_digest, write_json)
from qpm_dist.utils import log, progress_enabled

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
        """The config fields that change this stage's output (they enter its key)."""

    def run(self, ctx: RunContext, out_dir: Path) -> dict:
        """Do the work, write outputs into `out_dir`, return a small summary for stage.json."""


def stage_key(stage: Stage, ctx: RunContext) -> str:
    upstream = {name: ctx.keys[name] for name in stage.depends}
    return fingerprint(ARTEFACTS_VERSION, stage.name, stage.config_parts(ctx.cfg), ctx.data.fingerprint, upstream)


def output_key(stage: Stage, key: str, cfg: Config) -> str:
    """The key later stages see: the folder key, plus what changes the output but not the folder (`output_parts`)."""
    parts = getattr(stage, "output_parts", None)
    return key if parts is None else fingerprint(key, parts(cfg))


def _inputs(stage: Stage, ctx: RunContext) -> dict[str, Any]:
    """What enters a stage's key, as stored in its folder (compared with a sibling folder's)."""
    return {"config": stage.config_parts(ctx.cfg), "dataset": ctx.data.fingerprint,
            "upstream": {d: ctx.keys[d] for d in stage.depends}}


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"dense.optim.lr": 0.1, ...} of nested dicts."""
    if not isinstance(value, dict) or not value:
        return {prefix: value}
    flat = {}
    for name, item in value.items():
        flat.update(_flat(item, f"{prefix}.{name}" if prefix else name))
    return flat


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """"name: old -> new" for every field of two stages' inputs (`_inputs`) that differs, in a user's words."""
    a, b = _flat(old), _flat(new)
    found = []
    for name in sorted(a.keys() | b.keys()):
        if a.get(name, "(absent)") != b.get(name, "(absent)"):
            label = (name.removeprefix("config.") if name.startswith("config.") else
                     f"its input stage {name.removeprefix('upstream.')}" if name.startswith("upstream.") else
                     "the dataset (files or labels)" if name == "dataset" else name)
            found.append(f"{label}: {a.get(name, '(absent)')} -> {b.get(name, '(absent)')}")
    return found


def _siblings_differ(stage: Stage, ctx: RunContext, out_dir: Path) -> str:
    """Why `out_dir` is new although folders of the same stage exist in the run folder ("" if none does): the
    newest sibling's differing key fields, with the stage's notes on why such a field means starting over."""
    try:
        siblings = sorted((p for p in ctx.run_dir.glob(f"{stage.name}-*") if p.is_dir() and p != out_dir),
                          key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:  # a sibling removed meanwhile: nothing to say
        return ""
    for sibling in siblings:
        for name in (RECORD, STAGE_CONFIG):
            try:
                stored = json.loads((sibling / name).read_text())
                old = {k: stored[k] for k in ("config", "dataset", "upstream")}
            except (OSError, ValueError, KeyError, TypeError):
                continue
            notes = getattr(stage, "fresh_notes", lambda cfg: {})(ctx.cfg)
            diff = [d + (f" ({notes[d.split(':')[0]]})" if d.split(":")[0] in notes else "")
                    for d in differences(old, _inputs(stage, ctx))]
            return (f"stage {stage.name}: starting fresh in {out_dir.name}; the folder {sibling.name} differs in "
                    f"{'; '.join(diff) or 'nothing its record shows (written by another version)'}")
    return ""


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
    with stop_requests() as stop, progress_enabled(ctx.cfg.engine.progress):
        for stage in stages:
            missing = [d for d in stage.depends if d not in ctx.keys]
            if missing:
                raise ValueError(f"stage {stage.name} depends on {', '.join(missing)}, which no earlier stage produces")
            key = stage_key(stage, ctx)
            out_dir = ctx.run_dir / f"{stage.name}-{key[:12]}"
            ctx.keys[stage.name], ctx.outputs[stage.name] = output_key(stage, key, ctx.cfg), out_dir
            if stage.name not in needed:
                continue
            # Rank 0 decides for all: on a shared file system another run's record may appear at any moment, and
            # ranks on different nodes may see it at different times.
            finished = _finished(stage, ctx, out_dir)  # raises DamagedOutput, naming the file
            if finished is not None:
                summaries[stage.name] = finished
                log.info("stage %s: finished earlier, reusing %s", stage.name, out_dir)
                continue
            lock = _claim(stage, out_dir, stop)
            try:
                finished = _finished(stage, ctx, out_dir, say=True)
                if finished is not None:  # finished by the run we waited for
                    summaries[stage.name] = finished
                    log.info("stage %s: finished by another run meanwhile, reusing %s", stage.name, out_dir)
                    continue
                on_main(lambda: (out_dir / RECORD).unlink(missing_ok=True))  # a stage trained on (`extends`)
                summaries[stage.name] = _run_stage(stage, ctx, key, out_dir, stop)
            finally:
                if lock is not None:
                    lock.release()
    return summaries


def _finished(stage: Stage, ctx: RunContext, out_dir: Path, say: bool = False) -> dict | None:
    """The record of `out_dir` if it holds the finished stage this run asks for; None to run it (not finished,
    or finished with less than asked, which the stage then continues: `extends`, whose reason is logged if `say`)."""
    if not from_main(lambda: (out_dir / RECORD).is_file()):
        return None
    record = read_record(out_dir)
    extends = getattr(stage, "extends", None)
    reason = extends(record, ctx.cfg, out_dir) if extends is not None else ""  # every rank: the same record
    if reason:
        if say:
            log.info("stage %s: %s", stage.name, reason)
        return None
    return record


def _claim(stage: Stage, out_dir: Path, stop: StopRequest) -> StageLock | None:
    """Wait until this run holds the lock of `out_dir` (another run sharing the run folder may be running the
    same stage). Rank 0 takes the lock and returns it, the other ranks follow its decision and return None.
    The ranks meet every poll interval (a small broadcast), far inside the process group's timeout however long
    the wait; a stop signal while waiting ends the run (`Preempted`, nothing of the stage started here)."""
    lock = StageLock.of_stage(out_dir) if dist.is_main() else None
    poll, said = poll_seconds(), None
    while True:
        holder = from_main(lambda: "" if lock.try_acquire() else describe(lock.owner()))
        if not holder:
            return lock
        if holder != said:
            log.info("waiting for stage %s held by %s (lock %s); it is reused once finished", stage.name, holder,
                     lock.path if lock is not None else out_dir.parent / ".locks" / out_dir.name)
            said = holder
        if dist.any_rank(stop.requested):
            raise Preempted(f"stopped by a stop signal while waiting for stage {stage.name} held by {holder}; "
                            f"nothing of it was started by this run, rerun the same command to continue")
        time.sleep(poll)


def _run_stage(stage: Stage, ctx: RunContext, key: str, out_dir: Path, stop: StopRequest) -> dict:
    """Run one stage and mark it finished (`stage.json`) if it ended, was not stopped and its outputs are finite."""
    if dist.any_rank(stop.requested):  # a signal between stages: what finished so far stays finished
        raise Preempted(f"stopped by a stop signal before stage {stage.name}; finished stages are kept, "
                        f"{stage.name} runs on rerun")
    fresh = from_main(lambda: "" if out_dir.exists() else _siblings_differ(stage, ctx, out_dir))
    if fresh:
        log.info("%s", fresh)
    log.info("stage %s: running into %s", stage.name, out_dir)
    on_main(out_dir.mkdir, parents=True, exist_ok=True)
    write_json(out_dir / STAGE_CONFIG, _inputs(stage, ctx))
    stop.stage = stage.name
    start = time.time()
    try:
        summary = stage.run(ctx, out_dir)
    except (Preempted, NonFiniteError):
        raise
    except Exception as exc:
        if stop.requested:  # e.g. a collective failing because another rank already left on the same signal
            raise Preempted(f"stopped by a stop signal during stage {stage.name}, which then failed "
                            f"({type(exc).__name__}: {exc}); the stage is not marked finished and runs on rerun "
                            f"(a training stage from its last checkpoint)") from exc
        raise
    dist.barrier()  # every rank has written its part (e.g. per-rank shards) before rank 0 reads them
    bad = from_main(lambda: nonfinite_outputs(out_dir))
    if bad:
        raise NonFiniteError(f"stage {stage.name}: not marked finished, its outputs hold NaN/inf: {'; '.join(bad)}")
    record = {"stage": stage.name, "key": key, "output_key": output_key(stage, key, ctx.cfg), **_inputs(stage, ctx),
              "seconds": round(time.time() - start, 2), "summary": summary,
              "outputs": from_main(lambda: output_digests(out_dir))}
    record["digest"] = record_digest(record)
    write_json(out_dir / RECORD, record)
    return record
