"""Registry of reduction methods: a leaf module that imports nothing else of the package.

A method registers its name, its config dataclass and the class that implements it; the class's stage
base (``VisionMethod``, ``ProjectorMethod``, ``LLMMethod``, ``DecodeMethod``) gives the stages it acts in.
Registration fails loudly on a bad or duplicate name or a class of no stage, and everything registered is
picked up by the shared test tables, so a new method is tested by registering it.

Built-in methods register when ``import tokenreduce`` imports :mod:`tokenreduce.plugins`. Methods of other
distributions register through the entry-point group ``tokenreduce.methods``, loaded once on the first
lookup (:func:`get_method`, :func:`list_methods`, :func:`method_specs`). An entry point names a module whose
import registers its methods, or a function called once with no arguments that does::

    [project.entry-points."tokenreduce.methods"]
    mymethod = "my_package.tokenreduce_plugin"
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import inspect
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

STAGES = ("vision", "projector", "llm", "decode")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class MethodSpec:
    """What the registry knows about one method."""

    name: str
    config_cls: type
    method_cls: type
    stages: tuple[str, ...]
    description: str
    # Model families (adapter names) the method supports; None means every family.
    families: tuple[str, ...] | None = None
    # Modalities the method acts on by default.
    modalities: tuple[str, ...] = ("image", "video")


ENTRY_POINT_GROUP = "tokenreduce.methods"

_METHODS: dict[str, MethodSpec] = {}
# Entry points that failed to load, "name (distribution)" -> the error, shown by unknown-method errors.
_PLUGIN_ERRORS: dict[str, str] = {}
_plugins_loaded = False


def register_method(
    name: str,
    *,
    config_cls: type,
    stages: tuple[str, ...] | str | None = None,
    description: str = "",
    families: tuple[str, ...] | None = None,
    modalities: tuple[str, ...] = ("image", "video"),
) -> Callable[[type], type]:
    """Class decorator registering a reduction method under ``name``.

    The method's stages are its class's: it derives from one stage class of
    :mod:`tokenreduce.core.reduction` (``VisionMethod``, ``ProjectorMethod``, ``LLMMethod``,
    ``DecodeMethod``), whose ``stages`` the registry records. ``stages`` (one or more of ``vision``,
    ``projector``, ``llm``, ``decode``), when given, must say the same.
    """
    if isinstance(stages, str):
        stages = (stages,)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"method name must match {_NAME.pattern!r}, got {name!r}")
    if stages is not None and (not stages or any(s not in STAGES for s in stages)):
        raise ValueError(f"`stages` must be a non-empty subset of {STAGES}, got {stages!r}")

    def decorator(method_cls: type) -> type:
        if name in _METHODS and _METHODS[name].method_cls is not method_cls:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].method_cls.__qualname__}")
        # Read, not imported: the registry is a leaf (the stage classes live in tokenreduce.core.reduction).
        declared = tuple(getattr(method_cls, "stages", ()) or ())
        if not declared or any(s not in STAGES for s in declared):
            raise TypeError(
                f"method {name!r}: class {method_cls.__qualname__} must derive from a stage class of "
                "tokenreduce.core.reduction (VisionMethod, ProjectorMethod, LLMMethod or DecodeMethod)"
            )
        if stages is not None and set(stages) != set(declared):
            raise ValueError(
                f"method {name!r}: `stages`={stages!r} differs from the stages of its class "
                f"{method_cls.__qualname__}, {declared!r}; leave `stages` out (the class says it)"
            )
        _METHODS[name] = MethodSpec(
            name=name,
            config_cls=config_cls,
            method_cls=method_cls,
            stages=declared,
            description=description or next(iter((method_cls.__doc__ or "").strip().splitlines()), ""),
            families=families,
            modalities=modalities,
        )
        config_cls.method = name
        method_cls.name = name
        return method_cls

    return decorator


def load_plugins() -> None:
    """Load the ``tokenreduce.methods`` entry points of installed distributions (once per process).

    A plugin that fails to import or to register is reported by a warning naming the entry point, its
    distribution and the error, and is listed again by the error of an unknown method name; the other
    plugins and the built-in methods stay usable.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True  # before loading: a plugin may look methods up while it registers
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = entry_point.dist.name if entry_point.dist is not None else "unknown distribution"
        label = f"{entry_point.name} ({dist})"
        try:
            loaded = entry_point.load()
            if callable(loaded) and not inspect.isclass(loaded):
                loaded()
        except Exception as error:  # a broken third-party plugin must not break the built-in methods
            _PLUGIN_ERRORS[label] = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"tokenreduce method plugin {label} = {entry_point.value!r} failed to load: "
                f"{type(error).__name__}: {error}",
                RuntimeWarning,
                stacklevel=2,
            )


def get_method(name: str) -> MethodSpec:
    """Return the spec of a registered method, or raise a ValueError listing the known ones."""
    load_plugins()
    if name not in _METHODS:
        failed = f"; plugins that failed to load: {', '.join(sorted(_PLUGIN_ERRORS))}" if _PLUGIN_ERRORS else ""
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(_METHODS))}{failed}")
    return _METHODS[name]


def list_methods(filter: str = "*", stage: str | None = None) -> list[str]:
    """Names of registered methods, optionally filtered by a wildcard pattern and a stage."""
    load_plugins()
    if stage is not None and stage not in STAGES:
        raise ValueError(f"`stage` must be one of {STAGES}, got {stage!r}")
    return sorted(
        n
        for n, spec in _METHODS.items()
        if fnmatch.fnmatch(n, filter) and (stage is None or stage in spec.stages)
    )


def method_specs() -> list[MethodSpec]:
    """Every registered method's spec, sorted by name."""
    load_plugins()
    return [_METHODS[n] for n in sorted(_METHODS)]
