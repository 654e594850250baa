"""Trained parts loaded from disk once per scope, not once per wrap.

A method's heavy parts (LangDC's captioner, ATP's threshold heads, VQToken's attention) load when the
method is built, and the evaluation runner builds a method once per cell and chunk of samples. Inside
:func:`reuse_loaded_parts` a part loaded from the same place is built once and handed out again; outside
it every load reads the disk, as before. The parts are modules in eval mode that wrapping only moves to the
model's device, so sharing one between successive wraps of a run is safe; two wraps alive at once (two
models) should not share a scope.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_CACHE: contextvars.ContextVar[dict[tuple, Any] | None] = contextvars.ContextVar("tokenreduce_parts", default=None)


@contextlib.contextmanager
def reuse_loaded_parts() -> Iterator[None]:
    """Within the block, :func:`load_once` builds each (kind, source, revision) once."""
    token = _CACHE.set({})
    try:
        yield
    finally:
        _CACHE.reset(token)


def load_once(kind: str, source: str | os.PathLike, revision: str | None, load: Callable[[], T]) -> T:
    """``load()``, or the part it built earlier in the current :func:`reuse_loaded_parts` block."""
    cache = _CACHE.get()
    if cache is None:
        return load()
    path = Path(source).expanduser()
    key = (kind, str(path.resolve()) if path.exists() else str(source), revision)
    if key not in cache:
        cache[key] = load()
    return cache[key]
