"""The package's import graph: no cycles between its modules, nothing imported from outside it.

The graph is read from the source with ``ast`` (nothing is imported). Its nodes are the modules of
``tokenreduce`` (a package is its ``__init__.py``). An edge goes from a module to every package module it
imports, wherever the import statement stands:

* at module level;
* inside a function or method. Such imports are for optional extras (a module that needs ``triton``,
  ``faiss``, ``trl``, ``datasets``... is imported where it is used, so ``import tokenreduce`` needs only
  the core dependencies) and for start-up time (the CLI imports a subcommand's modules when the
  subcommand runs). They are edges like the others: an import deferred into a function delays a cycle,
  it does not remove it (the modules still need each other, and which one loads first decides what the
  other sees), so a cycle through one fails the test as well;
* ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``; ``import a.b`` and
  ``from . import c`` are resolved the same way;
* importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` first, so it is an edge to those
  packages as well (implicitly; not to the importer's own packages, which Python runs before it), except
  to the root ``tokenreduce/__init__.py``: the root is the public facade that
  imports the core and every built-in method, and Python runs it before any submodule; a module that
  names the root explicitly (``import tokenreduce as tr``) has an edge to it like any other.

Not edges: imports under ``if TYPE_CHECKING:`` (never run).

Outside the package: no module may import a first-party name that is not part of the wheel, i.e. any
top-level folder or ``.py`` file of the repository other than ``tokenreduce`` (``research``, ``tests``,
``benchmarks``, ``scripts``...): the installed package has none of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

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


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """Every (absolute dotted target, line) the module imports, skipping ``if TYPE_CHECKING:`` blocks."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.extend((f"{target}.{alias.name}", child.lineno) for alias in child.names)
            visit(child)

    visit(tree)
    return found


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """The package's edges and every import of a first-party name outside the package."""
    modules = _modules()
    outside_names = {p.stem if p.suffix == ".py" else p.name for p in ROOT.iterdir()
                     if (p.is_dir() or p.suffix == ".py") and not p.name.startswith(".") and p.name != PACKAGE}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    outside: list[str] = []
    for module, (path, is_package) in modules.items():
        for target, line in _imports(ast.parse(path.read_text(), str(path)), module, is_package):
            top = target.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{line}"
            if top in outside_names:
                outside.append(f"{where} imports {target}")
            if top != PACKAGE:
                continue
            # `from pkg import name`: the submodule when `name` is one, else the package itself.
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target not in modules:
                continue
            if target != module:
                edges[module].add(target)
            parts = target.split(".")
            for node in (".".join(parts[:i]) for i in range(2, len(parts))):
                if node != module and not module.startswith(node + "."):  # the importer's own packages run first
                    edges[module].add(node)
    return edges, sorted(set(outside))


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
    edges, _ = import_graph()
    found = cycles(edges)
    assert not found, "import cycles (each line: modules that import each other):\n" + "\n".join(
        f"{len(c)}: {', '.join(c)}" for c in found
    )


def test_no_package_module_imports_from_outside_the_package():
    _, outside = import_graph()
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
    targets = [t for t, _ in _imports(tree, "tokenreduce.eval.runner", is_package=False)]
    assert "tokenreduce.eval.sibling.thing" in targets and "tokenreduce.core.api" in targets
    assert not any("never" in t for t in targets)
    edges, _ = import_graph()
    assert "tokenreduce.core.registry" in edges["tokenreduce.core.api"]
    # Importing `tokenreduce.eval.tasks.synthetic` runs the `tokenreduce.eval.tasks` package first.
    assert {"tokenreduce.eval.tasks.synthetic", "tokenreduce.eval.tasks"} <= edges["tokenreduce.eval.demo"]


def test_registry_is_a_leaf():
    """Methods import the registry to register; the registry imports no module of the package."""
    edges, _ = import_graph()
    assert edges["tokenreduce.core.registry"] == set(), sorted(edges["tokenreduce.core.registry"])
