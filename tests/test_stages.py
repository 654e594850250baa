"""A method's stage is its base class; adapters declare the stages they run; wrap refuses the others."""

import dataclasses

import pytest
import torch

import tokenreduce as tr
from tokenreduce.adapters import TowerAdapter, adapter_class, get_adapter, list_adapters
from tokenreduce.core import registry
from tokenreduce.core.api import get_handle
from tokenreduce.core.config import MethodConfig
from tokenreduce.core.reduction import (
    STAGE_CLASSES,
    DecodeMethod,
    LLMMethod,
    Method,
    ProjectorMethod,
    ReduceContext,
    Reduction,
    VisionMethod,
)
from tokenreduce.core.registry import STAGES, method_specs, register_method
from tokenreduce.testing.tiny import FAMILIES, tiny_model


@dataclasses.dataclass
class _Config(MethodConfig):
    """Options of the test methods (none of their own)."""


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made by a test are forgotten after it."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))


@pytest.mark.parametrize("spec", method_specs(), ids=lambda s: s.name)
def test_every_method_derives_from_the_class_of_each_of_its_stages(spec):
    assert spec.stages == spec.method_cls.stages
    for stage in spec.stages:
        assert issubclass(spec.method_cls, STAGE_CLASSES[stage]), (spec.name, stage)


def test_built_in_stages():
    """The stages the methods act in, as documented (README's method table)."""
    stages = {s.name: s.stages for s in method_specs()}
    assert stages["pool"] == ("projector",) and stages["tome_projector"] == ("projector",)
    assert stages["tome"] == ("vision",)  # merges inside the tower: its output is already reduced
    assert stages["visionzip"] == stages["prumerge"] == stages["doc_correlation"] == ("vision", "projector")
    assert stages["fastv"] == stages["pdrop"] == stages["dart"] == stages["atp"] == ("llm",)
    assert stages["ares"] == ("decode",)


def test_registration_takes_the_stages_from_the_class(scratch_registry):
    class Head(ProjectorMethod):
        """Keeps the first token."""

        def reduce(self, features, context):
            return Reduction.keep(torch.zeros(1, dtype=torch.long))

    register_method("test_head", config_cls=_Config)(Head)
    assert registry.get_method("test_head").stages == ("projector",)
    assert "test_head" in tr.list_methods(stage="projector")

    class Merging(VisionMethod):
        """Merges inside the tower."""

        changes_encoder_output = True

    assert Merging.stages == ("vision",) and VisionMethod.stages == ("vision", "projector")


def test_registration_refuses_a_class_of_no_stage_or_other_stages(scratch_registry):
    class Plain(Method):
        """Derives from the bare base."""

    with pytest.raises(TypeError, match=r"method 'test_plain': class .*Plain must derive from a stage class .*"
                                        r"\(VisionMethod, ProjectorMethod, LLMMethod or DecodeMethod\)"):
        register_method("test_plain", config_cls=_Config)(Plain)
    with pytest.raises(TypeError, match="must derive from a stage class"):
        register_method("test_other", config_cls=_Config)(type("Other", (), {}))

    class Dropping(LLMMethod):
        """Acts inside the LLM."""

    with pytest.raises(ValueError, match=r"method 'test_llm': `stages`=\('projector',\) differs from the stages of "
                                         r"its class .*Dropping, \('llm',\)"):
        register_method("test_llm", config_cls=_Config, stages="projector")(Dropping)
    assert "test_plain" not in registry._METHODS and "test_llm" not in registry._METHODS
    register_method("test_llm", config_cls=_Config, stages="llm")(Dropping)  # saying the same is accepted
    assert registry.get_method("test_llm").stages == ("llm",)


def test_the_core_reads_declared_attributes_and_hooks():
    """What the core asks every method is declared on the base with a "no" default; each stage class
    declares its hooks, documented, and an unimplemented hook names the class."""
    assert Method.vision_layer is None and Method.changes_encoder_output is False and Method.uses_text is False
    hooks = {ProjectorMethod: ("reduce",), VisionMethod: ("reduce", "tower_signals"),
             LLMMethod: ("llm_layers", "select"), DecodeMethod: ("generation_hooks", "after_generate")}
    for cls, names in hooks.items():
        assert cls.__doc__
        for name in names:
            assert getattr(cls, name).__doc__, f"{cls.__name__}.{name}"

    class Unfinished(ProjectorMethod):
        """Has no reduce."""

    layout_ctx = ReduceContext(layout=None, modality="image", row=0, item=0)
    with pytest.raises(NotImplementedError, match="Unfinished must implement `reduce`"):
        Unfinished(_Config()).reduce(torch.zeros(2, 4), layout_ctx)


def test_every_adapter_declares_its_stages():
    for family in list_adapters():
        if family in ("hf_vision_tower", "timm_vit", "open_clip_vit"):
            continue
        stages = adapter_class(family).stages
        assert stages and set(stages) <= set(STAGES), family
        assert {"projector", "decode"} <= set(stages), family  # every VLM family runs these
    assert TowerAdapter.stages == ("vision",)


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_stage_is_declared_where_the_tower_is_supported(family):
    adapter = get_adapter(tiny_model(family))
    assert ("vision" in adapter.stages) == (adapter.tower is not None)


def test_wrap_refuses_a_method_whose_stage_the_family_does_not_run(scratch_registry):
    class Signals(VisionMethod):
        """Reads the tower at its last layer (every family)."""

        vision_layer = -1

    register_method("test_signals", config_cls=_Config)(Signals)
    model = tiny_model("qwen2_vl")
    with pytest.raises(TypeError, match=r"^method 'test_signals' acts in the vision stage, which model family "
                                        r"'qwen2_vl' does not support; it supports: projector, llm, decode$"):
        tr.wrap(model, "test_signals")
    assert get_handle(model) is None
