"""The package's import graph: no cycles between its modules, nothing imported from outside it.

The graph is read from the source with ``ast`` (nothing is imported). Its nodes are the modules of
``tokenreduce`` (a package is its ``__init__.py``). An edge goes from a module to every package module it
imports, wherever the import statement stands:

* at module level;
* inside a function or method. An import deferred into a function delays a cycle, it does not remove it
  (the modules still need each other, and which one loads first decides what the other sees), so a cycle
  through one fails the test as well;
* ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``; ``import a.b`` and
  ``from . import c`` are resolved the same way;
* importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` first, so it is an edge to those
  packages as well (implicitly; not to the importer's own packages, which Python runs before it), except
  to the root ``tokenreduce/__init__.py``: the root is the public facade that
  imports the core and every built-in method, and Python runs it before any submodule; a module that
  names the root explicitly (``import tokenreduce as tr``) has an edge to it like any other.

Not edges: imports under ``if TYPE_CHECKING:`` (never run).

The rule for imports of package modules inside functions: only where the module imported needs an optional
extra (it, or a package module it imports at module level, imports a distribution that only
``[project.optional-dependencies]`` require: ``faiss``, ``trl``, ``datasets``, ``triton``...), so that
``import tokenreduce`` needs only the core dependencies; or where start-up time asks for it (the CLI,
``START_UP``, loads a subcommand's modules when the subcommand runs). Every other one stands at module
level or is listed in ``DEFERRED`` with its reason. Imports of other distributions inside functions are
not checked (they are how the optional extras stay optional).

Between methods: a method (a folder of ``tokenreduce.plugins``, or a module of ``plugins/baselines``) imports
another only through its public ``__init__``; what methods share lives in ``tokenreduce.ops``. The
foundations (core, adapters, kernels, ops) import no method.

Outside the package: no module may import a first-party name that is not part of the wheel, i.e. any
top-level folder or ``.py`` file of the repository other than ``tokenreduce`` (``research``, ``tests``,
``benchmarks``, ``scripts``...): the installed package has none of them.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "tokenreduce"


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package)."""
    modules = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        modules[".".join(parts)] = (path, is_package)
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int, bool]]:
    """Every (absolute dotted target, line, inside a function) the module imports, skipping
    ``if TYPE_CHECKING:`` blocks."""
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub, in_function)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.extend((f"{target}.{alias.name}", child.lineno, in_function) for alias in child.names)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


@dataclass
class Graph:
    """What :func:`import_graph` reads from the package's source."""

    edges: dict[str, set[str]]  # every edge (module level and inside functions)
    eager: dict[str, set[str]]  # module-level edges only
    deferred: list[tuple[str, str, str]]  # (importer, package module, "file:line") inside functions
    third_party: dict[str, set[str]]  # module -> top-level names of other distributions it imports at module level
    outside: list[str]  # imports of first-party names the wheel does not ship
    direct: list[tuple[str, str, str]]  # (importer, package module it names, "file:line"), implicit parents left out


