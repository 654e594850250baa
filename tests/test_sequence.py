"""Sequence edits (``core/sequence.py``) against plain-Python references: left-padded column indices and
the rebuilt rows of one or several rows, gathers with padding fill, labels, positions (text, renumbered,
M-RoPE axes, a prompt's continuation, decode steps under dynamic and static caches), decode and gathered
causal masks, DocOwl's placeholder expansion; rows of different lengths, empty rows."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, PretrainedConfig, Qwen2Config, StaticCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from tokenreduce.core.sequence import (
    IGNORE_INDEX,
    Columns,
    cache_length,
    causal_mask_builder,
    column_index,
    continued_positions,
    decode_key_length,
    decode_mask,
    decode_positions,
    full_causal,
    gather_columns,
    gather_inputs,
    gather_tokens,
    gathered_causal_mask,
    is_empty_cache,
    next_positions,
    one_row_index,
    padding_mask,
    padding_mask_2d,
    prefill_padding_mask,
    renumbered_positions,
    repeat_index,
    rope_positions,
    row_index,
    scatter_tokens,
    take_columns,
    text_positions,
)

ROWS = [
    [[0, 2, 5], [1], [3, 4, 6, 7]],
    [[], [2, 3]],
    [[4, 1]],
    [[], []],
]


def _reference_index(rows):
    length = max((len(r) for r in rows), default=0)
    return [[-1] * (length - len(r)) + list(r) for r in rows]


@pytest.mark.parametrize("rows", ROWS, ids=["uneven", "empty-row", "one-row", "all-empty"])
def test_column_index_left_pads_with_minus_one(rows):
    index = column_index([torch.tensor(r, dtype=torch.long) for r in rows])
    assert index.dtype == torch.long
    assert index.tolist() == _reference_index(rows)
    assert padding_mask(index).tolist() == [[int(c >= 0) for c in r] for r in _reference_index(rows)]
    assert padding_mask(index).dtype == torch.long


def test_column_index_of_no_rows():
    index = column_index([])
    assert index.shape == (0, 0) and index.dtype == torch.long


@pytest.mark.parametrize("fill", [0, -100, 7.5])
def test_gather_columns_2d_and_mrope(fill):
    rows = ROWS[0]
    index = column_index([torch.tensor(r) for r in rows])
    tensor = torch.arange(3 * 8).reshape(3, 8) * 10 + 1
    expected = [[fill if c < 0 else int(tensor[b, c]) for c in row] for b, row in enumerate(_reference_index(rows))]
    got = gather_columns(tensor.float() if isinstance(fill, float) else tensor, index, fill=fill)
    assert got.tolist() == expected
    # [3, B, L] positions: every axis gathered at the same columns
    mrope = torch.stack([tensor, tensor + 1000, tensor + 2000])
    got3 = gather_columns(mrope, index, fill=-5)
    assert got3.shape == (3, *index.shape)
    for axis in range(3):
        assert got3[axis].tolist() == [[-5 if c < 0 else int(mrope[axis, b, c]) for c in row]
                                       for b, row in enumerate(_reference_index(rows))]


def test_gather_columns_default_fill_is_zero():
    index = column_index([torch.tensor([1]), torch.tensor([0, 2])])
    tensor = torch.tensor([[5, 6, 7], [8, 9, 10]])
    assert gather_columns(tensor, index).tolist() == [[0, 6], [8, 10]]


# ----- columns: left padding, selects, token gathers, index builders -----------------------------------
def test_column_index_is_long_and_lands_on_the_device_asked():
    index = column_index([torch.tensor([2, 0], dtype=torch.int32), torch.tensor([], dtype=torch.int32)],
                         device=torch.device("cpu"))
    assert index.dtype == torch.long and index.device.type == "cpu"
    assert index.tolist() == [[2, 0], [-1, -1]]


def test_take_columns_of_one_row_and_of_several():
    tensor = torch.tensor([[10, 11, 12, 13]])
    mrope = torch.stack([tensor, tensor + 100, tensor + 200])
    index = torch.tensor([3, 1, 1])
    assert take_columns(tensor, index).tolist() == [[13, 11, 11]]
    assert take_columns(tensor, index, fill=-1).tolist() == [[13, 11, 11]]  # one row: no padding, fill unused
    assert take_columns(mrope, index).tolist() == [[[13, 11, 11]], [[113, 111, 111]], [[213, 211, 211]]]
    # a [B, L'] index goes through gather_columns, padding filled (0 unless told)
    assert take_columns(torch.tensor([[1, 2], [3, 4]]), torch.tensor([[-1, 1], [0, 1]])).tolist() == [[0, 2], [3, 4]]
    assert take_columns(torch.tensor([[1, 2], [3, 4]]), torch.tensor([[-1, 1], [0, 1]]), fill=-9).tolist() == [
        [-9, 2], [3, 4]]


def test_columns_gather_many_tensors_through_one_index():
    rows = [[2, 0], [1]]
    index = column_index([torch.tensor(r) for r in rows])
    columns = Columns(index)
    assert columns.index is index  # what a stage keeps of it
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    assert columns.take(mask).tolist() == [[1, 1], [0, 1]]
    assert columns.take(mask * 7, fill=-3).tolist() == [[7, 7], [-3, 7]]
    states = torch.arange(2 * 3 * 2).reshape(2, 3, 2)
    # padding reads column 0 (its mask hides it)
    assert columns.tokens(states).tolist() == [[states[0, 2].tolist(), states[0, 0].tolist()],
                                               [states[1, 0].tolist(), states[1, 1].tolist()]]
    one = Columns(torch.tensor([2, 2, 0]))
    assert one.pad is None and one.take(torch.tensor([[4, 5, 6]]), fill=-1).tolist() == [[6, 6, 4]]
    assert one.tokens(states[:1]).tolist() == [[states[0, 2].tolist(), states[0, 2].tolist(), states[0, 0].tolist()]]


def test_gather_tokens_against_lists():
    states = torch.arange(2 * 5 * 3).reshape(2, 5, 3)
    index = torch.tensor([[4, 0, 2], [1, 1, 3]])
    got = gather_tokens(states, index)
    assert got.shape == (2, 3, 3)
    assert got.tolist() == [[states[b, c].tolist() for c in row] for b, row in enumerate(index.tolist())]
    one = gather_tokens(states, torch.tensor([3, 3, 0]))
    assert one.tolist() == [[states[b, c].tolist() for c in (3, 3, 0)] for b in range(2)]


def _repeat_reference(copies):
    rows = [[c for c, k in enumerate(row) for _ in range(k)] for row in copies]
    return _reference_index(rows)


@pytest.mark.parametrize("copies", [[[1, 0, 3, 1], [2, 1, 0, 0]], [[0, 0, 0]], [[1, 1], [0, 0]], []],
                         ids=["uneven", "empty", "empty-row", "no-rows"])
def test_repeat_index_against_lists(copies):
    tensor = torch.tensor(copies, dtype=torch.long).reshape(len(copies), -1 if copies else 0)
    assert repeat_index(tensor).tolist() == _repeat_reference(copies)
    assert repeat_index(tensor).shape == (len(copies), max((sum(r) for r in copies), default=0))
    assert repeat_index(tensor, [sum(r) for r in copies]).tolist() == _repeat_reference(copies)


def _rebuild_reference(mask, placeholders, kept, keep_padding):
    """Per row, the (original column, item or None) of every column of the rebuilt row, in order."""
    out = []
    for r, row_mask in enumerate(mask):
        row = []
        for c, m in enumerate(row_mask):
            if (r, c) in placeholders:
                row += [(c, i) for i, (kr, cols) in enumerate(kept) if kr == r for kc in cols if kc == c]
            elif m or keep_padding:
                row.append((c, None))
        out.append(row)
    return out


def _landed_reference(rebuilt, kept):
    """Where every item's kept columns land: the item's entries, in order, in its row's left-padded layout."""
    width = max(len(r) for r in rebuilt)
    return [[width - len(rebuilt[row]) + at for at, (_, item) in enumerate(rebuilt[row]) if item == i]
            for i, (row, _) in enumerate(kept)]


