"""The plugin's pieces that need no engine: parsing the per-engine config, counts, position channels."""

from __future__ import annotations

import pytest
import torch

from tokenreduce.core.layout import Segment, TokenLayout
from tokenreduce.core.registry import get_method
from tokenreduce.integrations.vllm import SUPPORTED, parse_reducer
from tokenreduce.integrations.vllm.models import decode_positions, encode_positions, grid_offsets
from tokenreduce.integrations.vllm.reducer import TowerShape

# A CLIP tower of 2 layers (vLLM builds the first, LLaVA reading layer -2), 4 heads of 8, 4 x 4 patches.
TOWER = TowerShape(heads=4, head_dim=8, num_prefix=1, patches=16, scale=8**-0.5, num_layers=2, built_layers=1)


@pytest.mark.parametrize("name", ["fastv", "pdrop", "dart", "atp", "prumerge", "tome", "langdc", "ares"])
def test_methods_vllm_cannot_run_are_refused_by_name(name):
    with pytest.raises(ValueError, match=rf"method '{name}' cannot run in vLLM .*methods that can: {', '.join(SUPPORTED)}"):
        parse_reducer({"method": name}, "qwen2_vl")


@pytest.mark.parametrize(("options", "family", "message"), [
    ({"method": "visionzip"}, "qwen2_vl", "method 'visionzip' cannot run in vLLM .*wired in vLLM for llava \\(images\\) .*not qwen2_vl"),
    ({"method": "cdpruner"}, "llava", "method 'cdpruner' cannot run in vLLM .*it reads the prompt's text"),
    ({"method": "doc_correlation", "keep": 0.5}, "llava_onevision", "method 'doc_correlation' cannot run in vLLM"),
    ({"method": "doc_correlation"}, "llava", r"method 'doc_correlation' cannot run in vLLM \(with `keep` unset"),
    ({"method": "vqtoken"}, "qwen2_vl", r"method 'vqtoken' cannot run in vLLM \(with `keep` unset"),
    ({"method": "doc_correlation", "keep": 0.5, "similarity": "hidden"}, "llava", "`similarity` for doc_correlation"),
    ({"method": "vqtoken", "keep": 4, "attention": "dir"}, "qwen2_vl", "`attention` for vqtoken in vLLM must be None"),
    ({"method": "doc_correlation", "keep": 0.5}, "llava", "tower layer 1 of doc_correlation is not built by vLLM"),
    ({"method": "visionzip", "variant": "reference"}, "llava", "`variant` for visionzip in vLLM must be 'default'"),
    ({"method": "visionzip", "layer": -1}, "llava", r"tower layer -1 of visionzip .*accepted: 0..0 or -2..-2"),
    ({"method": "visionzip", "modalities": ["image"]}, "llava_onevision",
     r"method 'visionzip' cannot run in vLLM \(on llava_onevision's anyres images .* videos only; `modalities"),
])
def test_conditions_that_make_counts_data_dependent_are_refused(options, family, message):
    with pytest.raises(ValueError, match=message):
        parse_reducer(options, family, TOWER)


def test_tower_methods_count_what_they_leave_of_a_llava_image():
    layout = TokenLayout("image", (Segment("base", 4, 4),))
    zip_ = parse_reducer({"method": "visionzip", "dominant": 5, "contextual": 3}, "llava", TOWER)
    assert zip_.count(layout) == 8
    doc = parse_reducer({"method": "doc_correlation", "keep": 0.4, "shallow_layer": 0}, "llava", TOWER)
    assert doc.count(layout) == round(0.4 * 16)
    # the same count with the method's own code on other signals
    signals = {"attention": torch.rand(16), "keys": torch.randn(16, 8)}
    assert zip_.reduce(torch.randn(16, 32), layout, signals=signals).num_tokens == 8


