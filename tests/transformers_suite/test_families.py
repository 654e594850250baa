"""transformers' ModelTesterMixin on each family: plain, and wrapped at keep-all with every method of the
family (see suite.py). One test class per (family, method), named ``Test<Family>Plain`` / ``Test<Family>_<method>``;
every adapter family is here or in ``WITHOUT_MIXIN`` with the reason."""

import unittest

from transformers import (
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)

from tokenreduce.adapters import TOWER_ADAPTERS, list_adapters

from .suite import PlainSuite, WrappedSuite, methods_for

FAMILIES = {
    "llava": ("Llava", LlavaForConditionalGeneration),
    "llava_next": ("LlavaNext", LlavaNextForConditionalGeneration),
    "llava_next_video": ("LlavaNextVideo", LlavaNextVideoForConditionalGeneration),
    "llava_onevision": ("LlavaOnevision", LlavaOnevisionForConditionalGeneration),
    "qwen2_vl": ("Qwen2VL", Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": ("Qwen2_5_VL", Qwen2_5_VLForConditionalGeneration),
}

# Families the mixin cannot run on, with the reason (their own tests cover the entry points).
WITHOUT_MIXIN = {
    "docowl": "mPLUG-DocOwl is remote code: transformers has no model class, config tester or model tests for it "
              "(tests/doc_correlation/test_docowl.py and tests/test_plain_inputs.py cover it)",
}


def test_every_family_runs_the_mixin_or_says_why_not():
    """Adding an adapter puts its family here: a tester entry in FAMILIES, or a reason in WITHOUT_MIXIN."""
    families = set(list_adapters()) - set(TOWER_ADAPTERS.values())
    assert families == set(FAMILIES) | set(WITHOUT_MIXIN)
    assert not set(FAMILIES) & set(WITHOUT_MIXIN)


for _family, (_prefix, _cls) in FAMILIES.items():
    _common = {"family": _family, "all_model_classes": (_cls,)}
    globals()[f"Test{_prefix}Plain"] = type(f"Test{_prefix}Plain", (PlainSuite, unittest.TestCase), dict(_common))
    for _method in methods_for(_family):
        _name = f"Test{_prefix}_{_method}"
        globals()[_name] = type(_name, (WrappedSuite, unittest.TestCase), {**_common, "method": _method})