def test_one_row_index_against_lists():
    # columns 2-5 are image placeholders, 7-8 video ones; items keep (sorted, one repeated) columns
    placeholders = [torch.tensor([2, 3, 4, 5]), torch.tensor([7, 8])]
    kept = [torch.tensor([3, 5, 5]), torch.tensor([2]), torch.tensor([8])]
    index, landed = one_row_index(10, placeholders, kept, torch.device("cpu"))
    cells = {(0, c) for p in placeholders for c in p.tolist()}
    rebuilt = _rebuild_reference([[1] * 10], cells, [(0, k.tolist()) for k in kept], keep_padding=True)
    assert index.tolist() == [c for c, _ in rebuilt[0]]
    assert [x.tolist() for x in landed] == _landed_reference(rebuilt, [(0, k.tolist()) for k in kept])


def test_one_row_index_keeps_padding_columns_and_handles_an_empty_item():
    index, landed = one_row_index(5, [torch.tensor([3, 4])], [torch.tensor([], dtype=torch.long)], torch.device("cpu"))
    assert index.tolist() == [0, 1, 2]
    assert landed[0].tolist() == []


def test_row_index_against_lists():
    mask = [[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1]]
    coords = torch.tensor([[0, 2], [0, 3], [1, 1], [1, 2], [1, 3], [2, 4], [2, 5]])
    kept = [(0, [2, 3, 3]), (1, [1, 3]), (2, [])]
    cells = {tuple(c) for c in coords.tolist()}
    text_counts = [sum(m and (r, c) not in cells for c, m in enumerate(row)) for r, row in enumerate(mask)]
    index, landed = row_index(torch.tensor(mask), [coords], [(r, torch.tensor(c, dtype=torch.long)) for r, c in kept],
                              text_counts)
    rebuilt = _rebuild_reference(mask, cells, kept, keep_padding=False)
    assert index.tolist() == _reference_index([[c for c, _ in row] for row in rebuilt])
    assert [x.tolist() for x in landed] == _landed_reference(rebuilt, kept)


