"""The plugin's pieces that need no engine: parsing the per-engine config, counts, position channels."""

from __future__ import annotations

import pytest
import torch

from tokenreduce.core.layout import Segment, TokenLayout
from tokenreduce.integrations.vllm import SUPPORTED, parse_reducer
from tokenreduce.integrations.vllm.models import decode_positions, encode_positions, grid_offsets


@pytest.mark.parametrize("name", ["fastv", "pdrop", "atp", "visionzip", "vqtoken", "doc_correlation", "ares"])
def test_methods_vllm_cannot_run_are_refused_by_name(name):
    with pytest.raises(ValueError, match=rf"method '{name}' cannot run in vLLM .*methods that can: {', '.join(SUPPORTED)}"):
        parse_reducer({"method": name}, "qwen2_vl")


def test_bad_entries_name_what_is_accepted():
    with pytest.raises(ValueError, match="unknown method 'nope'; methods that can run in vLLM: divprune"):
        parse_reducer({"method": "nope"}, "qwen2_vl")
    with pytest.raises(ValueError, match="must be a dict with a 'method' name"):
        parse_reducer({"keep": 3}, "qwen2_vl")
    with pytest.raises(TypeError, match="unexpected option"):
        parse_reducer({"method": "pool", "kep": 3}, "qwen2_vl")
    with pytest.raises(ValueError, match="`modalities` for llava_onevision in vLLM must be"):
        parse_reducer({"method": "pool", "modalities": ["image", "video"]}, "llava_onevision")
    assert parse_reducer(None, "qwen2_vl") is None
    assert not parse_reducer({"method": "pool"}, "llava").renumber
    assert parse_reducer({"method": "pool"}, "llava_onevision").modalities == ("video",)


@pytest.mark.parametrize(("method", "keep", "expected"), [("divprune", 10, 10), ("random", 0.25, 16), ("tome_projector", 9, 9)])
def test_count_is_what_the_method_leaves(method, keep, expected):
    reducer = parse_reducer({"method": method, "keep": keep}, "qwen2_vl")
    layout = TokenLayout("image", (Segment("base", 8, 8),))
    assert reducer.count(layout) == expected
    red = reducer.reduce(torch.randn(64, 32), layout)
    assert red.num_tokens == expected and bool((red.sources[1:] > red.sources[:-1]).all())


def test_position_channels_are_exact_in_half_precision():
    offsets = torch.tensor([[0, 0, 0], [255, 256, 1000], [65535, 7, 300]])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(decode_positions(encode_positions(offsets, dtype)), offsets)


def test_grid_offsets_scale_time_like_vllm():
    layout = TokenLayout("video", tuple(Segment("frame", 2, 3, time=t) for t in range(2)))
    offsets = grid_offsets(layout, t_factor=4.0)
    assert offsets.shape == (12, 3)
    assert offsets[6].tolist() == [4, 0, 0] and offsets[11].tolist() == [4, 1, 2]
