"""The oracle tables, derived from the registry x the adapters: registering a method (or an adapter) covers it.

A case is a registered method and a tiny-model family that ``wrap`` accepts it on: the family is among the
method's ``families`` (None: every family) and the family's adapter runs every stage the method acts in.
"""

from __future__ import annotations

import pytest

from tokenreduce.adapters import adapter_class, family_name
from tokenreduce.core.registry import MethodSpec, get_method, method_specs
from tokenreduce.testing.tiny import FAMILIES, tiny_model

# Methods that cannot run without trained weights (langdc's captioner) run the oracles in their own tests.
NEEDS_TRAINED_WEIGHTS = {"langdc"}


def runs_on(spec: MethodSpec, family: str) -> bool:
    """Whether ``wrap`` accepts the method on the family (its families and the adapter's stages)."""
    listed = spec.families is None or family_name(family) in {family_name(f) for f in spec.families}
    return listed and set(spec.stages) <= set(adapter_class(family).stages)


def methods(stage: str, *, only: bool = False) -> list[str]:
    """Registered methods acting in ``stage`` (with ``only``: in no other stage), those needing trained
    weights left out."""
    return [s.name for s in method_specs() if stage in s.stages and (not only or s.stages == (stage,))
            and s.name not in NEEDS_TRAINED_WEIGHTS]


def cases(stage: str, *, only: bool = False, families: tuple[str, ...] = FAMILIES) -> list[tuple[str, str]]:
    """(method, family) for every method of :func:`methods` and every family of ``families`` it runs on."""
    return [(m, f) for m in methods(stage, only=only) for f in families if runs_on(get_method(m), f)]



def token_cases() -> list:
    """A ``pytest.param`` (method, family) for every method that changes the tokens (vision, projector or LLM
    stage) on every family it runs on."""
    return [pytest.param(s.name, f, id=f"{s.name}-{f}") for s in method_specs()
            if {"vision", "projector", "llm"} & set(s.stages) and s.name not in NEEDS_TRAINED_WEIGHTS
            for f in FAMILIES if runs_on(s, f)]


def cached_model(models: dict, family: str, **options):
    """The tiny model of ``family`` kept in ``models`` (a module-scoped fixture's dict), built on first use."""
    if family not in models:
        models[family] = tiny_model(family, **options)
    return models[family]