def test_gather_inputs_fills_each_key_and_leaves_the_rest():
    inputs = {"input_ids": torch.tensor([[5, 6, 7]]), "labels": torch.tensor([[1, 2, 3]]),
              "mm_token_type_ids": torch.tensor([[0, 1, 1]]), "token_type_ids": torch.tensor([[4, 4, 5]]),
              "pixel_values": "kept", "attention_mask": torch.tensor([[1, 1, 1]])}
    index = torch.tensor([[-1, 2, 0]])
    out = gather_inputs(inputs, Columns(index), pad_id=99)
    assert out["input_ids"].tolist() == [[99, 7, 5]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 3, 1]] and IGNORE_INDEX == -100
    assert out["mm_token_type_ids"].tolist() == [[0, 1, 0]]
    assert out["token_type_ids"].tolist() == [[0, 5, 4]]
    assert out["pixel_values"] == "kept" and out["attention_mask"] is inputs["attention_mask"]
    assert "labels" not in gather_inputs({"input_ids": inputs["input_ids"]}, Columns(index), 0)
    one = gather_inputs({"input_ids": inputs["input_ids"], "labels": None}, Columns(torch.tensor([1, 1])), 0)
    assert one["input_ids"].tolist() == [[6, 6]] and one["labels"] is None


def test_scatter_tokens_later_pieces_win_and_padding_is_dropped():
    length, dim = 4, 2
    first = (torch.tensor([[0, 1, 2, 3]]), torch.full((1, 4, dim), 1.0))
    second = (torch.tensor([[-1, 1, 3]]), torch.tensor([[[9.0, 9.0], [2.0, 2.5], [3.0, 3.5]]]))
    got = scatter_tokens(length, [first, second])
    assert got.tolist() == [[[1.0, 1.0], [2.0, 2.5], [1.0, 1.0], [3.0, 3.5]]]
    only = scatter_tokens(3, [(torch.tensor([[2, -1]]), torch.tensor([[[5.0], [6.0]]]))])
    assert only.tolist() == [[[0.0], [0.0], [5.0]]]
    rows = scatter_tokens(2, [(torch.tensor([[1, -1], [0, 1]]), torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]]))])
    assert rows.tolist() == [[[0.0], [1.0]], [[3.0], [4.0]]]


# ----- positions ---------------------------------------------------------------------------------------
MASKS = [[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0]]


