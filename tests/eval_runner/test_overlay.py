"""Token layout -> pixel mapping (one function, every layout kind) and the overlay pictures."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tokenreduce.core.layout import Segment, TokenLayout
from tokenreduce.eval.overlay import fit_for, layout_from_dict, layout_to_dict, render_item, token_boxes


def test_single_grid_center_crop_pad_and_stretch():
    layout = TokenLayout.grid("image", 4, 4)
    size = (100, 200)  # height, width
    crop = token_boxes(layout, size, "center_crop")
    np.testing.assert_allclose(crop[0], [0, 50, 0, 75, 25])
    np.testing.assert_allclose(crop[15], [0, 125, 75, 150, 100])
    pad = token_boxes(layout, size, "pad")  # padded to 200 x 200, image in rows 50..150 of the canvas
    assert np.isnan(pad[0]).all() and np.isnan(pad[15]).all()  # padding rows have no pixels
    np.testing.assert_allclose(pad[4], [0, 0, 0, 50, 50])
    np.testing.assert_allclose(pad[11], [0, 150, 50, 200, 100])
    stretch = token_boxes(layout, size, "stretch")
    np.testing.assert_allclose(stretch[5], [0, 50, 25, 100, 50])
    with pytest.raises(ValueError, match="fit"):
        token_boxes(layout, size, "zoom")


def test_cls_token_and_newline_slots_have_no_area():
    layout = TokenLayout("image", (Segment("cls", 1, 1), Segment("base", 2, 2)))
    boxes = token_boxes(layout, (20, 20), "stretch")
    assert np.isnan(boxes[0]).all() and not np.isnan(boxes[1:]).any()
    np.testing.assert_allclose(boxes[1], [0, 0, 0, 10, 10])


def test_anyres_base_and_unpadded_canvas_cover_the_whole_image():
    layout = TokenLayout("image", (Segment("base", 2, 2), Segment("crop", 3, 4, newline=True, crop_grid=(1, 2))))
    boxes = token_boxes(layout, (90, 120), "center_crop")  # fit does not apply to anyres grids
    np.testing.assert_allclose(boxes[0], [0, 0, 0, 60, 45])
    np.testing.assert_allclose(boxes[4], [0, 0, 0, 30, 30])  # canvas row 0, col 0
    assert np.isnan(boxes[8]).all()  # the newline slot after canvas row 0
    np.testing.assert_allclose(boxes[4 + 2 * 5 + 3], [0, 90, 60, 120, 90])  # canvas row 2, col 3


def test_video_frames_carry_their_time():
    frames = [Segment("frame", 2, 2, time=t) for t in range(3)]
    layout = TokenLayout("video", (*frames, Segment("newline", 1, 0, newline=True, time=2)))
    boxes = token_boxes(layout, (8, 8), "stretch")
    assert boxes[:, 0][:12].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert np.isnan(boxes[12]).all()
    assert layout_from_dict(layout_to_dict(layout)) == layout


def test_real_anyres_layouts_of_llava_next_map_onto_the_image():
    from tokenreduce.adapters import get_adapter
    from tokenreduce.testing.tiny import default_rows, tiny_batch, tiny_model

    model = tiny_model("llava_next", num_layers=1)
    batch = tiny_batch(model, default_rows("llava_next"))
    adapter = get_adapter(model)
    counts = [int(f.shape[0]) for f in adapter.encode("image", batch)]
    layouts = adapter.layouts("image", batch, counts)
    assert any(s.kind == "crop" for lay in layouts for s in lay.segments)
    for layout in layouts:
        h, w = layout.image_size
        boxes = token_boxes(layout, (h, w), "stretch")
        newline = layout.is_newline.numpy()
        assert np.isnan(boxes[newline]).all() and not np.isnan(boxes[~newline]).any()
        areas = (boxes[:, 3] - boxes[:, 1]) * (boxes[:, 4] - boxes[:, 2])
        for seg, sl in zip(layout.segments, layout.segment_slices()):
            if seg.cols:  # every grid tiles the whole image exactly once
                assert np.nansum(areas[sl]) == pytest.approx(h * w)


def test_render_marks_kept_dropped_and_merged_tokens():
    image = Image.new("RGB", (64, 64), "white")
    item = {"layout": TokenLayout.grid("image", 2, 2), "sources": [0]}
    pic = np.asarray(render_item(item, image=image, fit="stretch", side=64))
    title = 14
    assert pic[title + 16, 16].mean() > 240     # kept token: untouched
    assert pic[title + 48, 48].mean() < 120     # dropped token: dimmed
    merged = {"layout": layout_to_dict(TokenLayout.grid("image", 2, 2)), "sources": [0, 3],
              "assignment": [0, 0, 1, -1]}
    pic = np.asarray(render_item(merged, image=image, fit="stretch", side=64))
    tinted = pic[title + 16, 48]
    assert tinted.std() > 10 and tinted.mean() > 120  # coloured by its slot, not dimmed
    staged = render_item(item, image=image, fit="stretch", layers={"2": [0], "1": [0, 1]}, side=64)
    assert staged.size == (64, 3 * (64 + title))  # one row per stage: input, layer 1, layer 2
    anyres = {"layout": TokenLayout("image", (Segment("base", 2, 2), Segment("crop", 2, 4, newline=True))),
              "sources": list(range(14))}
    assert render_item(anyres, image=image, side=64).size == (128, 64 + title)  # base | canvas panels
    clip = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    video = {"layout": TokenLayout("video", tuple(Segment("frame", 2, 2, time=t) for t in range(2))), "sources": [0]}
    assert render_item(video, video=clip, side=32).size == (64, 32 + title)
    with pytest.raises(ValueError, match="video"):
        render_item(video, image=image)


def test_fit_follows_the_processor():
    from tokenreduce.testing.tiny import tiny_processor

    assert fit_for(tiny_processor("llava"), "llava", "image") == "center_crop"
    assert fit_for(tiny_processor("qwen2_vl"), "qwen2_vl", "video") == "stretch"
    assert fit_for(None, "llava_next", "image") == "stretch"


def test_counts_skip_newline_slots_and_video_frames_form_a_grid():
    from tokenreduce.eval.overlay import visual_slots

    layout = TokenLayout("image", (Segment("cls", 1, 1), Segment("base", 2, 3, newline=True)))
    # cls, then rows of 3 tokens + 1 newline slot
    assert visual_slots(layout).tolist() == [False, True, True, True, False, True, True, True, False]
    frames = 9
    clip = np.zeros((frames, 32, 32, 3), dtype=np.uint8)
    video = {"layout": TokenLayout("video", tuple(Segment("frame", 2, 2, time=t) for t in range(frames))),
             "sources": [0]}
    sheet = render_item(video, video=clip, side=320)
    side = max(120, 320 * 5 // (2 * 3))  # 9 frames: a 3 x 3 grid of smaller panels
    assert sheet.size == (3 * side, 3 * (side + 14))


def test_merge_groups_leave_the_image_visible():
    """A token merged with others is tinted lightly (alpha 45 of 255 over the image) and outlined, not painted
    over; a dropped one is dimmed."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    merged = {"layout": TokenLayout.grid("image", 2, 2), "sources": [0, 3], "assignment": [0, 0, 1, -1]}
    pic = np.asarray(render_item(merged, image=Image.fromarray(pixels), side=64)).astype(float)[14:]
    inner = (slice(4, 28), slice(36, 60))  # token 1 (merged into slot 0), away from its outline
    assert np.abs(pic[inner] - pixels[inner]).mean() < 255 * 45 / 255 + 1
    dropped = (slice(36, 60), slice(36, 60))  # token 3
    assert pic[dropped].mean() < 0.5 * pixels[dropped].mean()


def test_header_names_question_answer_prediction_and_captions():
    from tokenreduce.eval.overlay import record_header
    from tokenreduce.eval.sample import Sample

    sample = Sample(id="s0", task="t", modality="video", question="which way?", answer="up")
    record = {"model": "m", "method": "langdc", "budget": 0.25, "sample_id": "s0", "answer": "up",
              "prediction": "down", "score": 0.0}
    item = {"info": {"captions": ["a cross", "it moves up"], "segments": [[0, 3], [4, 7]], "caption_tokens": [2, 3]}}
    assert record_header(record, sample, item) == [
        "langdc @ 25% on m | sample s0", "Q: which way?", "answer: up | predicted: down (score 0)",
        "caption, frames 0-3 (2 tok): a cross", "caption, frames 4-7 (3 tok): it moves up",
    ]
