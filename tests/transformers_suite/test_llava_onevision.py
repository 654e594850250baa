"""transformers' ModelTesterMixin on LlavaOnevision: plain, and wrapped at keep-all with every method (see suite.py)."""

import unittest

from transformers import LlavaOnevisionForConditionalGeneration

from .suite import PlainSuite, WrappedSuite, methods_for


class TestLlavaOnevisionPlain(PlainSuite, unittest.TestCase):
    family = "llava_onevision"
    all_model_classes = (LlavaOnevisionForConditionalGeneration,)


for _method in methods_for("llava_onevision"):
    _name = f"TestLlavaOnevision_{_method}"
    globals()[_name] = type(_name, (WrappedSuite, unittest.TestCase), {
        "family": "llava_onevision", "method": _method, "all_model_classes": (LlavaOnevisionForConditionalGeneration,)})
