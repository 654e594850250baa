"""What every trainer of the package shares: one module for accelerate to prepare, and atomic saving.

Trainable parts of a method (a VQ-attention module, a captioner's projections) are called from inside the
frozen model's forward, so there is no single module whose ``forward`` produces the loss. :class:`TrainStep`
is that module: it registers the trainable parts (so ``accelerator.prepare`` wraps them in
DistributedDataParallel, which averages their gradients in buckets during ``backward``) and runs the
trainer's step function. :func:`training_accelerator` builds the Accelerator the trainers' command lines use.

Caches and checkpoints are written to a temporary file in the target's own directory and moved into
place with ``os.replace``, so an interrupted run leaves the previous file or none, never a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn


class TrainStep(nn.Module):
    """A module owning ``trainable`` whose ``forward`` is ``step(*args, **kwargs)``.

    Hand it to ``accelerator.prepare``; call the prepared module for each step. The frozen model the step
    function closes over is not registered, so it is neither broadcast nor wrapped.
    """

    def __init__(self, trainable: nn.Module | Mapping[str, nn.Module], step: Callable[..., Any]):
        super().__init__()
        modules = dict(trainable) if isinstance(trainable, Mapping) else {"module": trainable}
        self.trainable = nn.ModuleDict(modules)
        self._step = step

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._step(*args, **kwargs)


def training_accelerator(**kwargs: Any):
    """An ``accelerate.Accelerator`` whose DDP tolerates parameters a step leaves unused.

    A step at one budget may skip part of a method's module; DDP then needs ``find_unused_parameters``,
    or every process waits for gradients that never come.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs

    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True), *kwargs.pop("kwargs_handlers", [])]
    return Accelerator(kwargs_handlers=handlers, **kwargs)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path``; when the block ends without error it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` through a temporary file in the same directory and ``os.replace``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``Path(path).write_text(text)``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory beside ``path`` to save a checkpoint into; when the block ends without error
    each file is moved into ``path`` with ``os.replace`` (subfolders included), so every file of the
    checkpoint is either the complete new one or the previous one. Files of ``path`` that the new
    checkpoint does not write are left as they are."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        for source in sorted(p for p in tmp.rglob("*") if p.is_file()):
            target = path / source.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
