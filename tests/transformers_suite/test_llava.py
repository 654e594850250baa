"""transformers' ModelTesterMixin on LLaVA: plain, and wrapped at keep-all with every method (see suite.py)."""

import unittest

from transformers import LlavaForConditionalGeneration

from .suite import PlainSuite, WrappedSuite, methods_for


class TestLlavaPlain(PlainSuite, unittest.TestCase):
    family = "llava"
    all_model_classes = (LlavaForConditionalGeneration,)


for _method in methods_for("llava"):
    _name = f"TestLlava_{_method}"
    globals()[_name] = type(_name, (WrappedSuite, unittest.TestCase), {
        "family": "llava", "method": _method, "all_model_classes": (LlavaForConditionalGeneration,)})
