"""Third-party methods register through the ``tokenreduce.methods`` entry-point group.

Each test writes a fake installed distribution into a temporary folder on ``sys.path`` (a ``*.dist-info``
folder with ``METADATA`` and ``entry_points.txt``, next to the plugin's module), so
``importlib.metadata`` finds it exactly as it finds a pip-installed package; nothing is installed.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

import tokenreduce as tr
from tokenreduce.core import registry
from tokenreduce.testing.tiny import default_rows, tiny_batch, tiny_model

PLUGIN_MODULE = '''
"""A method of another distribution: keeps the first `keep` visual tokens of each image."""

import dataclasses

import torch

from tokenreduce.core.config import MethodConfig, check_keep, resolve_keep
from tokenreduce.core.reduction import ProjectorMethod, Reduction
from tokenreduce.core.registry import register_method


@dataclasses.dataclass
class HeadConfig(MethodConfig):
    keep: int | float = 0.5

    def validate(self):
        check_keep("keep", self.keep)


@register_method("{name}", config_cls=HeadConfig, stages="projector", description="first tokens")
class HeadMethod(ProjectorMethod):
    def reduce(self, features, context):
        return Reduction.keep(torch.arange(resolve_keep(self.config.keep, features.shape[0])))
'''


def _fake_distribution(root: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[tokenreduce.methods]\n{lines}\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def fresh_registry(monkeypatch, tmp_path):
    """The registry as if no plugin had been loaded yet, restored afterwards; tmp_path on sys.path."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    monkeypatch.setattr(registry, "_PLUGIN_ERRORS", {})
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("fake_tr_plugin")]:
        del sys.modules[name]


def test_entry_point_registers_a_method_on_first_lookup(fresh_registry):
    _fake_distribution(
        fresh_registry, "fake-tr-plugin", {"head": "fake_tr_plugin_head"},
        {"fake_tr_plugin_head": PLUGIN_MODULE.format(name="head_tokens")},
    )
    assert "head_tokens" not in registry._METHODS  # nothing loads before the first lookup
    assert "head_tokens" in tr.list_methods()
    spec = registry.get_method("head_tokens")
    assert spec.stages == ("projector",) and spec.description == "first tokens"
    assert "pool" in tr.list_methods()  # the built-in methods are still there

    # The plugin's method wraps a model like a built-in one.
    model = tiny_model("llava")
    batch = tiny_batch(model, default_rows("llava"))
    tr.wrap(model, "head_tokens", keep=4)
    with torch.no_grad():
        model(**batch)
    samples = tr.stats(model).samples
    tr.unwrap(model)
    assert len(samples) == 3
    assert all(row.visual_tokens_in > 4 and row.visual_tokens_out == 4 for row in samples)


def test_entry_point_function_is_called_once(fresh_registry):
    _fake_distribution(
        fresh_registry, "fake-tr-plugin", {"fn": "fake_tr_plugin_fn:register"},
        {"fake_tr_plugin_fn": """
            CALLS = []

            def register():
                CALLS.append(1)
                import fake_tr_plugin_head  # noqa: F401
         """, "fake_tr_plugin_head": PLUGIN_MODULE.format(name="head_fn")},
    )
    registry.list_methods()
    registry.get_method("head_fn")
    registry.method_specs()
    assert sys.modules["fake_tr_plugin_fn"].CALLS == [1]


def test_broken_plugin_is_reported_by_name(fresh_registry):
    _fake_distribution(
        fresh_registry, "fake-tr-broken", {"broken": "fake_tr_plugin_broken", "good": "fake_tr_plugin_head"},
        {"fake_tr_plugin_broken": "raise ImportError('needs a package that is not installed')\n",
         "fake_tr_plugin_head": PLUGIN_MODULE.format(name="head_ok")},
    )
    with pytest.warns(RuntimeWarning, match=r"broken \(fake-tr-broken\).*needs a package that is not installed"):
        names = registry.list_methods()
    assert "head_ok" in names and "pool" in names  # the other plugins and the built-ins still load
    with pytest.raises(ValueError, match=r"unknown method 'broken'.*failed to load: broken \(fake-tr-broken\)"):
        registry.get_method("broken")


def test_plugin_reusing_a_builtin_name_is_reported(fresh_registry):
    _fake_distribution(
        fresh_registry, "fake-tr-clash", {"clash": "fake_tr_plugin_clash"},
        {"fake_tr_plugin_clash": PLUGIN_MODULE.format(name="pool")},
    )
    with pytest.warns(RuntimeWarning, match=r"clash \(fake-tr-clash\).*'pool' is already registered"):
        registry.list_methods()
    assert registry.get_method("pool").method_cls.__module__ == "tokenreduce.plugins.baselines.pool"
