"""What the hot path records without waiting for the device: text counts read when the stats are read, the
last call's rows without a scan, the same reduced inputs whether or not the caller passes a mask."""

from __future__ import annotations

import functools

import pytest
import torch

import tokenreduce as tr
from tokenreduce.core.registry import get_method
from tokenreduce.testing.tiny import IMAGE_TOKEN, default_rows, tiny_batch, tiny_model


@functools.cache
def _model(family: str = "llava"):
    return tiny_model(family, num_layers=4)


@pytest.mark.parametrize("method", ["pool", "fastv"])
@pytest.mark.parametrize("pad", [0, 3])
def test_one_row_text_count_is_read_when_the_stats_are(method, pad):
    """One row: the text count (real tokens but placeholders) is computed from the mask only when read."""
    model = _model()
    batch = tiny_batch(model, default_rows("llava", n=1))
    ids, mask = batch["input_ids"], batch["attention_mask"].clone()
    mask[:, :pad] = 0  # left padding the processor would have added
    batch["attention_mask"] = mask
    expected = int(mask.sum()) - int((ids == IMAGE_TOKEN).sum())
    tr.wrap(model, method, keep=0.25)
    try:
        with torch.no_grad():
            model(**batch)
        sample = tr.stats(model).last[0]
        assert not isinstance(sample.text_count, int)  # recorded lazily
        assert sample.text_tokens == expected
        assert sample.to_dict()["text_tokens"] == expected
    finally:
        tr.unwrap(model)


def test_one_row_without_a_mask_counts_text_from_shapes():
    model = _model()
    batch = tiny_batch(model, default_rows("llava", n=1))
    batch.pop("attention_mask")
    ids = batch["input_ids"]
    tr.wrap(model, "pool", keep=0.25)
    try:
        with torch.no_grad():
            model(**batch)
        sample = tr.stats(model).last[0]
        assert sample.text_count == ids.shape[1] - int((ids == IMAGE_TOKEN).sum())
    finally:
        tr.unwrap(model)


def test_last_rows_are_the_last_calls_after_many_calls():
    model = _model()
    one = tiny_batch(model, default_rows("llava", n=1))
    three = tiny_batch(model, default_rows("llava", n=3))
    tr.wrap(model, "pool", keep=0.25)
    try:
        stats = tr.stats(model)
        with torch.no_grad():
            for batch in (one, three, one, three):
                model(**batch)
        last = stats.last
        assert [s.row for s in last] == [0, 1, 2]
        assert all(s.call == stats.calls == 4 for s in last)
        assert last == [s for s in stats.samples if s.call == 4]
        stats.samples.pop()  # edited by hand: still the rows of the last call that remain
        assert [s.row for s in stats.last] == [0, 1]
        stats.reset()
        assert stats.last == []
    finally:
        tr.unwrap(model)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("method", ["pool", "pdrop"])
def test_a_mask_of_ones_and_no_mask_give_the_same_logits(family, method):
    """One row: without a mask the in-LLM stage builds its layers' masks from no 2-D mask (once per length),
    with one it gathers them from the previous layers'; the outputs agree."""
    model = _model(family)
    batch = tiny_batch(model, default_rows(family, n=1))
    bare = {k: v for k, v in batch.items() if k != "attention_mask"}
    tr.wrap(model, get_method(method).config_cls.at_budget(0.5, num_layers=4))
    try:
        with torch.no_grad():
            masked = model(**batch).logits
            unmasked = model(**bare).logits
            again = model(**bare).logits  # the cached mask
    finally:
        tr.unwrap(model)
    torch.testing.assert_close(unmasked, masked)
    torch.testing.assert_close(again, unmasked)
