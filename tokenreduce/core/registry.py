"""Registry of reduction methods.

A method registers its name, its config dataclass, the stages it acts in and the class that implements
it. Registration fails loudly on a bad or duplicate name, and everything registered is picked up by the
shared test table, so a new method is tested by registering it.
"""

from __future__ import annotations

import fnmatch
import re
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


_METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    *,
    config_cls: type,
    stages: tuple[str, ...] | str,
    description: str = "",
    families: tuple[str, ...] | None = None,
    modalities: tuple[str, ...] = ("image", "video"),
) -> Callable[[type], type]:
    """Class decorator registering a reduction method under ``name``.

    ``stages`` is one or more of ``vision``, ``projector``, ``llm``, ``decode``.
    """
    if isinstance(stages, str):
        stages = (stages,)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"method name must match {_NAME.pattern!r}, got {name!r}")
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise ValueError(f"`stages` must be a non-empty subset of {STAGES}, got {stages!r}")

    def decorator(method_cls: type) -> type:
        if name in _METHODS and _METHODS[name].method_cls is not method_cls:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].method_cls.__qualname__}")
        _METHODS[name] = MethodSpec(
            name=name,
            config_cls=config_cls,
            method_cls=method_cls,
            stages=tuple(stages),
            description=description or (method_cls.__doc__ or "").strip().splitlines()[0],
            families=families,
            modalities=modalities,
        )
        config_cls.method = name
        method_cls.name = name
        return method_cls

    return decorator


def _ensure_builtin_methods() -> None:
    # Importing the plugins package registers every built-in method; it imports no optional extra.
    import tokenreduce.plugins  # noqa: F401


def get_method(name: str) -> MethodSpec:
    """Return the spec of a registered method, or raise a ValueError listing the known ones."""
    _ensure_builtin_methods()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def list_methods(filter: str = "*", stage: str | None = None) -> list[str]:
    """Names of registered methods, optionally filtered by a wildcard pattern and a stage."""
    _ensure_builtin_methods()
    if stage is not None and stage not in STAGES:
        raise ValueError(f"`stage` must be one of {STAGES}, got {stage!r}")
    return sorted(
        n
        for n, spec in _METHODS.items()
        if fnmatch.fnmatch(n, filter) and (stage is None or stage in spec.stages)
    )


def method_specs() -> list[MethodSpec]:
    """Every registered method's spec, sorted by name."""
    _ensure_builtin_methods()
    return [_METHODS[n] for n in sorted(_METHODS)]
