"""The per-crop grouping and assembly that VisionZip and PruMerge share (``tokenreduce.ops.vision``).

Groups are checked against token indices written out by hand for each layout; :func:`reduce_per_crop` is
driven by a hand-written ``select`` (keep the group's first two tokens, merge the rest into the first) and
its sources, features and assignment are compared with the values that rule gives, worked out here.
"""

from __future__ import annotations

import torch

from tokenreduce.core.layout import Segment, TokenLayout
from tokenreduce.core.reduction import ReduceContext
from tokenreduce.ops.vision import (
    attention_and_keys,
    content_groups,
    count,
    newline_slots,
    reduce_per_crop,
)


def _groups(layout, per_crop):
    return [g.tolist() for g in content_groups(layout, per_crop=per_crop)]


def test_content_groups_leave_out_newlines_and_cls_and_split_by_frame_or_source():
    # anyres image: base 2x2 then a 2x3 canvas with newlines (slots 9 and 13); one group per item either way
    anyres = TokenLayout("image", (Segment("base", 2, 2), Segment("crop", 2, 3, newline=True)))
    content = [0, 1, 2, 3, 4, 5, 6, 8, 9, 10]
    assert _groups(anyres, False) == [content]
    assert _groups(anyres, True) == [content]
    # video: one group per frame segment, the trailing lone newline in none
    video = TokenLayout("video", (Segment("frame", 2, 2), Segment("frame", 1, 3, time=1),
                                  Segment("newline", 1, 0, newline=True)))
    assert _groups(video, True) == [[0, 1, 2, 3], [4, 5, 6]]
    assert _groups(video, False) == [[0, 1, 2, 3, 4, 5, 6]]
    # a CLS segment is content of no group
    cls = TokenLayout("image", (Segment("cls", 1, 1), Segment("base", 2, 2)))
    assert _groups(cls, True) == [[1, 2, 3, 4]] and _groups(cls, False) == [[1, 2, 3, 4]]
    # cropping models: the patch's source crop decides (tokens of crop 1 before crop 0 on purpose)
    src = torch.tensor([[1, 0], [1, 1], [0, 0], [0, 1], [2, 0], [2, 1]])
    docs = TokenLayout("image", (Segment("crop", 2, 3),), extra={"patch_source": src})
    assert _groups(docs, True) == [[2, 3], [0, 1], [4, 5]]
    assert _groups(docs, False) == [[0, 1, 2, 3, 4, 5]]


def test_count_takes_ints_as_they_are_and_floats_as_shares():
    assert count(3, 10) == 3 and count(12, 10) == 10
    assert count(0.25, 10) == 2 and count(0.35, 10) == 4 and count(2.0, 10) == 10


def test_reduce_per_crop_assembles_groups_slots_and_lone_newlines():
    # two frames with newline slots: frame 0 tokens 0,1 | 2(nl) | 3,4 | 5(nl); frame 1 tokens 6,7 | 8(nl);
    # then a lone newline segment (slot 9)
    layout = TokenLayout("video", (Segment("frame", 2, 2, newline=True), Segment("frame", 1, 2, newline=True, time=1),
                                   Segment("newline", 1, 0, newline=True, time=2)))
    features = torch.arange(10 * 2, dtype=torch.float32).view(10, 2)

    def select(group):
        # keep the group's first two tokens; every other token merges into the first
        sources = group[:2]
        outputs = features[sources] * 10
        slot = torch.zeros(group.numel(), dtype=torch.long)
        slot[1] = 1
        return sources, outputs, slot

    context = ReduceContext(layout=layout, modality="video", row=0, item=0)
    red = reduce_per_crop(features, context, select)
    # frame 0's group is [0, 1, 3, 4], frame 1's [6, 7]; the rows' newline slots 2, 5, 8 are dropped, the
    # lone newline 9 stays last
    assert red.sources.tolist() == [0, 1, 6, 7, 9]
    want = torch.cat([features[[0, 1, 6, 7]] * 10, features[[9]]])
    assert torch.equal(red.features, want)
    assert red.assignment.tolist() == [0, 1, -1, 0, 0, -1, 2, 3, -1, 4]


