"""Evaluation tasks by name: the real benchmarks, plus whatever other modules register.

    from tokenreduce.eval.tasks import get_task
    task = get_task("docvqa", path="/data/docvqa")            # local copy in the hub schema
    task = get_task("vqav2", revision="a1b2c3")                 # hub id from sources.json, pinned
    task = get_task("synthetic-video")                          # the project's synthetic benchmark

Another benchmark registers a factory with :func:`register_task`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tokenreduce.eval.task import Task
from tokenreduce.eval.tasks.benchmarks import MVBENCH_SUBTASKS, TASK_CLASSES
from tokenreduce.eval.tasks.synthetic import SYNTHETIC_TASKS

_FACTORIES: dict[str, Callable[..., Task]] = {**TASK_CLASSES, **SYNTHETIC_TASKS}


def register_task(name: str, factory: Callable[..., Task], overwrite: bool = False) -> None:
    """Make ``get_task(name, **options)`` call ``factory(**options)``."""
    if not name or not isinstance(name, str):
        raise ValueError(f"task name must be a non-empty string, got {name!r}")
    if name in _FACTORIES and not overwrite and _FACTORIES[name] is not factory:
        raise ValueError(f"task {name!r} is already registered; pass overwrite=True to replace it")
    _FACTORIES[name] = factory


def list_tasks() -> list[str]:
    """Names :func:`get_task` accepts."""
    return sorted(_FACTORIES)


def get_task(name: str, **options: Any) -> Task:
    """The task called ``name``, built with ``options`` (data location, prompt options...)."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}")
    return _FACTORIES[name](**options)


__all__ = ["MVBENCH_SUBTASKS", "get_task", "list_tasks", "register_task"]
