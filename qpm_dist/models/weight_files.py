"""Read the weight files people have, without running code from them.

The files `model.weights` names come from many places: a plain torchvision state dict; pytorch/examples'
ImageNet checkpoint (`state_dict` with DDP's "module." prefixes, next to `epoch`, `arch`, `best_acc1`,
`optimizer`); torchvision's references/classification checkpoint (`model`, `model_ema` — an AveragedModel's
state: "module." prefixes plus `n_averaged` —, `optimizer`, `lr_scheduler`, `epoch`, and `args`, an
argparse.Namespace). Only the tensors of one state dict are needed from them.

How the file is read safely: with PyTorch's own restricted unpickler (`torch.load(weights_only=True)`),
which builds only tensors, storages, dtypes and plain containers and calls nothing else. Objects it does not
allow, such as the Namespace under `args`, would make it refuse the whole file; so before loading, the
globals the pickle names outside that allowlist are listed statically (without unpickling,
`torch.serialization.get_unsafe_globals_in_checkpoint`) and each is allowed for this one load as `Inert`, a
class that accepts any arguments and state and does nothing with them. A pickle that would call `exec` or
`subprocess.run` thus builds an `Inert` instead and the call never happens; globals from os/sys/posix/nt
stay refused by torch's blocklist. We do not allow argparse.Namespace itself
(`torch.serialization.safe_globals([argparse.Namespace])`): its state can hold any object, and every other
program's class would need its own entry. Nor do we use a `pickle.Unpickler` with a restricted `find_class`:
the standard unpickler's BUILD sets attributes on whatever the stack holds (even an allowed class such as
torch.Tensor), which torch's unpickler refuses.

Files in the zip format (torch >= 1.6) are memory-mapped (`mmap=True`): the check before a run reads only
the pickle, not the tensor data, and the copy into the model reads each byte once. Older (legacy) files are
read whole; they hold only tensors and plain containers, so they need no `Inert`.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from qpm_dist.errors import BadInput, MissingInput

# The places a state dict is found under in the checkpoints above (and timm's `state_dict_ema`), in the order
# `model.weights_key=auto` tries them after the file itself. model_ema comes last: an EMA of the weights is
# taken only when asked for or when it is the only state dict in the file.
AUTO_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")
# Not a weight: torch.optim.swa_utils.AveragedModel's count of averaged steps, stored in its state dict.
NOT_WEIGHTS = ("n_averaged",)
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


class BadWeightsFile(BadInput, ValueError):
    """`model.weights` names a file that is not a readable checkpoint or holds no state dict we can use."""


class Inert:
    """Stands in for any class or function a checkpoint's pickle names outside torch's allowlist: built with
    any arguments, given any state, it keeps nothing and calls nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "Inert":
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _short_reason(exc: BaseException) -> str:
    """One line for the user from an exception of torch.load: torch wraps an unpickling error in several
    paragraphs of advice with terminal colour codes; the error it wraps (kept as __context__) is the reason."""
    inner = exc.__context__ if exc.__suppress_context__ and exc.__context__ is not None else exc
    lines = [line.strip() for line in ANSI_ESCAPE.sub("", str(inner)).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def load_checkpoint(path: str | Path) -> Any:
    """The object saved in `path`, unpickled by torch's restricted unpickler with every unknown global read as
    `Inert` (see the module docstring); tensors on the CPU, memory-mapped for zip files."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingInput(
            f"model.weights: file not found: {path} (weights are never downloaded; download e.g. torchvision's "
            f"resnet50 checkpoint yourself and name the local file)"
        )
    is_zip = False
    try:
        is_zip = zipfile.is_zipfile(path)
        unknown = torch.serialization.get_unsafe_globals_in_checkpoint(path) if is_zip else []
        with torch.serialization.safe_globals([(Inert, name) for name in unknown]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as exc:  # noqa: BLE001 - any reading error means the same thing to the user
        tried = "" if is_zip else "not a zip archive as torch.save writes it, and as the older format: "
        raise BadWeightsFile(f"model.weights: {path} is not a readable PyTorch checkpoint "
                             f"({tried}{_short_reason(exc)})") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _describe_keys(obj: Any) -> str:
    if isinstance(obj, Inert):
        return "a pickled object (a whole model saved with torch.save(model)?), not a dict: save its state_dict()"
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}, not a dict"
    if _is_state_dict(obj):
        return f"a state dict of {len(obj)} tensors"
    names = [str(k) for k in obj]
    return "keys " + ", ".join(names[:12]) + (f" (and {len(names) - 12} more)" if len(names) > 12 else "")


def select_state_dict(obj: Any, key: str, source: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict under `key` of a loaded checkpoint (auto: the checkpoint itself if it is one, else the
    first of AUTO_KEYS that holds one), with DDP's and AveragedModel's "module." prefixes stripped and
    AveragedModel's `n_averaged` dropped; and where it was found ("the file" or "'model_ema'")."""
    if key == "auto":
        if _is_state_dict(obj):
            state, where = obj, "the file"
        else:
            found = [k for k in AUTO_KEYS if isinstance(obj, dict) and _is_state_dict(obj.get(k))]
            if not found:
                raise BadWeightsFile(
                    f"model.weights: {source} holds no state dict of tensors: found {_describe_keys(obj)}; expected "
                    f"a state dict, or one under {', '.join(repr(k) for k in AUTO_KEYS)} (model.weights_key)")
            state, where = obj[found[0]], repr(found[0])
    else:
        state, where = (obj.get(key) if isinstance(obj, dict) else None), repr(key)
        if not _is_state_dict(state):
            raise BadWeightsFile(
                f"model.weights: {source} has no state dict of tensors under model.weights_key={key}: found "
                f"{_describe_keys(obj)}")
    cleaned = {k.removeprefix("module."): v for k, v in state.items() if k not in NOT_WEIGHTS}
    return cleaned, where
