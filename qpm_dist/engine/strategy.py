"""Distribution strategies: how the model is wrapped, how a micro-step is taken, how state is saved.

* `DDPStrategy`  – torch DistributedDataParallel (or the bare module on one process), autocast AMP with a
  GradScaler for fp16, channels_last, `no_sync` during gradient accumulation.
* `DeepSpeedStrategy` – `deepspeed.initialize` with a ZeRO 0/1/2 JSON config whose batch, accumulation,
  precision and clipping fields we fill from our config; DeepSpeed's own backward/step and its own
  (sharded) checkpoint format.

The trainer only sees this interface::

    with strategy.accumulate(boundary), strategy.autocast():
        out = strategy.forward(images); loss = ...
        strategy.backward(loss)
    strategy.step(boundary)
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from qpm_dist import dist
from qpm_dist.dist import DistInfo
from qpm_dist.engine.evaluate import autocast_for
from qpm_dist.errors import MissingInput
from qpm_dist.utils import atomic_open, log

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def effective_precision(precision: str, device: torch.device) -> str:
    """Mixed precision is a GPU feature here; on CPU we train in fp32 (and say so once)."""
    if device.type != "cuda" and precision != "fp32":
        log.info("engine.precision=%s applies on GPU only; training in fp32 on %s", precision, device.type)
        return "fp32"
    return precision


class DDPStrategy:
    name = "ddp"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, info: DistInfo,
                 precision: str, channels_last: bool, grad_accum: int, clip_grad_norm: float | None,
                 find_unused_parameters: bool = False) -> None:
        self.device = info.device
        self.precision = effective_precision(precision, info.device)
        self.memory_format = (
            torch.channels_last if channels_last and info.device.type == "cuda" else torch.contiguous_format
        )
        self.module = model.to(info.device, memory_format=self.memory_format)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.grad_accum, self.clip = grad_accum, clip_grad_norm
        self.wrapped: nn.Module = self.module
        if info.world_size > 1:
            device_ids = [info.device.index] if info.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.module, device_ids=device_ids,
                                                   find_unused_parameters=find_unused_parameters)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.precision == "fp16")

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, non_blocking=True, memory_format=self.memory_format)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_for(self.precision, self.device)()

    def accumulate(self, boundary: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation window."""
        if boundary or not isinstance(self.wrapped, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.wrapped.no_sync()

    def forward(self, images: torch.Tensor) -> Any:
        return self.wrapped(images)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.grad_accum).backward()

    def step(self, boundary: bool) -> None:
        if not boundary:
            return
        if self.clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def skip_step(self) -> None:
        """End an optimizer step without applying it (its loss was not finite): drop the accumulated gradients;
        the schedule moves on, as it follows the data position."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def close(self) -> None:
        """Nothing to release: DDP's wrapper and its process-group reference die with this object."""

    def parameters_edited(self) -> None:
        """The module's parameters were changed outside the optimizer (a task's epoch hook). DDP's optimizer
        works on the module's own parameters: nothing to do."""

    def export_state_dict(self, checkpoint: Path) -> dict[str, torch.Tensor]:
        """The trained weights as a plain CPU state dict (identical on every rank)."""
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    # ---- checkpoints: DDP replicas are identical, so rank 0 writes one file
    def save(self, directory: Path, client_state: dict) -> list[Path]:
        """Write this rank's part of the checkpoint; return the files it wrote (the manager hashes them)."""
        if dist.is_main():
            state = {
                "model": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "client": client_state,
            }
            with atomic_open(directory / "state.pt") as fh:
                torch.save(state, fh)
            return [directory / "state.pt"]
        return []

    def load(self, directory: Path) -> dict:
        state = torch.load(directory / "state.pt", map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        return state["client"]


class DeepSpeedStrategy:
    name = "deepspeed"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, info: DistInfo,
                 precision: str, channels_last: bool, grad_accum: int, clip_grad_norm: float | None,
                 config_path: str, micro_batch: int) -> None:
        import deepspeed  # heavy import, only when this strategy is chosen

        from qpm_dist.engine.deepspeed_checkpoints import use_weights_only_checkpoints

        self.device = info.device
        self.precision = effective_precision(precision, info.device)
        self.memory_format = (
            torch.channels_last if channels_last and info.device.type == "cuda" else torch.contiguous_format
        )
        ds_config = self.resolve_config(config_path, micro_batch, grad_accum, info.world_size, self.precision,
                                        clip_grad_norm)
        model = model.to(info.device, memory_format=self.memory_format)
        dist.ensure_group(info.device)  # one process without torchrun: DeepSpeed still needs a group
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
        )
        self.module = self.engine.module
        self.checkpoint_io = use_weights_only_checkpoints(self.engine)
        self.input_dtype = _DTYPES[self.precision]

    @staticmethod
    def resolve_config(path: str, micro_batch: int, grad_accum: int, world_size: int, precision: str,
                       clip_grad_norm: float | None) -> dict:
        """Load the ZeRO JSON and fill in the fields our config owns (they must not disagree)."""
        file = Path(path)
        if not file.is_file():
            raise MissingInput(f"engine.deepspeed_config: file not found: {file}")
        cfg = json.loads(file.read_text())
        stage = cfg.get("zero_optimization", {}).get("stage", 0)
        if stage not in (0, 1, 2):
            raise ValueError(f"{file}: ZeRO stage {stage} is not supported (use 0, 1 or 2; a ResNet's parameters "
                             "fit on every GPU, so stage 3 only adds communication)")
        for key in ("optimizer", "scheduler", "gradient_clipping"):
            if key in cfg:
                raise ValueError(f"{file}: remove '{key}'; optimizer, schedule and gradient clipping come from the "
                                 "qpm-dist config")
        cfg.update(
            train_micro_batch_size_per_gpu=micro_batch,
            gradient_accumulation_steps=grad_accum,
            train_batch_size=micro_batch * grad_accum * world_size,
            bf16={"enabled": precision == "bf16"},
            fp16={**cfg.get("fp16", {}), "enabled": precision == "fp16"},
        )
        # DeepSpeed clips at 1.0 unless told otherwise; ours clips only when <phase>.clip_grad_norm is set (as DDP)
        cfg["gradient_clipping"] = 0.0 if clip_grad_norm is None else clip_grad_norm
        if stage >= 1:
            cfg["zero_allow_untested_optimizer"] = True  # we hand DeepSpeed a torch optimizer
        cfg.setdefault("steps_per_print", 10**9)  # our logger reports progress
        return cfg

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        return images.to(self.input_dtype) if self.input_dtype is not None else images

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed casts the model itself for bf16/fp16

    def accumulate(self, boundary: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine counts micro-steps itself

    def forward(self, images: torch.Tensor) -> Any:
        return self.engine(images)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self, boundary: bool) -> None:
        self.engine.step()  # called every micro-step; steps optimizer and scheduler at the boundary

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def close(self) -> None:
        """Release the engine at the end of its phase. Its ZeRO optimizer registers gradient hooks on the module's
        parameters whose closures hold the optimizer, so engine, optimizer and their process group would live on
        after the phase, past `dist.shutdown()`, until interpreter exit; a gloo group destroyed that late aborts
        the process at exit ("terminate called without an active exception") in about half the runs.
        `destroy()` removes the hooks."""
        self.engine.destroy()

    def parameters_edited(self) -> None:
        """The module's parameters were changed outside the optimizer (a task's epoch hook). With ZeRO >= 1
        (and with bf16/fp16) DeepSpeed's optimizer steps its own fp32 copy of the parameters and writes it back
        into the module at the next step, which would undo the edit: copy the module's values into it."""
        refresh = getattr(self.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()

    def export_state_dict(self, checkpoint: Path) -> dict[str, torch.Tensor] | None:
        """Plain fp32 CPU weights on rank 0 (None elsewhere).

        With bf16/fp16 the module holds low-precision copies; the fp32 master weights live in the ZeRO
        optimizer partitions of `checkpoint`, which DeepSpeed's zero_to_fp32 consolidates.
        """
        if not dist.is_main():
            return None
        if self.precision != "fp32" and self.engine.zero_optimization_stage() >= 1:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
        return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu()
                for k, v in self.module.state_dict().items()}

    # ---- checkpoints: DeepSpeed's own sharded format, written by every rank
    def save(self, directory: Path, client_state: dict) -> list[Path]:
        """Write this rank's shards; return the files it wrote (the manager hashes them)."""
        self.checkpoint_io.written.clear()
        self.engine.save_checkpoint(str(directory.parent), tag=directory.name, client_state=client_state,
                                    save_latest=False)
        return list(self.checkpoint_io.written)

    def load(self, directory: Path) -> dict:
        path, client = self.engine.load_checkpoint(str(directory.parent), tag=directory.name)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {directory}")
        return client
