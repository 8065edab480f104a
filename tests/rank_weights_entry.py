"""Test entry point: `launch/train.py`, and after each training phase every rank also saves the parameters it
holds (`weights.rank<R>.pt` in the stage folder), so a test can check that all ranks end identical.

Started by torchrun through `qpm-dist launch --script tests/rank_weights_entry.py ...`.
"""

import runpy
import sys
from pathlib import Path

import torch

from qpm_dist.engine.trainer import Trainer

_fit = Trainer.fit


def _fit_and_save_this_ranks_parameters(self: Trainer) -> dict:
    result = _fit(self)
    params = {name: p.detach().cpu().clone() for name, p in self.module.named_parameters()}
    torch.save(params, self.setup.stage_dir / f"weights.rank{self.info.rank}.pt")
    return result


Trainer.fit = _fit_and_save_this_ranks_parameters

if __name__ == "__main__":
    train = Path(__file__).resolve().parents[1] / "launch" / "train.py"
    sys.argv[0] = str(train)
    runpy.run_path(str(train), run_name="__main__")