def import_graph() -> Graph:
    """The package's import graph (see the module docstring for what is an edge)."""
    modules = _modules()
    outside_names = {p.stem if p.suffix == ".py" else p.name for p in ROOT.iterdir()
                     if (p.is_dir() or p.suffix == ".py") and not p.name.startswith(".") and p.name != PACKAGE}
    graph = Graph({m: set() for m in modules}, {m: set() for m in modules}, [], {m: set() for m in modules}, [], [])
    for module, (path, is_package) in modules.items():
        for target, line, in_function in _imports(ast.parse(path.read_text(), str(path)), module, is_package):
            top = target.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{line}"
            if top in outside_names:
                graph.outside.append(f"{where} imports {target}")
            if top != PACKAGE:
                if not in_function and top not in sys.stdlib_module_names:
                    graph.third_party[module].add(top)
                continue
            # `from pkg import name`: the submodule when `name` is one, else the package itself.
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target not in modules:
                continue
            if target != module:
                graph.direct.append((module, target, where))
            parts = target.split(".")
            implicit = {".".join(parts[:i]) for i in range(2, len(parts))}
            # The importer's own packages are already running when it runs.
            nodes = {target} | {p for p in implicit if not module.startswith(p + ".")}
            nodes.discard(module)
            graph.edges[module] |= nodes
            if in_function:
                if target != module:
                    graph.deferred.append((module, target, where))
            else:
                graph.eager[module] |= nodes
    graph.outside = sorted(set(graph.outside))
    return graph


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def connect(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return found


def test_no_import_cycle_between_package_modules():
    found = cycles(import_graph().edges)
    assert not found, "import cycles (each line: modules that import each other):\n" + "\n".join(
        f"{len(c)}: {', '.join(c)}" for c in found
    )


def test_no_package_module_imports_from_outside_the_package():
    outside = import_graph().outside
    assert not outside, "the wheel ships none of these:\n" + "\n".join(outside)


def test_the_graph_reader_sees_cycles_and_edges():
    """The checks above can fail: a two-module cycle, a lazy edge and a parent-package edge are found."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "from .sibling import thing\n"
        "if TYPE_CHECKING:\n    from tokenreduce.never import x\n"
        "def f():\n    import tokenreduce.core.api\n"
    )
    found = {t: deferred for t, _, deferred in _imports(tree, "tokenreduce.eval.runner", is_package=False)}
    targets = list(found)
    assert "tokenreduce.eval.sibling.thing" in targets and "tokenreduce.core.api" in targets
    assert not any("never" in t for t in targets)
    assert found["tokenreduce.core.api"] and not found["tokenreduce.eval.sibling.thing"]
    edges = import_graph().edges
    assert "tokenreduce.core.registry" in edges["tokenreduce.core.api"]
    # Importing `tokenreduce.eval.tasks.synthetic` runs the `tokenreduce.eval.tasks` package first.
    assert {"tokenreduce.eval.tasks.synthetic", "tokenreduce.eval.tasks"} <= edges["tokenreduce.eval.demo"]


def test_registry_is_a_leaf():
    """Methods import the registry to register; the registry imports no module of the package."""
    edges = import_graph().edges
    assert edges["tokenreduce.core.registry"] == set(), sorted(edges["tokenreduce.core.registry"])


METHODS = "tokenreduce.plugins"
# Folders of METHODS holding one method per module; every other folder of METHODS is one method.
ONE_METHOD_PER_MODULE = {"tokenreduce.plugins.baselines"}
# What methods are built on: none of these imports a method.
FOUNDATIONS = ("tokenreduce.core", "tokenreduce.adapters", "tokenreduce.kernels", "tokenreduce.ops")


def method_of(module: str) -> str | None:
    """The method a module belongs to: its folder under ``tokenreduce.plugins`` (a package), or its own
    module inside a folder of one method per module; None outside methods (a folder's ``__init__`` that
    only gathers its methods included)."""
    parts = module.split(".")
    if len(parts) < 3 or ".".join(parts[:2]) != METHODS:
        return None
    folder = ".".join(parts[:3])
    if folder in ONE_METHOD_PER_MODULE:
        return ".".join(parts[:4]) if len(parts) > 3 else None
    return folder


def cross_method_imports(direct: list[tuple[str, str, str]], packages: set[str]) -> list[str]:
    """Imports by one method of another method's modules other than its public package ``__init__``
    (a ``_``-prefixed module, a module of its folder, or a method that is a single module)."""
    found = []
    for importer, target, where in direct:
        mine, theirs = method_of(importer), method_of(target)
        if mine is None or theirs is None or mine == theirs:
            continue
        if target == theirs and target in packages:
            continue  # the method's public __init__
        found.append(f"{where}: {importer} imports {target}, a module of another method")
    return sorted(set(found))


def test_no_method_imports_another_methods_modules():
    """Shared pieces live in ``tokenreduce.ops``; a method reaches another only through its public
    ``__init__``."""
    packages = {m for m, (_, is_package) in _modules().items() if is_package}
    found = cross_method_imports(import_graph().direct, packages)
    assert not found, "move what is shared to tokenreduce.ops:\n" + "\n".join(found)


def test_foundations_import_no_method():
    """The registry, the core, the adapters, the kernels and ops import no method: methods build on them."""
    found = sorted({f"{where}: {importer} imports {target}" for importer, target, where in import_graph().direct
                    if importer.startswith(FOUNDATIONS) and target.startswith(METHODS)})
    assert not found, "\n".join(found)


def test_the_cross_method_rule_can_fail():
    """Each kind of import the rule refuses is found; what it allows is not."""
    packages = {"tokenreduce.plugins.atp", "tokenreduce.plugins.baselines", "tokenreduce.plugins.langdc"}
    direct = [
        ("tokenreduce.plugins.atp.method", "tokenreduce.plugins.baselines._llm", "a.py:1"),  # private module
        ("tokenreduce.plugins.langdc.method", "tokenreduce.plugins.baselines.pool", "b.py:2"),  # a single-module method
        ("tokenreduce.plugins.langdc.method", "tokenreduce.plugins.atp.heads", "c.py:3"),  # a module of a method folder
        ("tokenreduce.plugins.baselines.fastv", "tokenreduce.plugins.baselines._llm", "d.py:4"),  # a sibling's private
        ("tokenreduce.plugins.langdc.method", "tokenreduce.plugins.atp", "ok.py:1"),  # a public __init__
        ("tokenreduce.plugins.langdc.training", "tokenreduce.plugins.langdc.method", "ok.py:2"),  # its own folder
        ("tokenreduce.plugins.baselines", "tokenreduce.plugins.baselines.pool", "ok.py:3"),  # the gathering __init__
        ("tokenreduce.eval.bench", "tokenreduce.plugins.baselines.pdrop", "ok.py:4"),  # not a method
        ("tokenreduce.plugins.atp.method", "tokenreduce.ops.llm", "ok.py:5"),  # ops
    ]
    found = cross_method_imports(direct, packages)
    assert [f.split(":")[0] for f in found] == ["a.py", "b.py", "c.py", "d.py"], found


# Imports inside functions kept for a reason other than an optional extra or the CLI's start-up.
DEFERRED: dict[tuple[str, str], str] = {}
START_UP = {"tokenreduce.cli"}  # loads a subcommand's modules when the subcommand runs


def _extra_import_names() -> set[str]:
    """Top-level import names of the installed distributions that only the optional extras require."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        found = (re.match(r"[A-Za-z0-9._-]+", r) for r in requirements)
        return {re.sub(r"[-_.]+", "-", m.group(0)).lower() for m in found if m}

    core = names(project["dependencies"]) | {"tokenreduce"}
    extras = set().union(*(names(reqs) for extra, reqs in project["optional-dependencies"].items() if extra != "dev"))
    extras -= core
    return {top for top, dists in importlib.metadata.packages_distributions().items()
            if any(re.sub(r"[-_.]+", "-", d).lower() in extras for d in dists)}


def test_imports_inside_functions_are_for_extras_or_start_up():
    """A package module imported inside a function must need an optional extra (itself or through its
    module-level imports), or be imported by the CLI, or be listed in DEFERRED with its reason."""
    graph = import_graph()
    extras = _extra_import_names()
    assert {"faiss", "trl", "datasets", "triton"} & extras, "the optional extras are not installed"
    memo: dict[str, bool] = {}

    def needs_extra(module: str) -> bool:
        if module not in memo:
            memo[module] = False  # the module-level graph has no cycle (the test above)
            memo[module] = bool(graph.third_party[module] & extras) or any(needs_extra(m) for m in graph.eager[module])
        return memo[module]

    unjustified = [f"{where}: {importer} imports {target} inside a function"
                   for importer, target, where in graph.deferred
                   if importer not in START_UP and (importer, target) not in DEFERRED and not needs_extra(target)]
    assert not unjustified, "import these at module level (or add the reason to DEFERRED):\n" + "\n".join(unjustified)
