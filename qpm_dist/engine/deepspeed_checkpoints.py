"""DeepSpeed's checkpoint files, read without unpickling code, and the list of files each rank writes.

DeepSpeed reads its checkpoints with `torch.load(weights_only=False)`, which runs whatever a (damaged or
planted) pickle asks for. We give the engine a checkpoint engine that reads with `weights_only=True`: tensors
and plain containers, plus the few DeepSpeed classes its ZeRO optimizer states hold, which carry only numbers
(a loss scaler's scale, the ZeRO stage, a fragment's offset and length). Anything else is refused, naming the
file. The same engine records the files this rank writes, so the checkpoint manager can hash them.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

# the non-torch classes in DeepSpeed's ZeRO 0/1/2 checkpoints (fp32, bf16, fp16); each holds only numbers
DEEPSPEED_DATA_CLASSES = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """torch.save/torch.load as DeepSpeed's default engine, but loading with weights_only=True and recording
    the paths saved (`written`, cleared by the caller before each checkpoint)."""

    def __init__(self, config_params=None) -> None:
        super().__init__(config_params)
        self.written: list[Path] = []

    def save(self, state_dict, path: str) -> None:
        super().save(state_dict, path)
        self.written.append(Path(path))

    def load(self, path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(DEEPSPEED_DATA_CLASSES):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(f"{path}: refused to load (it holds more than tensors and plain data): {exc}") from None


def use_weights_only_checkpoints(engine) -> WeightsOnlyCheckpointEngine:
    """Replace the engine's checkpoint engine by ours; only DeepSpeed's default (torch) engine is supported."""
    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise ValueError(f"engine.deepspeed_config: DeepSpeed checkpoint engine {type(current).__name__} is not "
                         "supported (remove the checkpoint writer / datastates settings; qpm-dist verifies and "
                         "loads checkpoints with torch's engine)")
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)
    return engine.checkpoint_engine
