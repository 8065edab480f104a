"""Typed run configuration: dataclasses, YAML files and dotted command-line overrides.

The sections every run shares live here (run, data, model, dense, finetune, eval, report, engine, wandb);
each method declares its own sections (qpm, glm, ...) in its module, and `config_class()` adds every
registered method's sections to `Config` (see qpm_dist.methods). A section may define
`check(self, key)`, which `validate` calls with the section's dotted key; a method's cross-section checks are
its spec's `validate(cfg)`, run when the config runs that method. Every numeric field declares its valid range
next to its default (`bounded`), so `validate` checks the ranges of every section without a hand-written `if`.

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
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type or an invalid value."""


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric config field; each bound is optional (ge: >=, gt: >, le: <=, lt: <)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, x: float) -> bool:  # NaN is in no range: every comparison with it is false
        return ((self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt)
                and (self.le is None or x <= self.le) and (self.lt is None or x < self.lt))

    def __str__(self) -> str:
        low = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else None
        high = f"{self.le}]" if self.le is not None else f"{self.lt})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        return ("<= " if high[-1] == "]" else "< ") + high[:-1]


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None) -> Any:
    """A numeric field (int, float, Optional or a list of them) with its valid range, which `validate` checks
    for every section (each item of a list; None passes). Declared here, next to the default, so that no field
    can go unchecked and no section needs a hand-written `if` for it."""
    metadata = {"range": Range(ge=ge, gt=gt, le=le, lt=lt)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# --------------------------------------------------------------------------------------------- schema


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    # numpy takes 32-bit seeds, and QPM's solvers (solver_service.problem.OPTION_BOUNDS, Gurobi) at most 2e9.
    seed: int = bounded(0, ge=0, le=2_000_000_000)
    # "auto": continue from the newest valid checkpoint of the stage if there is one; "never": start fresh
    # (refuses to overwrite an unfinished stage); or the path of a checkpoint directory to resume from.
    resume: str = "auto"


# Datasets with one object box per image: the only ones data.crop_to_box and `--crop-to-box` accept.
CROP_TO_BOX_DATASETS = ("synthetic", "cub", "travelingbirds", "cars")


@dataclass
class DataConfig:
    # synthetic/cub: CUB-200-2011 layout; folder: root/{train,val}/<class>/*; imagenet: train class folders,
    # val as class folders or flat with the devkit's labels; cars: Stanford Cars with its devkit .mat files;
    # travelingbirds: CUB's images with swapped backgrounds (root: TravelingBirds/ or its CUB_fixed/ folder, with
    # train/ and test/; the single-folder CUB_black/ and CUB_random/ are not read), split and boxes from
    # data.cub_root.
    dataset: Literal["synthetic", "cub", "folder", "imagenet", "cars", "travelingbirds"] = "synthetic"
    root: str = "data/synthetic"
    # travelingbirds only (required there, on every backend): the CUB-200-2011 folder whose images.txt, labels,
    # split and boxes describe the TravelingBirds images, and whose attributes give structural grounding.
    cub_root: Optional[str] = None
    # cub / travelingbirds / synthetic: read the images from pre-cropped copies instead (the reference's
    # crop_root, ProtoTree's preprocessing): train from <crop_root>/train_cropped/, test from
    # <crop_root>/test_cropped/, each with images.txt's relative paths. Excludes crop_to_box.
    crop_root: Optional[str] = None
    # folder: decode the image files (no conversion needed); ffcv / wds: read what
    # `python -m data_prep to-ffcv|to-wds` wrote into `converted` (root is then not read).
    backend: Literal["folder", "ffcv", "wds"] = "folder"
    converted: Optional[str] = None
    # Image decoder of the folder and wds backends: torchvision's decode_jpeg (PIL for files it rejects) or PIL.
    decoder: Literal["torchvision", "pil"] = "torchvision"
    # A file that cannot be decoded: stop with its path ("error") or warn with its path and use the next
    # readable sample instead ("skip"). A missing file always stops.
    on_corrupt: Literal["error", "skip"] = "error"
    # folder backend: check each image's bytes against a digest list before decoding it (a mismatch is handled
    # like an undecodable file, by on_corrupt). "auto": data.root's qpm_dist_digests.json if it exists (written by
    # `python -m data_prep fingerprint` and make-synthetic); a path: that list (must exist); "off": no check
    # (YAML reads an unquoted off as false: false means "off", true "auto").
    digests: Union[str, bool] = "auto"
    # wds: "exact" reads every sample once per epoch (all but < one global batch, equal batches per rank);
    # "resampled" draws shards with replacement (WebDataset's resampled=True) for the same number of steps.
    wds_mode: Literal["exact", "resampled"] = "exact"
    wds_shuffle_buffer: int = bounded(1000, ge=1)  # samples per loader worker
    # ffcv: let the OS page cache hold the .beton (FFCV's os_cache=True, the ffcv-imagenet setting).
    ffcv_os_cache: bool = True
    img_size: int = bounded(64, ge=8)
    # Train-time augmentation recipe, see qpm_dist.data.transforms.
    augment: Literal["none", "light", "cub", "imagenet"] = "light"
    # Crop every image to its object bounding box. Needs one box per image: cub, cars, synthetic (not imagenet,
    # whose box XMLs cover only some train images, nor folder).
    crop_to_box: bool = False
    # imagenet: validation images of classes without a train folder (a class subset) stop the run naming this
    # option ("all"), or are left out ("train": evaluate on the train classes only).
    val_classes: Literal["all", "train"] = "all"
    num_workers: int = bounded(2, ge=0)
    # Per-channel normalisation of images scaled to [0, 1].
    mean: list[float] = bounded([0.485, 0.456, 0.406], ge=0, le=1)
    std: list[float] = bounded([0.229, 0.224, 0.225], gt=0, le=1)

    def check(self, key: str) -> None:
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError(f"{key}.mean and {key}.std: expected 3 values (RGB)")
        if isinstance(self.digests, str) and not self.digests.strip():
            raise ConfigError(f"{key}.digests: expected \"auto\", \"off\" or the path of a digest list")
        if self.crop_to_box and self.dataset not in CROP_TO_BOX_DATASETS:
            raise ConfigError(f"{key}.crop_to_box: needs one bounding box per image, which {key}.dataset="
                              f"{self.dataset} does not have (only {', '.join(CROP_TO_BOX_DATASETS)} do)")
        if self.dataset == "travelingbirds" and not self.cub_root:
            raise ConfigError(f"{key}.cub_root: {key}.dataset=travelingbirds needs the CUB-200-2011 folder "
                              f"(its split file and boxes describe the TravelingBirds images)")
        if self.crop_root is not None:
            if self.dataset not in ("cub", "travelingbirds", "synthetic"):
                raise ConfigError(f"{key}.crop_root: pre-cropped images are read for the CUB layouts "
                                  f"(cub, travelingbirds, synthetic), not for {key}.dataset={self.dataset}")
            if self.crop_to_box:
                raise ConfigError(f"{key}.crop_root and {key}.crop_to_box: choose one (the images in crop_root "
                                  f"are already cropped; the boxes describe the originals)")
        if self.backend != "folder" and not self.converted:
            raise ConfigError(f"{key}.converted: {key}.backend={self.backend} needs the folder written by "
                              f"`python -m data_prep to-{self.backend}`")


@dataclass
class ModelConfig:
    # vgg11_bn / vgg16_bn (torchvision's VGG-BN features): for methods that cut the backbone at a layer (PixPNet's
    # prototype head, models.truncation), not for the dense and sparse heads.
    arch: Literal["tiny_resnet", "resnet18", "resnet34", "resnet50", "vgg11_bn", "vgg16_bn"] = "resnet50"
    # QPM's option: layer3 and layer4 with stride 1 (output stride 8, 28x28 maps at 224 px).
    reduced_strides: bool = True
    # Local file with backbone weights (torchvision layout). Nothing is ever downloaded.
    weights: Optional[str] = None
    # Which state dict of model.weights to take: auto = the file itself if it is a state dict, else the first
    # found under 'model', 'state_dict', 'model_ema', 'state_dict_ema' (README, "Real data": the formats read).
    weights_key: Literal["auto", "model", "state_dict", "model_ema", "state_dict_ema"] = "auto"
    norm: Literal["batch", "sync_batch", "group"] = "batch"
    dropout: float = bounded(0.2, ge=0, lt=1)
    tiny_width: int = bounded(16, ge=1)
    # Global pooling of the dense head: "avg" (GAP), or "max" (GMP, the GC paper's variant, in training and
    # evaluation). Only methods whose final head is the dense one (gc) take "max": a sparse head averages.
    pooling: Literal["avg", "max"] = "avg"


@dataclass
class OptimConfig:
    # adam: torch's Adam with coupled L2 weight decay (PixPNet's reference, spec §2.3); adamw: decoupled decay.
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = bounded(0.005, gt=0)
    # Learning rate of the classification head; None = same as lr.
    head_lr: Optional[float] = bounded(None, gt=0)
    momentum: float = bounded(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = bounded(5e-4, ge=0)
    # Weight decay of normalisation parameters and biases; None = same as weight_decay.
    norm_weight_decay: Optional[float] = bounded(None, ge=0)

    def check(self, key: str) -> None:
        if self.nesterov and self.momentum == 0:
            raise ConfigError(f"{key}.nesterov: Nesterov momentum needs {key}.momentum > 0")


@dataclass
class ScheduleConfig:
    # step: lr * gamma ** (epoch // step_epochs), stepped once per epoch as the QPM reference does.
    # cosine / linear: per-iteration decay to min_lr_ratio * lr; constant: no decay. All support warmup.
    name: Literal["step", "cosine", "linear", "constant"] = "step"
    step_epochs: int = bounded(30, ge=1)
    gamma: float = bounded(0.4, gt=0, le=1)
    warmup_epochs: float = bounded(0.0, ge=0)
    min_lr_ratio: float = bounded(0.0, ge=0, le=1)


@dataclass
class PhaseConfig:
    """One training phase (dense training or fine-tuning)."""

    # 0 skips the phase: the dense model is then model.weights as given (e.g. torchvision ImageNet weights).
    epochs: int = bounded(150, ge=0)
    # Global batch size (all ranks and accumulation steps together): results do not depend on world size.
    batch_size: int = bounded(16, ge=1)
    eval_batch_size: int = bounded(64, ge=1)
    grad_accum: int = bounded(1, ge=1)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # Feature diversity loss weight beta (0 disables it). 0.196 is the reference value for ResNet-34/50.
    fdl_beta: float = bounded(0.196, ge=0)
    # The reference lets the FDL gradient flow into the classifier weights (spec bug 24); we detach them.
    fdl_detach_weights: bool = True
    label_smoothing: float = bounded(0.0, ge=0, lt=1)
    clip_grad_norm: Optional[float] = bounded(None, gt=0)
    eval_every_epochs: int = bounded(5, ge=1)

    def check(self, key: str) -> None:
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"{key}.batch_size ({self.batch_size}) must be divisible by {key}.grad_accum "
                              f"({self.grad_accum})")


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
    batch_size: int = bounded(128, ge=1)  # global
    # Contrastiveness fits a 2-component GMM per feature on a uniform subsample of this many training rows.
    gmm_samples: int = bounded(20000, ge=2)
    # ...and is skipped (reported as null) above this many features, like the reference (dense ResNet-50).
    gmm_max_features: int = bounded(1000, ge=0)
    # Pointing game, SPG and CH input: null scores the test transform's view (batches); N the reference's
    # (specs/gc_consistency.md §7.1): the whole image, shorter side resized to N px, no crop, one image per batch.
    pointing_resize: Optional[int] = bounded(None, ge=1)
    # PG/SPG hit radius in pixels of the original image (strict): 15, the reference's and TorchRay's; scale it for
    # images far from ImageNet's size (on the demo's 64-96 px images 15 px is a fifth of the side, PG saturates).
    pointing_tolerance: float = bounded(15.0, ge=0)


@dataclass
class ReportConfig:
    class_pairs: int = bounded(4, ge=0)  # class pairs shown with example heatmaps
    max_classes: int = bounded(200, ge=1)  # classes listed in the HTML report


@dataclass
class EngineConfig:
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    deepspeed_config: str = "configs/deepspeed/zero1.json"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Mixed precision and channels_last apply on GPU only; on CPU training runs in fp32, contiguous.
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    channels_last: bool = True
    # Save a checkpoint every N optimizer steps (0: only at the end of every epoch).
    checkpoint_every_steps: int = bounded(0, ge=0)
    keep_checkpoints: int = bounded(2, ge=1)
    log_every_steps: int = bounded(20, ge=1)
    progress: bool = True
    # Seconds to wait for the other ranks in collectives before giving up.
    timeout_s: int = bounded(1800, ge=1)
    # Non-finite (NaN/inf) training loss: 0 stops the phase at once (exit 3); N >= 1 skips such optimizer steps
    # (gradients dropped, counted in the logs) and stops at the (N+1)-th. DDP only: DeepSpeed cannot skip a step.
    skip_nonfinite_steps: int = bounded(0, ge=0)

    def check(self, key: str) -> None:
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
        head = getattr(methods.get(self.method).head, "kind", None)
        if self.model.arch.startswith("vgg") and head != "prototype":
            raise ConfigError(f"model.arch: {self.model.arch} is available to methods that cut the backbone at a layer "
                              f"(a prototype head), not to method {self.method}, whose final head is {head!r}; use "
                              f"tiny_resnet or a resnet")
        if self.model.pooling != "avg" and head != "dense":
            raise ConfigError(f"model.pooling: {self.model.pooling!r} pools the dense head only, but method "
                              f"{self.method}'s final head is {head!r}, which averages; use model.pooling=avg")
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


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with two differences. A key given twice in one mapping is an error: PyYAML keeps the
    second silently (a second `dense:` block replaced the first, and `epochs: 5` became the default 150). And
    `1e-3` is a float: YAML 1.1, which PyYAML implements, wants a dot and a signed exponent (`1.0e-3`) and
    reads `1e-3` as the string '1e-3'."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in first_seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first_seen[key].start_mark.line + 1}); "
                    "the second would silently replace the first", key_node.start_mark)
            first_seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """One line: where in `text` (line, column) and what is wrong."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)  # PyYAML gives the code
        return f"line {line}: character #x{code:04x} is not allowed in YAML (a damaged file?)"
    return " ".join(str(exc).split())


def _read_yaml_file(path: Path) -> dict:
    """The top-level mapping of a config file. Damage is refused rather than read as a different config: bytes
    that are not UTF-8, a file cut short (no newline at its end), an empty file."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}, line {line}: not UTF-8 text (byte {exc.start}); a damaged file?") from None
    if text and not text.endswith("\n"):
        raise ConfigError(f"{path}: no newline at the end of the last line: was the file cut short (an interrupted "
                          "copy, a full disk)? If it is complete, end it with a newline")
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}, {_yaml_problem(exc, text)}") from None
    if data is None:
        raise ConfigError(f"{path}: no settings (the file is empty or only comments)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({_yaml_problem(exc, raw)})") from None
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
        cfg = _build(cls, _read_yaml_file(path), "", base=cfg)
    for text in overrides:
        keys, value = _parse_override(text)
        cfg = _build(cls, _nest(keys, value), "", base=cfg)
    validate(cfg)
    return cfg


def _check_range(value: Any, bounds: Range, key: str) -> None:
    """`value` (a number, None or a list of numbers) against the range its field declares (`bounded`)."""
    items = [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]
    for item_key, v in items:
        if v is None:
            continue
        finite = not isinstance(v, float) or math.isfinite(v)
        if not finite or v not in bounds:
            kind = "an integer" if isinstance(v, int) else "a finite number" if not finite else "a number"
            raise ConfigError(f"{item_key}: expected {kind} {bounds}, got {v!r}")


def _check_sections(obj: Any, key: str) -> None:
    """Check every field's declared range, then call `check(key)` of every section (nested ones too) that
    defines it, innermost first: a section's own check sees values already in range."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        field_key = f"{key}.{f.name}" if key else f.name
        if dataclasses.is_dataclass(value):
            _check_sections(value, field_key)
        elif "range" in f.metadata:
            _check_range(value, f.metadata["range"], field_key)
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
