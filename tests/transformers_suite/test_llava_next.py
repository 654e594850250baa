"""transformers' ModelTesterMixin on LlavaNext: plain, and wrapped at keep-all with every method (see suite.py)."""

import unittest

from transformers import LlavaNextForConditionalGeneration

from .suite import PlainSuite, WrappedSuite, methods_for


class TestLlavaNextPlain(PlainSuite, unittest.TestCase):
    family = "llava_next"
    all_model_classes = (LlavaNextForConditionalGeneration,)


for _method in methods_for("llava_next"):
    _name = f"TestLlavaNext_{_method}"
    globals()[_name] = type(_name, (WrappedSuite, unittest.TestCase), {
        "family": "llava_next", "method": _method, "all_model_classes": (LlavaNextForConditionalGeneration,)})
