"""``core/continuation.py`` on hand-written tensors: how a continuation is mapped onto the cached, reduced
prompt (ids, mask, positions, token types, ``generate``'s repeated rows), what is left on and read from a
cache, and each refusal in one exact line (issue #36: mutation testing of the core). Every expected tensor
is written out; ``tests/test_continuation.py`` checks the same path end to end against the unwrapped model.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from tokenreduce.core.continuation import (
    COLUMN_KEYS,
    PROMPT_ATTR,
    ReducedPrompt,
    cache_of,
    continued_inputs,
    forget,
    is_empty,
    prompt_of,
    refuse_foreign,
    remember,
)

PIXELS = ("pixel_values", "pixel_values_videos")
T = torch.tensor


def _cache(length: int, batch: int = 1) -> DynamicCache:
    cache = DynamicCache()
    if length:
        cache.update(torch.zeros(batch, 1, length, 2), torch.zeros(batch, 1, length, 2), 0)
    return cache


def _record(**prefix) -> ReducedPrompt:
    """A prompt of 4 ids ``[5, 6, 7, 8]`` per row (two rows), reduced to 3 LLM columns."""
    base = {"input_ids": T([[5, 9, 8], [0, 5, 9]]), "attention_mask": T([[1, 1, 1], [0, 1, 1]])}
    return ReducedPrompt(T([[5, 6, 7, 8], [0, 5, 6, 7]]), {**base, **prefix})


def test_a_continuation_reads_the_cached_prompt_then_the_new_columns():
    record = _record(position_ids=T([[0, 1, 3], [0, 0, 2]]))
    ids = T([[5, 6, 7, 8, 20, 21], [0, 5, 6, 7, 22, 23]])
    mask = T([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    inputs = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 2}
    out = continued_inputs(inputs, record, PIXELS)
    assert out["input_ids"].tolist() == [[5, 9, 8, 20, 21], [0, 5, 9, 22, 23]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    # positions count on from the prompt's last one, as generate's decode steps do
    assert out["position_ids"].tolist() == [[0, 1, 3, 4, 5], [0, 0, 2, 3, 4]]
    assert out["max_new_tokens"] == 2 and inputs["input_ids"] is ids  # the caller's dict is left alone
    assert "mm_token_type_ids" not in out and "token_type_ids" not in out


def test_padding_in_the_new_columns_does_not_advance_positions():
    record = _record(position_ids=T([[[0, 1, 3], [0, 0, 2]], [[0, 2, 3], [0, 0, 1]], [[0, 1, 1], [0, 0, 4]]]))
    ids = T([[5, 6, 7, 8, 20, 21, 24], [0, 5, 6, 7, 22, 23, 25]])
    mask = T([[1, 1, 1, 1, 0, 1, 1], [0, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    out = continued_inputs({"input_ids": ids, "attention_mask": mask}, record, PIXELS)
    assert out["attention_mask"].dtype == torch.long  # the prompt's dtype
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 1, 1], [0, 1, 1, 1, 1, 0]]
    # three M-RoPE axes, each from its own last position
    assert out["position_ids"].tolist() == [
        [[0, 1, 3, 3, 4, 5], [0, 0, 2, 3, 4, 4]],
        [[0, 2, 3, 3, 4, 5], [0, 0, 1, 2, 3, 3]],
        [[0, 1, 1, 1, 2, 3], [0, 0, 4, 5, 6, 6]],
    ]


def test_without_a_mask_every_new_column_counts():
    record = _record(position_ids=T([[0, 1, 3], [0, 0, 2]]))
    ids = T([[5, 6, 7, 8, 20], [0, 5, 6, 7, 22]])
    out = continued_inputs({"input_ids": ids}, record, PIXELS)
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert out["position_ids"].tolist() == [[0, 1, 3, 4], [0, 0, 2, 3]]


def test_generates_repeated_rows_repeat_each_prompt_row_in_place():
    record = _record(position_ids=T([[0, 1, 3], [0, 0, 2]]), mm_token_type_ids=T([[0, 1, 0], [0, 0, 1]]))
    prompt = [[5, 6, 7, 8], [5, 6, 7, 8], [0, 5, 6, 7], [0, 5, 6, 7]]  # num_return_sequences=2: a, a, b, b
    ids = T([[*row, 30 + r] for r, row in enumerate(prompt)])
    out = continued_inputs({"input_ids": ids}, record, PIXELS)
    assert out["input_ids"].tolist() == [[5, 9, 8, 30], [5, 9, 8, 31], [0, 5, 9, 32], [0, 5, 9, 33]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1]]
    assert out["position_ids"].tolist() == [[0, 1, 3, 4], [0, 1, 3, 4], [0, 0, 2, 3], [0, 0, 2, 3]]
    assert out["mm_token_type_ids"].tolist() == [[0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0]]
    with pytest.raises(ValueError, match=r"do not begin with the prompt"):  # a, b, a, b is another prompt
        continued_inputs({"input_ids": ids[[0, 2, 1, 3]]}, record, PIXELS)


def test_token_types_of_the_new_columns():
    record = _record(mm_token_type_ids=T([[0, 1, 0], [0, 0, 1]]), token_type_ids=T([[1, 1, 1], [1, 1, 1]]))
    ids = T([[5, 6, 7, 8, 20, 21], [0, 5, 6, 7, 22, 23]])
    given = T([[0, 1, 1, 0, 2, 3], [0, 0, 1, 1, 4, 5]])
    out = continued_inputs({"input_ids": ids, "mm_token_type_ids": given, "token_type_ids": given[:, :5]},
                           record, PIXELS)
    assert out["mm_token_type_ids"].tolist() == [[0, 1, 0, 2, 3], [0, 0, 1, 4, 5]]  # the caller's, after the prompt
    assert out["token_type_ids"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]  # a wrong length: zeros
    assert "position_ids" not in out  # the prompt had none: the model computes them
    bare = continued_inputs({"input_ids": ids}, record, PIXELS)
    assert bare["mm_token_type_ids"].tolist() == [[0, 1, 0, 0, 0], [0, 0, 1, 0, 0]]
    dropped = continued_inputs({"input_ids": ids, "token_type_ids": given}, _record(), PIXELS)
    assert "token_type_ids" not in dropped  # the LLM read no token types: the caller's do not apply


def test_an_unreduced_prompt_continues_as_given():
    record = ReducedPrompt(T([[5, 6]]), None)
    inputs = {"input_ids": T([[5, 6, 7]]), "attention_mask": T([[1, 1, 1]]), "pixel_values": None}
    out = continued_inputs(inputs, record, PIXELS)
    assert out == inputs and out is not inputs


@pytest.mark.parametrize("ids", [None, T([5, 6, 7, 8, 9]), T([[5, 6, 7]]), T([[5, 6, 7, 8, 9]] * 3)])
def test_ids_that_cannot_hold_the_conversation_are_refused(ids):
    shape = None if ids is None else tuple(ids.shape)
    with pytest.raises(ValueError) as err:
        continued_inputs({"input_ids": ids}, _record(), PIXELS)
    assert str(err.value) == (
        "`generate` continuing from `past_key_values` of a wrapped model needs `input_ids` holding the whole "
        f"conversation (the cached prompt of 2 x 4 ids, then the new ones), got input_ids of shape {shape}; "
        "pass the returned `sequences` followed by the new ids")


def test_other_continuations_are_refused_in_one_line():
    ids = T([[5, 6, 7, 8, 20], [0, 5, 6, 7, 22]])
    with pytest.raises(ValueError) as err:
        continued_inputs({"input_ids": ids}, ReducedPrompt(None, None), PIXELS)
    assert str(err.value) == (
        "`generate` cannot continue from `past_key_values` of a conversation begun from `inputs_embeds`: the "
        "cache does not know the prompt's ids; begin it with `input_ids`, or pass the whole conversation and no "
        "`past_key_values`")
    with pytest.raises(ValueError) as err:
        continued_inputs({"input_ids": ids, "pixel_values": torch.zeros(1), "pixel_values_videos": torch.zeros(1)},
                         _record(), PIXELS)
    assert str(err.value) == (
        "`generate` cannot add pixel values (pixel_values, pixel_values_videos) to a conversation continued from "
        "`past_key_values` of a wrapped model (its visual tokens are in the cache); pass the whole conversation "
        "with all its pixel values and no `past_key_values`")
    with pytest.raises(ValueError) as err:
        continued_inputs({"input_ids": T([[5, 6, 7, 9, 20], [0, 5, 6, 7, 22]])}, _record(), PIXELS)
    assert str(err.value) == (
        "`generate`: `input_ids` do not begin with the prompt the `past_key_values` were computed for (4 ids per "
        "row); continue from the returned `sequences`, or pass no `past_key_values`")
    with pytest.raises(ValueError) as err:
        continued_inputs({"input_ids": ids, "attention_mask": torch.ones(2, 6, dtype=torch.long)}, _record(), PIXELS)
    assert str(err.value) == (
        "`generate`: `attention_mask` has 6 columns for 5 `input_ids`; pass one mask column per id")
    # the conversation exactly as long as the prompt is accepted: nothing new to read
    out = continued_inputs({"input_ids": ids[:, :4]}, _record(), PIXELS)
    assert out["input_ids"].tolist() == [[5, 9, 8], [0, 5, 9]]


def test_what_a_cache_carries():
    assert is_empty(None) and is_empty(_cache(0)) and not is_empty(_cache(3))
    assert not is_empty(((torch.zeros(1),),))  # a legacy tuple: not known to be empty
    assert cache_of({"cache": 1, "past_key_values": 2}) == 1
    assert cache_of({"past_key_values": 2}) == 2 and cache_of({}) is None
    assert prompt_of(None) is None and prompt_of(_cache(0)) is None
    remember(None, T([[1]]), {}, True, None)  # nothing to leave a record on
    cache = _cache(3)
    deltas = T([[2], [3]])
    llm_inputs = {"input_ids": T([[1, 2]]), "attention_mask": T([[1, 1]]), "position_ids": None,
                  "pixel_values": torch.zeros(1), "token_type_ids": [0, 1]}
    remember(cache, T([[1, 2, 3]]), llm_inputs, True, deltas)
    record = prompt_of(cache)
    assert record is getattr(cache, PROMPT_ATTR)
    assert record.original_ids.tolist() == [[1, 2, 3]] and sorted(record.prefix) == ["attention_mask", "input_ids"]
    assert set(record.prefix) <= set(COLUMN_KEYS)
    deltas += 10
    assert record.rope_deltas.tolist() == [[2], [3]]  # a copy: the model's next call rewrites its own
    remember(cache, T([[1, 2, 3]]), llm_inputs, False, 4)
    assert prompt_of(cache).prefix is None and prompt_of(cache).rope_deltas is None
    forget(cache)
    assert prompt_of(cache) is None and not hasattr(cache, PROMPT_ATTR)
    forget(cache)  # twice, and on nothing: no error
    forget(None)


FOREIGN = (
    "`{entry}` got pixel values with a `past_key_values` that tokenreduce did not produce and that holds visual "
    "tokens (or, in `forward`, any tokens): the reduced prompt would not line up with it; pass the whole "
    "conversation with its pixel values and no `past_key_values`, or continue from the cache a wrapped "
    "`generate` returned")


def test_a_foreign_cache_with_pixels():
    ids = T([[1, 2, 3, 40, 40, 4], [1, 1, 2, 3, 41, 4]])  # image placeholder 40, video 41
    placeholders = (40, 41)
    for length in (1, 3):  # a cached text prefix ending before the first visual column (3) lines up
        refuse_foreign({"input_ids": ids, "past_key_values": _cache(length, 2)}, True, "generate", placeholders)
    for length in (4, 6):
        with pytest.raises(ValueError) as err:
            refuse_foreign({"input_ids": ids, "past_key_values": _cache(length, 2)}, True, "generate", placeholders)
        assert str(err.value) == FOREIGN.format(entry="generate")
    # the first visual column of the batch counts, whichever placeholder it is
    with pytest.raises(ValueError):
        refuse_foreign({"input_ids": T([[1, 2, 41, 3], [1, 2, 3, 40]]), "cache": _cache(3, 2)}, True, "generate",
                       placeholders)
    refuse_foreign({"input_ids": T([[1, 2, 3, 4]]), "cache": _cache(4)}, True, "generate", placeholders)  # no visual
    with pytest.raises(ValueError) as err:  # forward gets only the columns after the cache
        refuse_foreign({"input_ids": ids, "past_key_values": _cache(1, 2)}, True, "forward", placeholders)
    assert str(err.value) == FOREIGN.format(entry="forward")
    with pytest.raises(ValueError):  # generate without ids cannot tell where the visual tokens are
        refuse_foreign({"inputs_embeds": torch.zeros(2, 6, 4), "past_key_values": _cache(1, 2)}, True, "generate",
                       placeholders)
    # what passes: no pixels, an empty cache, no cache, a cache tokenreduce produced
    refuse_foreign({"input_ids": ids, "past_key_values": _cache(6, 2)}, False, "forward", placeholders)
    refuse_foreign({"input_ids": ids, "past_key_values": _cache(0, 2)}, True, "forward", placeholders)
    refuse_foreign({"input_ids": ids}, True, "forward", placeholders)
    ours = _cache(6, 2)
    remember(ours, ids, {}, False, None)
    refuse_foreign({"input_ids": ids, "past_key_values": ours}, True, "forward", placeholders)
