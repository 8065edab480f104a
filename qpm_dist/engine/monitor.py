"""Metrics as JSON lines and (optionally) wandb, both on rank 0 only.

wandb follows its recommended pattern for DDP: one run, created by rank 0 only (other ranks never call
wandb). Its id is stored in every checkpoint and handed back on resume (`resume="allow"`), so a
preempted and requeued job continues the same wandb run. Runs of the same qpm-dist run share a group.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from qpm_dist.config import WandbConfig


def new_run_id() -> str:
    return os.urandom(4).hex()


class MetricsLogger:
    def __init__(self, path: Path, active: bool, wandb_cfg: WandbConfig, run_id: str, name: str, group: str,
                 job_type: str, config: dict, directory: Path) -> None:
        self.active = active
        self.run_id = run_id
        self.path = Path(path)
        self._wandb = None
        if not active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", buffering=1)
        if wandb_cfg.mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                id=run_id, resume="allow", mode=wandb_cfg.mode, project=wandb_cfg.project, entity=wandb_cfg.entity,
                group=wandb_cfg.group or group, job_type=job_type, name=name, tags=wandb_cfg.tags, config=config,
                dir=str(directory),
            )

    def log(self, record: dict[str, Any], step: int | None = None) -> None:
        if not self.active:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._fh.write(json.dumps({"time": round(time.time(), 3), **clean}) + "\n")
        if self._wandb is not None:
            numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        if not self.active:
            return
        self._fh.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