def test_visionzip_counts_what_it_leaves_of_a_onevision_video():
    # SigLIP (no [CLS]), 4 x 4 patches per frame pooled to 2 x 2 tokens, then a lone newline
    siglip = TowerShape(heads=4, head_dim=8, num_prefix=0, patches=16, scale=8**-0.5, num_layers=2, built_layers=2)
    reducer = parse_reducer({"method": "visionzip", "dominant": 2, "contextual": 1}, "llava_onevision", siglip)
    assert reducer.modalities == ("video",)  # anyres images: the crops' tower signals are not captured
    frames = tuple(Segment("frame", 2, 2, time=t) for t in range(3))
    video = TokenLayout("video", (*frames, Segment("newline", 1, 0, newline=True, time=2)))
    assert reducer.count(video) == 3 * 3 + 1
    with pytest.raises(ValueError, match="on llava_onevision's anyres images"):
        parse_reducer({"method": "visionzip", "modalities": ["image", "video"]}, "llava_onevision", siglip)


def test_vqtoken_count_and_fewer_codes_than_keep():
    frames = tuple(Segment("frame", 2, 2, time=t) for t in range(3))
    video = TokenLayout("video", (*frames, Segment("newline", 1, 0, newline=True, time=2)))
    reducer = parse_reducer({"method": "vqtoken", "keep": 5, "kmeans": "torch", "keep_newline": True}, "llava_onevision")
    assert reducer.count(video) == 5 + 1
    # Three distinct tokens: k-means places three codes, the method feeds 3 + the newline
    features = torch.randn(3, 16)[torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0])]
    method = get_method("vqtoken").method_cls(reducer.config)
    from tokenreduce.core.reduction import ReduceContext

    own = method.reduce(features, ReduceContext(layout=video, modality="video", row=0, item=0)).sorted()
    assert own.num_tokens == 4
    red = reducer.reduce(features, video)
    assert red.num_tokens == 6
    out = red.output_features(features)
    assert torch.equal(out[:4], own.output_features(features)) and torch.equal(out[4:], out[3:4].expand(2, -1))
    assert red.sources[4:].tolist() == [own.sources[-1].item()] * 2


def test_bad_entries_name_what_is_accepted():
    with pytest.raises(ValueError, match="unknown method 'nope'; methods that can run in vLLM: divprune, doc_correlation"):
        parse_reducer({"method": "nope"}, "qwen2_vl")
    with pytest.raises(ValueError, match="must be a dict with a 'method' name"):
        parse_reducer({"keep": 3}, "qwen2_vl")
    with pytest.raises(ValueError, match=r"method 'divprune\+fastv' cannot run in vLLM \(a stack of methods"):
        parse_reducer({"method": "divprune+fastv"}, "qwen2_vl")
    with pytest.raises(TypeError, match="unexpected option"):
        parse_reducer({"method": "pool", "kep": 3}, "qwen2_vl")
    assert parse_reducer(None, "qwen2_vl") is None
    assert not parse_reducer({"method": "pool"}, "llava").renumber
    assert parse_reducer({"method": "pool"}, "llava_onevision").modalities == ("image", "video")
    assert parse_reducer({"method": "pool", "modalities": ["video"]}, "llava_onevision").modalities == ("video",)
    # divprune's count on anyres images is fixed: images and videos
    assert parse_reducer({"method": "divprune", "keep": 8}, "llava_onevision").modalities == ("image", "video")


@pytest.mark.parametrize("keep", [5, 0.3, 1.0])
def test_divprune_count_on_an_anyres_image(keep):
    # base 3 x 3, then a 4 x 5 canvas with a newline slot ending each row: 9 + 20 content tokens and 4 rows'
    # slots, all candidates; a fraction counts them too (the budget's rounding up, written out)
    layout = TokenLayout("image", (Segment("base", 3, 3), Segment("crop", 4, 5, newline=True)))
    reducer = parse_reducer({"method": "divprune", "keep": keep}, "llava_next")
    expected = keep if isinstance(keep, int) else -(-round(keep * 33 * 10**6) // 10**6)
    assert reducer.count(layout) == expected
    for seed in range(3):  # the same count whatever the features
        features = torch.randn(33, 16, generator=torch.Generator().manual_seed(seed))
        features[layout.is_newline] = features[12].clone()  # LLaVA-NeXT's newline slots share one vector
        assert reducer.reduce(features, layout).num_tokens == expected


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