def _cumulative(row):
    out, seen = [], 0
    for m in row:
        seen += m
        out.append(seen - 1)
    return out


def test_text_and_renumbered_positions_against_lists():
    mask = torch.tensor(MASKS)
    assert text_positions(mask).tolist() == [[p if m else 0 for p, m in zip(_cumulative(r), r)] for r in MASKS]
    assert renumbered_positions(mask).tolist() == [[max(p, 0) for p in _cumulative(r)] for r in MASKS]
    assert text_positions(mask.bool()).tolist() == text_positions(mask).tolist()


def test_rope_positions_on_every_axis():
    positions = torch.tensor([[0, 1, 2], [0, 0, 1]])
    assert rope_positions(positions, 1) is positions
    got = rope_positions(positions, 3)
    assert got.shape == (3, 2, 3) and all(got[a].tolist() == positions.tolist() for a in range(3))
    per_axis = torch.arange(18).reshape(3, 2, 3)
    assert rope_positions(per_axis, 3) is per_axis


def test_next_and_continued_positions():
    positions = torch.tensor([[0, 5, 3], [0, 0, 1]])  # kept original positions need not end on the largest
    start = next_positions(positions)
    assert start.tolist() == [6, 2]
    assert continued_positions(start, 0, 1).tolist() == [[6], [2]]
    assert continued_positions(start, 3, 2).tolist() == [[9, 10], [5, 6]]
    mrope = torch.stack([positions, positions + 10, positions])
    assert next_positions(mrope).tolist() == [[6, 2], [16, 12], [6, 2]]


# ----- masks and decode steps under any cache ----------------------------------------------------------
def _dynamic_cache(length):
    cache = DynamicCache()
    if length:
        states = torch.zeros(1, 1, length, 2)
        cache.update(states, states, 0)
    return cache


def _static_cache(length, size=6):
    config = LlamaConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=8)
    cache = StaticCache(config=config, max_cache_len=size)
    states = torch.zeros(1, 1, length, 4)
    cache.update(states, states, 0, {"cache_position": torch.arange(length)})
    return cache


def test_padding_mask_2d_and_prefill_padding_mask():
    mask = torch.tensor([[0, 1, 1]])
    assert padding_mask_2d(mask) is mask
    assert padding_mask_2d(torch.ones(1, 1, 3, 3)) is None and padding_mask_2d({"full_attention": mask}) is None
    assert prefill_padding_mask(mask, torch.ones(1, 2), 1, 3) is mask
    assert prefill_padding_mask(None, None, 2, 3) is None
    assert prefill_padding_mask(None, torch.ones(2, 3), 3, 3) is None  # rows not a multiple of the caller's
    prepared = torch.tensor([[0, 1], [1, 1]])
    assert prefill_padding_mask(None, prepared, 4, 3).tolist() == [[0, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]]
    assert prefill_padding_mask(None, torch.tensor([[0, 1, 1]]), 1, 2).tolist() == [[0, 1]]


def test_cache_lengths_dynamic_static_and_legacy():
    assert is_empty_cache(None, 0) and is_empty_cache(_dynamic_cache(0), 0)
    assert not is_empty_cache(_dynamic_cache(3), 0)
    assert cache_length(None) == 0 and cache_length(_dynamic_cache(3)) == 3
    assert cache_length(((torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4)),)) == 5
    assert cache_length(()) == 0
    assert decode_key_length(None, 2, 0) == 2
    assert decode_key_length(_dynamic_cache(3), 1, 0) == 4
    assert decode_key_length(_static_cache(2), 1, 0) == 6  # a static cache: its whole length, no host read


def test_decode_positions_count_real_tokens_before_each_query():
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 0, 1, 1]])
    assert decode_positions(mask, None, 2, 0).tolist() == [[_cumulative(r)[c] for c in (0, 1)] for r in mask.tolist()]
    expected = [[_cumulative(r)[c] for c in (3, 4)] for r in mask.tolist()]
    assert decode_positions(mask, _dynamic_cache(3), 2, 0).tolist() == expected
    assert decode_positions(mask, _static_cache(3, size=5), 2, 0).tolist() == expected


