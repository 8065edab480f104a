"""Methods: one module per method, each declaring one `MethodSpec`, and the registry that finds them.

A method module (`methods/<name>.py`) calls `register(MethodSpec(...))` at import: its name and label, the
config sections it declares (dataclasses with their own checks), its stage list, the head type of its final
model, its report sections and its headline metrics. Everything outside this package that needs to know
about methods reads the registry: the config resolves `cfg.<section>` through it, the CLI lists its demo
configs, the reports and `qpm-dist compare` take labels, order and headline metrics from it. Adding a method
is adding a module here (plus what is genuinely new: a model part, a loss, a metric).

The built-in methods are found by importing every module of this package once, on first use of the
registry; a method defined elsewhere is registered by importing its module (`load_plugins`, the CLI's
`--plugin`). This module itself imports nothing of qpm_dist, so `qpm_dist.config` can use it.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Iterable


@dataclass(frozen=True)
class MethodSpec:
    """What the rest of qpm-dist needs to know about a method."""

    name: str  # the `method:` value of a config; also the prefix of the method's own stage names
    label: str  # how reports and comparisons name it
    # config sections it declares, {"qpm": QPMConfig}; a section several methods share (glm) is declared by each
    # of them with the same class
    sections: dict[str, type]
    stages: Callable[[Any], list]  # the resolved config -> the method's stage list, in run order
    head: type  # the head type (models.net.register_head) of the method's final model
    # report sections after the generic ones: (report inputs, see report.build) -> [(title, html)]
    report_sections: Callable[[Any], list[tuple[str, str]]] = lambda inputs: []
    # metric keys (metrics.json) the comparisons plot for this method, accuracy first
    headline: tuple[str, ...] = ("accuracy",)
    validate: Callable[[Any], None] | None = None  # cross-field checks of a config that runs this method
    demo_config: str | None = None  # file in configs/ that `qpm-dist demo` runs for this method
    units: str = "features"  # what the final model's NFfeatures / PerClass count ("prototypes" for PixPNet)
    order: int = 100  # position in comparisons and in the demo (smaller first)


_REGISTRY: dict[str, MethodSpec] = {}
_discovered = False


def register(spec: MethodSpec) -> MethodSpec:
    """Add `spec` to the registry (idempotent for the same spec); returns it. The built-in methods are registered
    first, so a plugin that clashes with one of them is refused here, naming both, and not later at discovery."""
    _discover()  # a no-op during discovery itself (the built-ins' own register calls)
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} is already registered")
    for section, cls in spec.sections.items():
        declared = config_sections(discover=False).get(section)
        if declared is not None and declared is not cls:
            raise ValueError(f"method {spec.name!r} declares config section {section!r} as {cls.__qualname__}, "
                             f"another method as {declared.__qualname__}")
    _REGISTRY[spec.name] = spec
    return spec


def _discover() -> None:
    """Import every module of this package once: each built-in method registers itself."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def all_specs() -> list[MethodSpec]:
    _discover()
    return sorted(_REGISTRY.values(), key=lambda s: (s.order, s.name))


def names() -> list[str]:
    return [s.name for s in all_specs()]


def get(name: str) -> MethodSpec:
    _discover()
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(names())}")
    return _REGISTRY[name]


def label(name: str) -> str:
    """A method's label, or the name itself for a method this process does not know."""
    _discover()
    return _REGISTRY[name].label if name in _REGISTRY else name


def config_sections(discover: bool = True) -> dict[str, type]:
    """Every config section the registered methods declare: {section name: dataclass}."""
    if discover:
        _discover()
    sections: dict[str, type] = {}
    for spec in _REGISTRY.values():
        sections.update(spec.sections)
    return sections


def load_plugins(modules: Iterable[str]) -> None:
    """Import modules that register methods defined outside qpm_dist (e.g. `my_lab.cam_method`)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ImportError(f"--plugin {module}: cannot import it ({exc}); is it on PYTHONPATH?") from exc
