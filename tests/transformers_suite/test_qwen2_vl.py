"""transformers' ModelTesterMixin on Qwen2-VL: plain, and wrapped at keep-all with every method (see suite.py)."""

import unittest

from transformers import Qwen2VLForConditionalGeneration

from .suite import PlainSuite, WrappedSuite, methods_for


class TestQwen2VLPlain(PlainSuite, unittest.TestCase):
    family = "qwen2_vl"
    all_model_classes = (Qwen2VLForConditionalGeneration,)


for _method in methods_for("qwen2_vl"):
    _name = f"TestQwen2VL_{_method}"
    globals()[_name] = type(_name, (WrappedSuite, unittest.TestCase), {
        "family": "qwen2_vl", "method": _method, "all_model_classes": (Qwen2VLForConditionalGeneration,)})
