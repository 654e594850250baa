"""One rule for inputs a method cannot act on, for every registered method (docs/usage.md, "Inputs a method cannot
act on"): the input passes through (or the budget is clamped to what there is), ``tr.stats`` says so under
``"notes"``, and one warning per kind is given per wrapped model.
"""

import warnings

import pytest
import torch

import tokenreduce as tr
from tokenreduce.core.registry import method_specs
from tokenreduce.testing.tiny import default_rows, tiny_batch, tiny_model

from .tables import NEEDS_TRAINED_WEIGHTS, runs_on

COUNT_CHANGING = {"vision", "projector", "llm"}
HUGE = 10**6


def _on_llava(spec):
    return spec.name not in NEEDS_TRAINED_WEIGHTS and runs_on(spec, "llava")


# Methods that do not reduce images, on an image model.
NO_IMAGES = [s.name for s in method_specs() if COUNT_CHANGING & set(s.stages) and "image" not in s.modalities
             and _on_llava(s)]


def _accepts_count(spec):
    try:
        spec.config_cls(keep=HUGE)
    except (TypeError, ValueError):
        return False
    return True


# Methods whose `keep` may be a token count.
COUNTS = [s.name for s in method_specs() if COUNT_CHANGING & set(s.stages) and "image" in s.modalities
          and _on_llava(s) and _accepts_count(s)]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llava")


def _calls(model, batch, n=2):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            outs = [model(**batch).logits for _ in range(n)]
    return outs, [str(w.message) for w in caught if "tokenreduce" in str(w.message)]


def _notes(samples):
    return [n for s in samples for n in s.extra.get("notes", []) + [m for it in s.items for m in it.info.get("notes", [])]]


def test_the_tables_are_not_empty():
    assert NO_IMAGES and "pool" in COUNTS and "fastv" in COUNTS


@pytest.mark.parametrize("method", NO_IMAGES)
def test_images_pass_through_a_video_method_with_one_warning(model, method):
    batch = tiny_batch(model, default_rows("llava", n=2))
    with torch.no_grad():
        plain = model(**batch).logits
    tr.wrap(model, method)
    try:
        (first, second), messages = _calls(model, batch)
        torch.testing.assert_close(second, first, atol=0, rtol=0)
        samples = tr.stats(model).last
    finally:
        tr.unwrap(model)
    assert len(messages) == 1 and f"method {method!r} does not reduce images" in messages[0]
    torch.testing.assert_close(first, plain, atol=0, rtol=0)
    assert all(s.visual_tokens_out == s.visual_tokens_in for s in samples)
    assert len(_notes(samples)) == 2  # one per image of the last call


@pytest.mark.parametrize("method", COUNTS)
def test_keep_above_the_token_count_keeps_all_with_one_warning(model, method):
    batch = tiny_batch(model, default_rows("llava", n=2))
    tr.wrap(model, method, keep=HUGE)
    try:
        _, messages = _calls(model, batch)
        samples = tr.stats(model).last
    finally:
        tr.unwrap(model)
    assert len(messages) == 1 and f"`keep`={HUGE} is more than the" in messages[0]
    assert len(_notes(samples)) == 2 and all(f"`keep`={HUGE}" in n for n in _notes(samples))


def test_keep_within_the_count_says_nothing(model):
    batch = tiny_batch(model, default_rows("llava", n=2))
    for method in ("pool", "fastv"):
        tr.wrap(model, method, keep=4)
        try:
            _, messages = _calls(model, batch, n=1)
            assert messages == [] and _notes(tr.stats(model).last) == []
        finally:
            tr.unwrap(model)
