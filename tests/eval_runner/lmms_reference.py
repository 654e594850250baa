"""lmms-eval's own scoring functions, read from its installed source files without importing its tasks.

Importing ``lmms_eval.tasks.<task>.utils`` is slow (tens of seconds: the package registers every task)
and some of those modules act at import time (``nextqa.utils`` calls ``nltk.download``, ``mvbench.utils``
reads ``HF_HOME`` from the environment and fails without it). The functions compared here are plain
Python, so the named top-level definitions are taken from the module file as they are (decorators, such
as ``@register_metric``, dropped) and executed in a namespace holding the standard modules they use.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import logging
import math
import random
import re
import statistics
import string
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest


def lmms_root() -> Path:
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("lmms-eval is not installed (the `lmms` extra)")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def lmms_functions(relpath: str, *names: str, **namespace: Any) -> dict[str, Any]:
    """The top-level definitions ``names`` of ``lmms_eval/<relpath>``, executed from its source (once)."""
    path = lmms_root() / relpath
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names:
            node.decorator_list = []
            nodes.append(node)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in names for t in node.targets):
            nodes.append(node)
    found = {n.name if hasattr(n, "name") else n.targets[0].id for n in nodes}
    missing = set(names) - found
    if missing:
        raise LookupError(f"{sorted(missing)} not found at the top level of {path}")
    scope: dict[str, Any] = {
        "re": re, "string": string, "random": random, "statistics": statistics, "math": math, "np": np,
        "defaultdict": defaultdict, "eval_logger": logging.getLogger("lmms_eval"), **namespace,
    }
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), scope)
    return {name: scope[name] for name in names}
