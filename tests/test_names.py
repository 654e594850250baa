"""One name per model family: ``list_adapters()``, methods' ``families`` and adapters' ``name`` agree."""

import pytest

import tokenreduce as tr
from tokenreduce.adapters import adapter_class, family_name
from tokenreduce.core.api import _supports
from tokenreduce.core.registry import method_specs


def test_every_family_a_method_names_is_listed_by_list_adapters():
    listed = set(tr.list_adapters())
    for spec in method_specs():
        assert set(spec.families or ()) <= listed, (spec.name, sorted(set(spec.families) - listed))


def test_listed_vlm_families_are_their_adapters_names():
    towers = {"hf_vision_tower", "timm_vit", "open_clip_vit"}
    for family in set(tr.list_adapters()) - towers:
        assert adapter_class(family).name == family


def test_docowl_is_spelled_docowl_and_its_model_type_is_an_alias():
    assert "docowl" in tr.list_adapters() and "mplug_docowl" not in tr.list_adapters()
    assert adapter_class("mplug_docowl") is adapter_class("docowl")
    assert family_name("mplug_docowl") == "docowl" and family_name("llava") == "llava"
    # A method listing the model type (as an older config or plugin may) still supports the family.
    assert _supports(("llava", "mplug_docowl"), "docowl") and not _supports(("llava",), "docowl")


def test_unknown_family_error_names_the_value_and_the_families():
    with pytest.raises(TypeError, match=r"unsupported model type 'owl'; supported families: .*docowl"):
        adapter_class("owl")
