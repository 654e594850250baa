"""Layouts read off each family match the tokens its encoder really produces."""

import pytest
import torch

from tokenreduce.adapters import get_adapter
from tokenreduce.core.layout import Segment, TokenLayout
from tokenreduce.core.reduction import ReduceContext
from tokenreduce.ops.pooling import pooled_grid
from tokenreduce.plugins.baselines.pool import PoolConfig, PoolMethod
from tokenreduce.testing.tiny import FAMILIES, RowSpec, default_rows, tiny_batch, tiny_model

from .reference import encoder_features


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_counts_and_newline_slots(family):
    model = tiny_model(family)
    batch = tiny_batch(model, default_rows(family, video=True))
    adapter = get_adapter(model)
    for modality in adapter.modalities:
        feats = encoder_features(model, modality, batch)
        layouts = adapter.layouts(modality, batch, [f.shape[0] for f in feats])
        assert [lay.num_tokens for lay in layouts] == [f.shape[0] for f in feats]
        if family in ("llava", "qwen2_vl", "qwen2_5_vl"):  # layouts read from the config alone (anyres: the model)
            from_config = type(adapter).from_config(model.config)  # as serving engines build it
            assert from_config.layouts(modality, batch, [f.shape[0] for f in feats]) == layouts
        newline = getattr(model.model, "image_newline", None)
        for f, lay in zip(feats, layouts):
            if newline is not None and lay.is_newline.any():
                torch.testing.assert_close(f[lay.is_newline], newline.expand(int(lay.is_newline.sum()), -1))
                assert not torch.isclose(f[~lay.is_newline], newline).all(-1).any()


def test_llava_next_anyres_layout_has_base_and_canvas():
    model = tiny_model("llava_next")
    batch = tiny_batch(model, [RowSpec(images=[(40, 60)])])
    (layout,) = get_adapter(model).layouts("image", batch)
    kinds = [s.kind for s in layout.segments]
    assert kinds == ["base", "crop"]
    base, canvas = layout.segments
    assert (base.rows, base.cols) == (2, 2)
    # 40x60 picks the 56x56 pinpoint: 2x2 crops, a 4x4 canvas, unpadded to 2 rows of 4, one newline per row
    assert canvas.newline and canvas.crop_grid == (2, 2)
    assert (canvas.rows, canvas.cols) == (2, 4)
    assert layout.num_tokens == 4 + 2 * 5


def test_layout_arrays():
    layout = TokenLayout("image", (Segment("base", 2, 2), Segment("crop", 2, 3, newline=True)))
    assert layout.num_tokens == 4 + 8
    assert layout.segment_ids.tolist() == [0] * 4 + [1] * 8
    assert layout.rows.tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1]
    assert layout.cols.tolist() == [0, 1, 0, 1, 0, 1, 2, 3, 0, 1, 2, 3]
    assert layout.is_newline.nonzero().flatten().tolist() == [7, 11]
    assert [s.start for s in layout.segment_slices()] == [0, 4]


def test_pool_is_average_of_cells_and_keeps_one_newline_per_pooled_row():
    layout = TokenLayout("image", (Segment("base", 4, 4), Segment("crop", 4, 4, newline=True)))
    x = torch.arange(layout.num_tokens, dtype=torch.float32)[:, None].repeat(1, 3)
    red = PoolMethod(PoolConfig(keep=8)).reduce(x, ReduceContext(layout=layout, modality="image", row=0, item=0))
    src, feats = red.sources, red.features
    # each 4x4 grid is pooled to 2x2; the canvas keeps a newline after each of its 2 pooled rows
    assert src.numel() == 4 + 4 + 2
    torch.testing.assert_close(feats[0], x[[0, 1, 4, 5]].mean(0))
    newline_rows = layout.is_newline[src]
    assert newline_rows.sum() == 2
    assert bool((src[1:] > src[:-1]).all())


@pytest.mark.parametrize("rows, cols, target, expected", [(24, 24, 144, (12, 12)), (24, 24, 64, (8, 8)),
                                                          (2, 8, 4, (1, 4)), (5, 5, 1, (1, 1)), (3, 3, 100, (3, 3))])
def test_pooled_grid(rows, cols, target, expected):
    assert pooled_grid(rows, cols, target) == expected
