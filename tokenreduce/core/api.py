"""The public entry points: wrap, unwrap, disabled, stats, from_pretrained."""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from tokenreduce.adapters import family_name, get_adapter
from tokenreduce.core.config import CONFIG_NAME, MethodConfig, build_config, config_at_budget
from tokenreduce.core.handle import HANDLE_ATTR, ModelHandle
from tokenreduce.core.registry import MethodSpec, get_method, method_specs
from tokenreduce.core.stack import StackConfig, is_stack_name, spec_of, stack_config
from tokenreduce.core.stats import Stats
from tokenreduce.sources import check_model_source


def get_handle(model: nn.Module) -> ModelHandle | None:
    """The handle of a wrapped model, or None."""
    return model.__dict__.get(HANDLE_ATTR)


def _require_handle(model: nn.Module, what: str) -> ModelHandle:
    handle = get_handle(model)
    if handle is None:
        raise ValueError(f"`{what}` needs a model wrapped by tokenreduce.wrap; {type(model).__name__} is not wrapped")
    return handle


def _supports(families: tuple[str, ...] | None, family: str) -> bool:
    """Whether a method's ``families`` (None: every VLM family) name ``family``, in either spelling."""
    return families is not None and family in {family_name(f) for f in families}


def _check_supported(spec: MethodSpec, adapter: Any, stack: str | None = None) -> None:
    """Raise (one line naming the method and the family) unless the family runs every stage of ``spec``."""
    where = f" (in stack {stack!r})" if stack else ""
    if not adapter.is_vlm and not _supports(spec.families, adapter.name):
        usable = [s.name for s in method_specs() if s.families and _supports(s.families, adapter.name)]
        raise TypeError(
            f"method {spec.name!r}{where} needs a vision-language model; on a bare vision tower ({adapter.describe()}) "
            f"use one of: {', '.join(usable)}"
        )
    if spec.families is not None and not _supports(spec.families, adapter.name):
        raise TypeError(
            f"method {spec.name!r}{where} does not support model family {adapter.name!r}; "
            f"supported: {', '.join(spec.families)}"
        )
    unsupported = [s for s in spec.stages if s not in adapter.stages]
    if unsupported:
        raise TypeError(
            f"method {spec.name!r}{where} acts in the {' and '.join(unsupported)} stage, which model family "
            f"{adapter.name!r} does not support; it supports: {', '.join(adapter.stages)}"
        )


def wrap(model: nn.Module, method: str | MethodConfig | Sequence[str | MethodConfig], **options: Any) -> nn.Module:
    """Make ``model`` reduce its tokens with ``method``, in place; returns the model.

    ``method`` is a registered name (see :func:`list_methods`) with its options as keywords, or a config
    object. Call sites stay the same: ``model(**inputs)``, ``model.generate(**inputs)``.

    Every method also accepts ``budget=`` (a name only): the share of the full visual-token x layer work
    (in-LLM methods average over the decoder layers), set through the method's ``at_budget``; its native
    options may come alongside. ``tr.stats`` then reports the achieved share against it.

    A stack of methods, at most one per stage, is a list of names and/or configs or the joined spelling
    ``"divprune+fastv"``; its options name their method (``**{"fastv.layer": 3}`` or ``fastv={"layer": 3}``)
    and ``budget=`` splits over its token-reducing methods in equal factors (:mod:`tokenreduce.core.stack`).
    """
    if get_handle(model) is not None:
        raise ValueError(
            f"model is already wrapped with method {get_handle(model).spec.name!r}; call tokenreduce.unwrap(model) first"
        )
    adapter = get_adapter(model)
    text = adapter.text_config if adapter.is_vlm else None
    num_layers = getattr(text, "num_hidden_layers", None)
    budget = None
    if isinstance(method, (list, tuple)) or is_stack_name(method):
        budget = options.pop("budget", None)
        config = stack_config(method, budget, num_layers, **options)
    elif isinstance(method, MethodConfig):
        if options:
            raise TypeError(
                f"options {sorted(options)} were given together with a config object; set them on the config instead"
            )
        config = method
    elif isinstance(method, str):
        budget = options.pop("budget", None)
        if budget is None:
            config = build_config(method, **options)
        else:
            config = config_at_budget(method, budget, num_layers, **options)
    else:
        raise TypeError(
            f"`method` must be a method name or a MethodConfig, or a list of them (a stack), got {type(method).__name__}"
        )
    spec = spec_of(config)
    if isinstance(config, StackConfig):
        for member in config.configs:
            _check_supported(get_method(member.method), adapter, spec.name)
    else:
        _check_supported(spec, adapter)
    handle = ModelHandle(model, adapter, spec, config)
    handle.install()
    if budget is not None:
        handle.stats.budget = float(budget)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Undo :func:`wrap`: every replaced method, hook and attribute is restored; returns the model."""
    _require_handle(model, "unwrap").remove()
    return model


@contextmanager
def disabled(model: nn.Module):
    """Run the wrapped model as the original inside the block (the wrapping stays installed)."""
    with _require_handle(model, "disabled").disabled():
        yield model


def stats(model: nn.Module, reset: bool = False) -> Stats:
    """Tokens in and out per sample (per item and per layer) and time spent in the reducer; per stage (of a
    stack too) through ``Stats.stage_summary()``.

    With ``reset=True`` the returned object is a snapshot and the model's record starts empty.
    """
    handle = _require_handle(model, "stats")
    record = handle.stats
    if reset:
        snapshot = Stats()
        snapshot.samples, snapshot.calls, snapshot.budget = list(record.samples), record.calls, record.budget
        snapshot.stages = record.stages
        record.reset()
        return snapshot
    return record


def from_pretrained(
    model_id_or_dir: str | os.PathLike,
    method: str | MethodConfig | Sequence[str | MethodConfig] | None = None,
    *,
    model_kwargs: dict[str, Any] | None = None,
    processor_kwargs: dict[str, Any] | None = None,
    **options: Any,
):
    """Load a transformers VLM and its processor (hub id or local directory) and wrap the model.

    ``method`` may be omitted when the directory holds a ``tokenreduce_config.json`` written by
    ``MethodConfig.save_pretrained`` (a stack's too). Returns ``(model, processor)``.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    source = str(model_id_or_dir)
    check_model_source(source, "model_id_or_dir")
    if method is None:
        config_file = Path(source) / CONFIG_NAME
        if not config_file.is_file():
            raise ValueError(
                f"`method` is required: {source!r} holds no {CONFIG_NAME}; pass a method name such as 'pool'"
            )
        method = MethodConfig.from_pretrained(config_file)
    model = AutoModelForImageTextToText.from_pretrained(source, **(model_kwargs or {}))
    processor = AutoProcessor.from_pretrained(source, **(processor_kwargs or {}))
    wrap(model, method, **options)
    return model, processor