def test_reduce_per_crop_keeps_every_newline_slot_when_every_group_is_whole():
    # the same layout as above; every group keeps all its tokens, so the rows' slots 2, 5, 8 stay with 9
    layout = TokenLayout("video", (Segment("frame", 2, 2, newline=True), Segment("frame", 1, 2, newline=True, time=1),
                                   Segment("newline", 1, 0, newline=True, time=2)))
    features = torch.arange(10 * 2, dtype=torch.float32).view(10, 2)

    def select(group):
        return group, features[group], torch.arange(group.numel())

    red = reduce_per_crop(features, ReduceContext(layout=layout, modality="video", row=0, item=0), select)
    assert red.sources.tolist() == [0, 1, 3, 4, 6, 7, 2, 5, 8, 9]
    assert torch.equal(red.features, features[red.sources])
    assert red.assignment.tolist() == [0, 1, 6, 2, 3, 7, 4, 5, 8, 9]


def test_reduce_per_crop_keeps_dropped_tokens_out_of_every_slot():
    layout = TokenLayout("video", (Segment("frame", 1, 3), Segment("frame", 1, 3, time=1)))
    features = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))

    def select(group):
        # keep the middle token alone, drop the others (slot -1)
        return group[1:2], features[group[1:2]], torch.tensor([-1, 0, -1])

    red = reduce_per_crop(features, ReduceContext(layout=layout, modality="video", row=0, item=0), select)
    assert red.sources.tolist() == [1, 4]
    assert red.assignment.tolist() == [-1, 0, -1, -1, 1, -1] and red.assignment.dtype == torch.long
    assert torch.equal(red.features, features[[1, 4]])


def _softmax_attention(q, k, scale):
    """``[r, h, nq, nk]`` softmax attention, written out."""
    return (torch.einsum("rhqd,rhkd->rhqk", q, k) * scale).softmax(-1)


def test_attention_and_keys_with_cls_without_cls_and_single_head():
    gen = torch.Generator().manual_seed(0)
    r, h, n, d = 2, 3, 5, 4
    q, k = torch.randn(r, h, n, d, generator=gen), torch.randn(r, h, n, d, generator=gen)
    # CLS tower: the CLS query's attention over all keys, head mean, read at the patches
    got = attention_and_keys(q, k, scale=0.7, num_prefix=1)
    want = _softmax_attention(q[:, :, :1], k, 0.7)[:, :, 0].mean(1)[:, 1:]
    torch.testing.assert_close(got["attention"], want)
    torch.testing.assert_close(got["keys"], k.mean(1)[:, 1:])
    # no CLS (SigLIP): the attention each patch receives, averaged over every query and head
    got = attention_and_keys(q, k, scale=0.7, num_prefix=0)
    torch.testing.assert_close(got["attention"], _softmax_attention(q, k, 0.7).mean((1, 2)))
    torch.testing.assert_close(got["keys"], k.mean(1))
    # single head: the heads' dims side by side, one dot product scaled by (h * d) ** -0.5
    flat_q = q.permute(0, 2, 1, 3).reshape(r, 1, n, h * d)
    flat_k = k.permute(0, 2, 1, 3).reshape(r, 1, n, h * d)
    got = attention_and_keys(q, k, scale=0.7, num_prefix=1, single_head=True)
    want = _softmax_attention(flat_q[:, :, :1], flat_k, (h * d) ** -0.5)[:, 0, 0, 1:]
    torch.testing.assert_close(got["attention"], want)
    torch.testing.assert_close(got["keys"], flat_k[:, 0, 1:])


def test_newline_slots_split_rows_from_lone_separators():
    # crop A 2x2 + newline (slots 2, 5), crop B 3x1 + newline (slots 7, 9, 11), base 1x2 (no slot), a lone
    # newline (slot 14)
    layout = TokenLayout("image", (Segment("crop", 2, 2, newline=True), Segment("crop", 3, 1, newline=True),
                                   Segment("base", 1, 2), Segment("newline", 1, 0, newline=True)))
    assert newline_slots(layout, lone=False).tolist() == [2, 5, 7, 9, 11]
    assert newline_slots(layout, lone=True).tolist() == [14]
    plain = TokenLayout.grid("image", 2, 3)
    assert newline_slots(plain, lone=False).tolist() == [] and newline_slots(plain, lone=True).tolist() == []
