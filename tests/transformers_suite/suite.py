"""transformers' own ``ModelTesterMixin`` (``tests/test_modeling_common.py`` of the installed version's
source distribution, fetched by ``make test``'s set-up into ``.transformers-tests/``) on tiny models of
each family: once plain, once wrapped at keep-all with every registered method that supports the family.

A family's model tester builds the config and inputs the way transformers' ``tests/models/<family>``
testers do (a batch of equal rows, each one image's placeholders then text, full attention mask), from the
project's tiny configs with two decoder layers (the mixin's limit) and low placeholder ids (the mixin's
embedding-resize tests clamp ids to a smaller vocabulary). The wrapped suites wrap every model the mixin
builds, at ``post_init`` of the family's class, so that ``from_pretrained``, copies and re-built models
are wrapped too.
"""

from __future__ import annotations

import copy
import os
import re
import sys
import unittest
from pathlib import Path

import pytest
import torch

import tokenreduce as tr
from tokenreduce.core.api import get_handle
from tokenreduce.core.registry import get_method, method_specs
from tokenreduce.testing.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[2] / ".transformers-tests"
if not (ROOT / "hf_tests" / "test_modeling_common.py").exists():
    pytest.skip(f"transformers' model tests are not in {ROOT} (`make test`'s set-up downloads them from the package "
                "index: python scripts/transformers_tests.py .transformers-tests)", allow_module_level=True)
pytest.importorskip("parameterized", reason="transformers' model tests need `parameterized` (the dev extra)")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hf_tests.test_modeling_common import ModelTesterMixin  # noqa: E402

IMAGE, VIDEO, START, END = 4, 5, 6, 7  # low ids: they survive the mixin's shrinking of the vocabulary
FIRST_TEXT = 8
# Methods that need trained weights the tiny models do not have.
NEEDS_TRAINED_WEIGHTS = {"langdc"}


class VLMTester:
    """Config and inputs of one family for the mixin (the attributes it reads: sizes, layers, inputs)."""

    batch_size = 3
    is_training = True
    num_hidden_layers = 2

    def __init__(self, parent: unittest.TestCase, family: str):
        self.parent = parent
        self.family = family
        config = self.get_config()
        image_size = getattr(config.vision_config, "image_size", 56)  # one crop of the tower's size
        text = config.get_text_config()
        self.text_config = text.to_dict()
        self.vision_config = config.vision_config.to_dict()
        self.hidden_size = text.hidden_size
        self.num_attention_heads = text.num_attention_heads
        self.vocab_size = text.vocab_size
        self.image_size = image_size
        self.pixel_values, self.extra, self.num_image_tokens = self._pixels(config)
        self.text_length = 6
        self.seq_length = self.num_image_tokens + self.text_length + (2 if self.qwen else 0)
        self.encoder_seq_length = self.seq_length

    @property
    def qwen(self) -> bool:
        return self.family in ("qwen2_vl", "qwen2_5_vl")

    def get_config(self):
        config = tiny_config(self.family, attn_implementation="sdpa", num_layers=self.num_hidden_layers)
        config._attn_implementation_internal = None  # the mixin chooses implementations itself
        for sub in ("text_config", "vision_config"):
            getattr(config, sub)._attn_implementation_internal = None
        ids = {"image_token_id": IMAGE, "image_token_index": IMAGE, "video_token_id": VIDEO,
               "video_token_index": VIDEO, "vision_start_token_id": START, "vision_end_token_id": END}
        for name, value in ids.items():
            if hasattr(config, name):
                setattr(config, name, value)
        return config

    def _pixels(self, config):
        gen = torch.Generator().manual_seed(0)
        if self.qwen:
            side = self.image_size // 14
            grid = torch.tensor([[1, side, side]] * self.batch_size)
            pixels = torch.randn(self.batch_size * side * side, 3 * 2 * 14 * 14, generator=gen)
            merge = config.vision_config.spatial_merge_size
            return pixels, {"image_grid_thw": grid}, side * side // merge**2
        pixels = torch.randn(self.batch_size, 3, self.image_size, self.image_size, generator=gen)
        extra = {}
        if self.family != "llava":  # anyres families: one crop grid per image
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            crops = image_size_to_num_patches([self.image_size] * 2, config.image_grid_pinpoints, self.image_size)
            pixels = pixels[:, None].expand(-1, crops, -1, -1, -1).contiguous()
            extra = {"image_sizes": torch.tensor([[self.image_size] * 2] * self.batch_size)}
        from transformers import AutoModelForImageTextToText

        with torch.no_grad():
            model = AutoModelForImageTextToText.from_config(config).eval()
            features = model.model.get_image_features(pixel_values=pixels, **extra, return_dict=True).pooler_output
        first = features[0]
        return pixels, extra, int(first.reshape(-1, first.shape[-1]).shape[0])

    def prepare_config_and_inputs_for_common(self):
        gen = torch.Generator().manual_seed(1)
        config = self.get_config()
        text = torch.randint(FIRST_TEXT, self.vocab_size, (self.batch_size, self.text_length), generator=gen)
        image = torch.full((self.batch_size, self.num_image_tokens), IMAGE)
        if self.qwen:
            image = torch.cat([torch.full((self.batch_size, 1), START), image, torch.full((self.batch_size, 1), END)], 1)
        input_ids = torch.cat([image, text], 1)
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                  "pixel_values": self.pixel_values.clone(), **copy.deepcopy(self.extra)}
        if self.qwen:
            inputs["mm_token_type_ids"] = (input_ids == IMAGE).long()
        return config, inputs


