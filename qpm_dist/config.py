"""Typed run configuration: dataclasses, YAML files and dotted command-line overrides.

The sections every run shares live here (run, data, model, dense, finetune, eval, report, engine, wandb);
each method declares its own sections (qpm, glm, ...) in its module, and `config_class()` adds every
registered method's sections to `Config` (see qpm_dist.methods). A section may define
`check(self, key)`, which `validate` calls with the section's dotted key; a method's cross-section checks are
its spec's `validate(cfg)`, run when the config runs that method.

Why hand-written and not OmegaConf/pydantic: the schema is plain stdlib dataclasses (readable, importable
without extra packages) and the validator is ~100 lines that give the one thing users need from it — an
immediate error naming the offending key and the expected type, before any expensive work starts.

Usage::

    cfg = load_config("configs/demo.yaml", ["dense.optim.lr=0.1", "engine.strategy=deepspeed"])
    save_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type or an invalid value."""


# --------------------------------------------------------------------------------------------- schema


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0
    # "auto": continue from the newest valid checkpoint of the stage if there is one; "never": start fresh
    # (refuses to overwrite an unfinished stage); or the path of a checkpoint directory to resume from.
    resume: str = "auto"


@dataclass
class DataConfig:
    # synthetic/cub: CUB-200-2011 layout; folder: root/{train,val}/<class>/*; imagenet: train class folders,
    # val as class folders or flat with the devkit's labels; cars: Stanford Cars with its devkit .mat files.
    dataset: Literal["synthetic", "cub", "folder", "imagenet", "cars"] = "synthetic"
    root: str = "data/synthetic"
    # folder: decode the image files (no conversion needed); ffcv / wds: read what
    # `python -m data_prep to-ffcv|to-wds` wrote into `converted` (root is then not read).
    backend: Literal["folder", "ffcv", "wds"] = "folder"
    converted: Optional[str] = None
    # Image decoder of the folder and wds backends: torchvision's decode_jpeg (PIL for files it rejects) or PIL.
    decoder: Literal["torchvision", "pil"] = "torchvision"
    # A file that cannot be decoded: stop with its path ("error") or warn with its path and use the next
    # readable sample instead ("skip"). A missing file always stops.
    on_corrupt: Literal["error", "skip"] = "error"
    # wds: "exact" reads every sample once per epoch (all but < one global batch, equal batches per rank);
    # "resampled" draws shards with replacement (WebDataset's resampled=True) for the same number of steps.
    wds_mode: Literal["exact", "resampled"] = "exact"
    wds_shuffle_buffer: int = 1000  # samples per loader worker
    # ffcv: let the OS page cache hold the .beton (FFCV's os_cache=True, the ffcv-imagenet setting).
    ffcv_os_cache: bool = True
    img_size: int = 64
    # Train-time augmentation recipe, see qpm_dist.data.transforms.
    augment: Literal["none", "light", "cub", "imagenet"] = "light"
    # Crop every image to its object bounding box (CUB-style datasets only).
    crop_to_box: bool = False
    num_workers: int = 2
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])

    def check(self, key: str) -> None:
        if self.img_size < 8:
            raise ConfigError(f"{key}.img_size: expected an integer >= 8, got {self.img_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError(f"{key}.mean and {key}.std: expected 3 values (RGB)")
        if self.backend != "folder" and not self.converted:
            raise ConfigError(f"{key}.converted: {key}.backend={self.backend} needs the folder written by "
                              f"`python -m data_prep to-{self.backend}`")
        if self.wds_shuffle_buffer < 1:
            raise ConfigError(f"{key}.wds_shuffle_buffer: expected an integer >= 1")


@dataclass
class ModelConfig:
    arch: Literal["tiny_resnet", "resnet18", "resnet34", "resnet50"] = "resnet50"
    # QPM's option: layer3 and layer4 with stride 1 (output stride 8, 28x28 maps at 224 px).
    reduced_strides: bool = True
    # Local file with backbone weights (torchvision layout). Nothing is ever downloaded.
    weights: Optional[str] = None
    norm: Literal["batch", "sync_batch", "group"] = "batch"
    dropout: float = 0.2
    tiny_width: int = 16


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.005
    # Learning rate of the classification head; None = same as lr.
    head_lr: Optional[float] = None
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    # Weight decay of normalisation parameters and biases; None = same as weight_decay.
    norm_weight_decay: Optional[float] = None


@dataclass
class ScheduleConfig:
    # step: lr * gamma ** (epoch // step_epochs), stepped once per epoch as the QPM reference does.
    # cosine / linear: per-iteration decay to min_lr_ratio * lr; constant: no decay. All support warmup.
    name: Literal["step", "cosine", "linear", "constant"] = "step"
    step_epochs: int = 30
    gamma: float = 0.4
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0


@dataclass
class PhaseConfig:
    """One training phase (dense training or fine-tuning)."""

    # 0 skips the phase: the dense model is then model.weights as given (e.g. torchvision ImageNet weights).
    epochs: int = 150
    # Global batch size (all ranks and accumulation steps together): results do not depend on world size.
    batch_size: int = 16
    eval_batch_size: int = 64
    grad_accum: int = 1
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # Feature diversity loss weight beta (0 disables it). 0.196 is the reference value for ResNet-34/50.
    fdl_beta: float = 0.196
    # The reference lets the FDL gradient flow into the classifier weights (spec bug 24); we detach them.
    fdl_detach_weights: bool = True
    label_smoothing: float = 0.0
    clip_grad_norm: Optional[float] = None
    eval_every_epochs: int = 5

    def check(self, key: str) -> None:
        for name in ("batch_size", "eval_batch_size", "grad_accum", "eval_every_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key}.{name}: expected a positive integer, got {getattr(self, name)}")
        if self.epochs < 0:
            raise ConfigError(f"{key}.epochs: expected a non-negative integer, got {self.epochs}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"{key}.batch_size ({self.batch_size}) must be divisible by {key}.grad_accum "
                              f"({self.grad_accum})")
        if self.optim.lr <= 0:
            raise ConfigError(f"{key}.optim.lr: expected a positive number, got {self.optim.lr}")


def _finetune_defaults() -> PhaseConfig:
    return PhaseConfig(
        epochs=40,
        optim=OptimConfig(lr=1e-4, momentum=0.95, weight_decay=5e-4),
        schedule=ScheduleConfig(name="step", step_epochs=10, gamma=0.4),
    )


def _dense_defaults() -> PhaseConfig:
    return PhaseConfig(optim=OptimConfig(lr=0.005, head_lr=0.01))


@dataclass
class EvalConfig:
    batch_size: int = 128  # global
    # Contrastiveness fits a 2-component GMM per feature on a uniform subsample of this many training rows.
    gmm_samples: int = 20000
    # ...and is skipped (reported as null) above this many features, like the reference (dense ResNet-50).
    gmm_max_features: int = 1000


@dataclass
class ReportConfig:
    class_pairs: int = 4  # class pairs shown with example heatmaps
    max_classes: int = 200  # classes listed in the HTML report


@dataclass
class EngineConfig:
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    deepspeed_config: str = "configs/deepspeed/zero1.json"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Mixed precision and channels_last apply on GPU only; on CPU training runs in fp32, contiguous.
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    channels_last: bool = True
    # Save a checkpoint every N optimizer steps (0: only at the end of every epoch).
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 2
    log_every_steps: int = 20
    progress: bool = True
    # Seconds to wait for the other ranks in collectives before giving up.
    timeout_s: int = 1800
    # Non-finite (NaN/inf) training loss: 0 stops the phase at once (exit 3); N >= 1 skips such optimizer steps
    # (gradients dropped, counted in the logs) and stops at the (N+1)-th. DDP only: DeepSpeed cannot skip a step.
    skip_nonfinite_steps: int = 0

    def check(self, key: str) -> None:
        if self.keep_checkpoints < 1:
            raise ConfigError(f"{key}.keep_checkpoints: expected an integer >= 1")
        if self.skip_nonfinite_steps < 0:
            raise ConfigError(f"{key}.skip_nonfinite_steps: expected an integer >= 0, got {self.skip_nonfinite_steps}")
        if self.skip_nonfinite_steps and self.strategy == "deepspeed":
            raise ConfigError(f"{key}.skip_nonfinite_steps: not supported with {key}.strategy=deepspeed (its engine "
                              f"cannot leave out one optimizer step cleanly); use 0 (stop at a non-finite loss)")


@dataclass
class WandbConfig:
    mode: Literal["disabled", "offline", "online"] = "disabled"
    project: str = "qpm-dist"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    """The shared sections. `config_class()` is this class with every registered method's sections added."""

    method: str = "qpm"  # a registered method (qpm_dist.methods)
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dense: PhaseConfig = field(default_factory=_dense_defaults)
    finetune: PhaseConfig = field(default_factory=_finetune_defaults)
    eval: EvalConfig = field(default_factory=EvalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def check(self, key: str) -> None:
        from qpm_dist import methods

        if self.method not in methods.names():
            raise ConfigError(f"method: expected one of {', '.join(repr(n) for n in methods.names())}, "
                              f"got {self.method!r}")
        if self.finetune.epochs == 0:
            raise ConfigError("finetune.epochs: expected a positive integer, got 0")
        if self.dense.epochs == 0 and not self.model.weights:
            raise ConfigError("dense.epochs=0 skips dense training, so model.weights must name the dense model's weights")


_CONFIG_CLASSES: dict[tuple, type] = {}


def config_class() -> type:
    """`Config` plus one field per config section of the registered methods (cached per set of sections)."""
    from qpm_dist import methods

    sections = methods.config_sections()
    signature = tuple(sorted((name, id(cls)) for name, cls in sections.items()))
    if signature not in _CONFIG_CLASSES:
        extra = [(name, cls, field(default_factory=cls)) for name, cls in sorted(sections.items())]
        _CONFIG_CLASSES[signature] = dataclasses.make_dataclass("Config", extra, bases=(Config,),
                                                                namespace={"__module__": __name__})
    return _CONFIG_CLASSES[signature]


def default_config() -> Config:
    return config_class()()


# ----------------------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in args)
        return f"{inner} or null" if len(args) < len(typing.get_args(tp)) else inner
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Return `value` checked (and, for int -> float only, widened) against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return _build(tp, value, key)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (str, bool):
        if isinstance(value, tp):
            return value
    else:  # pragma: no cover - schema error, not a user error
        raise TypeError(f"unsupported annotation {tp!r} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls: type, values: dict, prefix: str, base: Any = None) -> Any:
    """Instantiate dataclass `cls` from `values`, starting from `base` (or the defaults)."""
    obj = base if base is not None else cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in names:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            where = f"under '{prefix}'" if prefix else "at the top level"
            raise ConfigError(f"unknown config key '{key}'{hint} (known keys {where}: {', '.join(names)})")
        tp = hints[name]
        current = getattr(obj, name)
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            setattr(obj, name, _build(tp, value, key, base=current))
        else:
            setattr(obj, name, _convert(value, tp, key))
    return obj


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc})") from None
    return key.split("."), value


def _nest(path: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then each `key.sub=value` override, validated at every layer."""
    cls = config_class()
    cfg = cls()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        cfg = _build(cls, data, "", base=cfg)
    for text in overrides:
        keys, value = _parse_override(text)
        cfg = _build(cls, _nest(keys, value), "", base=cfg)
    validate(cfg)
    return cfg


def _check_sections(obj: Any, key: str) -> None:
    """Call `check(key)` of every section (nested ones too) that defines it, innermost first."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_sections(value, f"{key}.{f.name}" if key else f.name)
    if hasattr(obj, "check"):
        obj.check(key)


def validate(cfg: Config) -> None:
    """Every section's own checks, then the running method's cross-section checks."""
    from qpm_dist import methods

    _check_sections(cfg, "")
    spec = methods.get(cfg.method)
    if spec.validate is not None:
        spec.validate(cfg)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from qpm_dist.utils import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def fingerprint(*parts: Any) -> str:
    """A stable hex digest of JSON-serialisable parts (dataclasses are converted to dicts)."""
    norm = [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    return hashlib.sha256(json.dumps(norm, sort_keys=True, default=str).encode()).hexdigest()
