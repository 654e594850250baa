"""transformers' ModelTesterMixin on each family: plain, and wrapped at keep-all with every method of the
family (see suite.py). One test class per (family, method), named ``Test<Family>Plain`` / ``Test<Family>_<method>``."""

import unittest

from transformers import (
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)

from .suite import PlainSuite, WrappedSuite, methods_for

FAMILIES = {
    "llava": ("Llava", LlavaForConditionalGeneration),
    "llava_next": ("LlavaNext", LlavaNextForConditionalGeneration),
    "llava_onevision": ("LlavaOnevision", LlavaOnevisionForConditionalGeneration),
    "qwen2_vl": ("Qwen2VL", Qwen2VLForConditionalGeneration),
}

for _family, (_prefix, _cls) in FAMILIES.items():
    _common = {"family": _family, "all_model_classes": (_cls,)}
    globals()[f"Test{_prefix}Plain"] = type(f"Test{_prefix}Plain", (PlainSuite, unittest.TestCase), dict(_common))
    for _method in methods_for(_family):
        _name = f"Test{_prefix}_{_method}"
        globals()[_name] = type(_name, (WrappedSuite, unittest.TestCase), {**_common, "method": _method})