def methods_for(family: str) -> list[str]:
    """Every registered method that reduces (before or inside the LLM) and supports ``family``."""
    return [s.name for s in method_specs()
            if {"vision", "projector", "llm"} & set(s.stages) and s.name not in NEEDS_TRAINED_WEIGHTS
            and (s.families is None or family in s.families)]


# Tests that fail on the PLAIN model with these testers: skipped in every suite, plain and wrapped, so that
# a failure in `make test` always means a wrapped model lost something the plain one has.
FAILS_ON_PLAIN = {
    "test_bc_cache_name_forward": "expects a deprecation warning transformers gives once per process: "
                                  "fails whenever another test warned first",
    "test_can_capture_specific_layers_hidden_states": "LLaVA (vision_feature_layer=-1): the captured vision "
                                                      "layer outputs are None on the plain model",
    "test_training_gradient_checkpointing": "LLaVA's last vision layer gets no gradient (vision_feature_layer=-1); "
                                            "transformers' own LLaVA tests skip it too",
    "test_training_gradient_checkpointing_use_reentrant_false": "as test_training_gradient_checkpointing",
    "test_training_gradient_checkpointing_use_reentrant_true": "as test_training_gradient_checkpointing",
    "test_get_image_features_output_0": "LLaVA-NeXT / OneVision: the tower sees every crop (batch x crops rows); "
                                        "the test expects one row per image",
    "test_get_image_features_output_2": "as test_get_image_features_output_0",
    "test_get_video_features_output_0": "the testers give images only (video paths: the project's own tests)",
    "test_get_video_features_output_1": "as test_get_video_features_output_0",
    "test_get_video_features_output_2": "as test_get_video_features_output_0",
}

# Every method runs the whole mixin when this is set; by default (`make test`) see `WrappedSuite`.
FULL = os.environ.get("TOKENREDUCE_FULL_MIXIN") == "1"
# The tests every method runs: each feeds the model an input form or mode the plain model takes (embeddings,
# padding either side, eager vs SDPA in fp32, batches, training, saved and reloaded models, outputs of
# every layer).
FORWARD_SUBSET = re.compile(
    r"test_(inputs_embeds\w*|eager_matches_sdpa_inference_\d+_fp32\w*|left_padding_compatibility|"
    r"batching_equivalence|model_outputs_equivalence|determinism|save_load|training|attention_outputs|"
    r"hidden_states_output|retain_grad_hidden_states_attentions|torch_save_load|model_get_set_embeddings)$")


def representatives(family: str) -> set[str]:
    """The first method (registry order) of each set of stages: they share the core's code paths for the
    inputs the mixin gives (projector: the rebuilt sequence; llm: the decoder hooks; vision: the tower's)."""
    first: dict[tuple[str, ...], str] = {}
    for name in methods_for(family):
        first.setdefault(get_method(name).stages, name)
    return set(first.values())


class PlainSuite(ModelTesterMixin):
    """The mixin on the unwrapped model: the baseline every wrapped suite must match."""

    family: str = ""
    _is_composite = True
    test_torch_exportable = False  # exporting is the export mixin's (not in the sdist)
    # The generate tests (GenerationTesterMixin) are not in the sdist; the project's own tests cover generate.
    all_generative_model_classes = ()

    def setUp(self):
        reason = FAILS_ON_PLAIN.get(self._testMethodName)
        if reason is not None:
            self.skipTest(f"fails on the plain model: {reason}")
        self.model_tester = VLMTester(self, self.family)


class WrappedSuite(PlainSuite):
    """The mixin with every model the family's class builds wrapped at keep-all with ``method``.

    The whole mixin runs for one method per set of stages (:func:`representatives`); every other method
    runs :data:`FORWARD_SUBSET`, the tests that feed its own ``reduce`` / ``select`` code each input form
    (the rest exercise the core's paths the representative already ran, for minutes of CPU per method).
    """

    method: str = ""

    def setUp(self):
        super().setUp()
        if not (FULL or self.method in representatives(self.family) or FORWARD_SUBSET.match(self._testMethodName)):
            self.skipTest(f"{self.method!r} shares its stages' code paths with a method that runs the whole mixin; "
                          "it runs the input-form subset (TOKENREDUCE_FULL_MIXIN=1 runs everything)")
        cls = self.all_model_classes[0]
        original = cls.post_init
        config = get_method(self.method).config_cls.at_budget(1.0, num_layers=self.model_tester.num_hidden_layers)

        def post_init(model):
            original(model)
            if type(model) is cls and get_handle(model) is None:  # the mixin calls post_init again on a model
                tr.wrap(model, copy.deepcopy(config))

        cls.post_init = post_init
        self.addCleanup(setattr, cls, "post_init", original)