def test_decode_mask_appends_the_tokens_after_the_prompt():
    kept = torch.tensor([[0, 1, 1], [1, 1, 1]])
    given = torch.tensor([[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]])  # prompt of 4, then 3 more columns
    assert decode_mask(kept, given, 4, 5).tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert decode_mask(kept, given, 4, 6).tolist() == [[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    for no_2d in (None, torch.zeros(2, 1, 1, 7)):
        got = decode_mask(kept, no_2d, 4, 5)
        assert got.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]] and got.dtype == kept.dtype
    as_bool = decode_mask(kept, given.bool(), 4, 5)  # the tail takes the stage mask's dtype
    assert as_bool.dtype == kept.dtype and as_bool.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_causal_mask_builder_and_full_causal_by_layer_type():
    config = Qwen2Config(num_hidden_layers=3, use_sliding_window=True, max_window_layers=1, sliding_window=4)
    assert [full_causal(config, i) for i in range(3)] == [True, False, False]
    assert causal_mask_builder(config, 0) is create_causal_mask
    assert causal_mask_builder(config, 2) is create_sliding_window_causal_mask
    plain = LlamaConfig(num_hidden_layers=2)
    plain.layer_types = None
    assert full_causal(plain, 1) and causal_mask_builder(plain, 1) is create_causal_mask
    bare = PretrainedConfig()  # a config with no layer types at all
    assert not hasattr(bare, "layer_types")
    assert full_causal(bare, 0) and causal_mask_builder(bare, 0) is create_causal_mask


def test_gathered_causal_mask_against_lists():
    padding = [0, 1, 1, 1, 1, 1]
    length = len(padding)
    reference = [[0.0 if k <= q and padding[k] else -1e9 for k in range(length)] for q in range(length)]
    prior = torch.tensor(reference)[None, None]
    kept = torch.tensor([0, 2, 3, 5])
    (got,) = gathered_causal_mask(prior, length, kept)
    assert got.tolist() == [[[[reference[q][k] for k in kept.tolist()] for q in kept.tolist()]]]
    assert gathered_causal_mask(None, length, kept) == (None,)
    assert gathered_causal_mask(torch.ones(1, length), length, kept) is None  # a 2-D mask
    assert gathered_causal_mask(prior, length + 1, kept) is None  # another size
    assert gathered_causal_mask({"full_attention": prior}, length, kept) is None


# ----- DocOwl: one placeholder per crop, expanded to one per visual token --------------------------------
def test_docowl_expansion_left_pads_ids_mask_and_labels():
    from tests.doc_correlation.docowl_tiny import tiny_docowl_config
    from tokenreduce.adapters.docowl import IMAGE_TOKEN_INDEX, DocOwlAdapter

    adapter = DocOwlAdapter.from_config(tiny_docowl_config())
    n, pad = adapter.tokens_per_crop, 0
    img = IMAGE_TOKEN_INDEX
    ids = [[5, img, img, 6], [0, 7, img, 8]]
    mask = [[1, 1, 1, 1], [0, 1, 1, 1]]
    labels = [[5, 9, 9, 6], [-100, 7, 9, 8]]
    out = adapter.expand_inputs({"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
                                 "labels": torch.tensor(labels), "other": 1})

    def expand(row, values, visual_value=None):
        return [v if visual_value is None or i != img else visual_value
                for i, v in zip(row, values) for _ in range(n if i == img else 1)]

    rows = [(expand(r, r), expand(r, m), expand(r, lab, -100)) for r, m, lab in zip(ids, mask, labels)]
    width = max(len(r[0]) for r in rows)
    assert out["input_ids"].tolist() == [[pad] * (width - len(r[0])) + r[0] for r in rows]
    assert out["attention_mask"].tolist() == [[0] * (width - len(r[1])) + r[1] for r in rows]
    assert out["labels"].tolist() == [[-100] * (width - len(r[2])) + r[2] for r in rows]
    assert out["other"] == 1
    no_mask = adapter.expand_inputs({"input_ids": torch.tensor([[img, 3]])})
    assert no_mask["attention_mask"].tolist() == [[1] * (n + 1)] and "labels" not in no_mask
    plain = {"input_ids": torch.tensor([[1, 2]])}
    assert adapter.expand_inputs(plain) is plain
