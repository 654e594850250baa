"""``core/inputs.py`` on hand-written tensors: the placeholder ids found in ``inputs_embeds``, the embeddings
gathered like the ids (padding given the pad embedding), the rebuilt call, and the positions the plain model
gives a call without ids (issue #36: mutation testing of the core). ``tests/test_plain_inputs.py`` checks the
same path end to end against calls made with ``input_ids``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import DynamicCache

from tokenreduce.adapters import get_adapter
from tokenreduce.core.inputs import (
    gather_embeds,
    ids_from_embeds,
    placeholder_ids,
    plain_embeds_positions,
    rebuilt_embeds,
)
from tokenreduce.testing.tiny import IMAGE_TOKEN, VIDEO_TOKEN, tiny_model

T = torch.tensor


def _embedding() -> nn.Embedding:
    torch.manual_seed(0)
    return nn.Embedding(10, 4)


def test_placeholder_ids_where_every_channel_equals_the_placeholders_embedding():
    embed = _embedding()
    ids = T([[1, 7, 7, 2, 8], [8, 3, 7, 0, 0]])
    embeds = embed(ids).detach()
    embeds[0, 3] = embed.weight[7].detach()  # a text position holding the image embedding counts as one
    embeds[1, 2, 1] += 1.0  # one channel off: not a placeholder
    with torch.no_grad():
        got = placeholder_ids(embeds, embed, {"image": 7, "video": 8}, fill=-1)
    assert got.tolist() == [[-1, 7, 7, 7, 8], [8, -1, -1, -1, -1]]
    assert got.dtype == torch.long
    with torch.no_grad():
        assert placeholder_ids(embeds, embed, {}, fill=0).tolist() == [[0] * 5, [0] * 5]
        # compared in the embeddings' dtype
        half = placeholder_ids(embeds.double(), embed, {"image": 7}, fill=5)
    assert half.tolist() == [[5, 7, 7, 7, 5], [5, 5, 5, 5, 5]]


def test_gather_embeds_follows_the_index_and_pads():
    embeds = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    pad = T([-1.0, -2.0, -3.0], dtype=torch.float64)
    out = gather_embeds(embeds, T([[-1, 0, 2], [3, 3, 1]]), pad)
    expected = torch.stack([
        torch.stack([pad.float(), embeds[0, 0], embeds[0, 2]]),
        torch.stack([embeds[1, 3], embeds[1, 3], embeds[1, 1]]),
    ])
    assert out.dtype == torch.float32 and torch.equal(out, expected)


def test_rebuilt_embeds():
    embed = _embedding()
    index = T([[-1, 0, 2]])
    out = {"input_ids": T([[0, 5, 6]]), "attention_mask": T([[0, 1, 1]])}
    assert rebuilt_embeds(dict(out), {"input_ids": T([[5, 9, 6]])}, index, embed, 0, True) == out  # ids only
    embeds = embed(T([[5, 9, 6]])).detach()
    with torch.no_grad():
        kept = rebuilt_embeds(dict(out), {"inputs_embeds": embeds}, index, embed, 3, True)
        dropped = rebuilt_embeds(dict(out), {"inputs_embeds": embeds}, index, embed, 3, False)
    expected = torch.stack([embed.weight[3], embeds[0, 0], embeds[0, 2]])[None].detach()
    assert torch.equal(kept["inputs_embeds"], expected) and torch.equal(kept["input_ids"], out["input_ids"])
    assert torch.equal(dropped["inputs_embeds"], expected) and "input_ids" not in dropped
    assert torch.equal(dropped["attention_mask"], out["attention_mask"])
    assert rebuilt_embeds({"attention_mask": 1}, {"inputs_embeds": embeds}, index, embed, 3, False)["attention_mask"] == 1


def test_ids_from_embeds_on_a_family_with_one_placeholder_per_token():
    model = tiny_model("llava_onevision")
    adapter = get_adapter(model)
    ids = T([[1, IMAGE_TOKEN, IMAGE_TOKEN, 4, VIDEO_TOKEN], [VIDEO_TOKEN, 5, 6, IMAGE_TOKEN, 2]])
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    got = ids_from_embeds(adapter, {"inputs_embeds": embeds})
    assert got.tolist() == [[-1, IMAGE_TOKEN, IMAGE_TOKEN, -1, VIDEO_TOKEN], [VIDEO_TOKEN, -1, -1, IMAGE_TOKEN, -1]]
    assert plain_embeds_positions(adapter, {"inputs_embeds": embeds}, False) is None  # 1-D positions: the usual path


def test_positions_of_a_qwen_call_without_ids():
    model = tiny_model("qwen2_vl")
    adapter = get_adapter(model)
    embeds = torch.zeros(2, 4, model.config.text_config.hidden_size)
    mask = T([[0, 1, 1, 1], [1, 1, 1, 1]])
    # generate: the mask's text positions on every axis (a padding column, which the mask hides, at 0)
    got = plain_embeds_positions(adapter, {"inputs_embeds": embeds, "attention_mask": mask}, True)
    text = [[0, 0, 1, 2], [0, 1, 2, 3]]
    assert got.tolist() == [text] * 3
    got = plain_embeds_positions(adapter, {"inputs_embeds": embeds}, True)
    assert got.tolist() == [[[0, 1, 2, 3]] * 2] * 3 and got.dtype == torch.long
    # forward with no earlier call: consecutive positions, counting on from a cache's length
    model.model.rope_deltas = None
    got = plain_embeds_positions(adapter, {"inputs_embeds": embeds, "attention_mask": mask}, False)
    assert got.tolist() == [[[0, 1, 2, 3]] * 2] * 3
    cache = DynamicCache()
    cache.update(torch.zeros(2, 1, 3, 2), torch.zeros(2, 1, 3, 2), 0)
    for key in ("cache", "past_key_values"):
        got = plain_embeds_positions(adapter, {"inputs_embeds": embeds, key: cache}, False)
        assert got.tolist() == [[[3, 4, 5, 6]] * 2] * 3
    # an earlier call's M-RoPE offsets: the plain model adds them to the mask's text positions, or to the
    # positions after the cache (transformers' rule for a call without ids, written out)
    model.model.rope_deltas = T([[2], [5]])
    got = plain_embeds_positions(adapter, {"inputs_embeds": embeds, "attention_mask": mask}, False)
    assert got.tolist() == [[[2, 2, 3, 4], [5, 6, 7, 8]]] * 3
    got = plain_embeds_positions(adapter, {"inputs_embeds": embeds, "cache": cache}, False)
    assert got.tolist() == [[[5, 6, 7, 8], [8, 9, 10, 11]]] * 3
    model.model.rope_deltas = None


def test_inputs_embeds_refused_where_a_placeholder_stands_for_many_tokens():
    from .doc_correlation.docowl_tiny import tiny_docowl

    adapter = get_adapter(tiny_docowl())
    with pytest.raises(ValueError) as err:
        ids_from_embeds(adapter, {"inputs_embeds": torch.zeros(1, 2, 4)})
    assert str(err.value) == (
        f"`inputs_embeds` with pixels is not supported for {adapter.describe()}: its placeholder stands for several "
        "visual tokens; pass `input_ids`")
