"""``PoolPlan`` on layouts the adapters' usual ones do not cover: newline-bearing grids followed by other
segments, a lone newline between grids, one grid with newlines, two grids without, a lone newline alone.

Each output is compared, in output order, with the plain-Python average-pooling reference of
``test_selection.py`` (every segment's cells row by row, a kept newline after each pooled row); the
segment offsets and newline interleaving are what the plan works out once, so a layout where they are not
trivial is what shows an off-by-a-segment mistake.
"""

from __future__ import annotations

import pytest
import torch

from tokenreduce.core.layout import Segment, TokenLayout
from tokenreduce.ops.pooling import PoolPlan

from .test_selection import _budget_count, reference_pool

LAYOUTS = {
    # two newline grids in a row, then one without: the second grid's cells start after the first's
    # pooled cells and newline slots
    "newline_grids": TokenLayout("image", (Segment("crop", 4, 6, newline=True), Segment("crop", 3, 5, newline=True),
                                           Segment("frame", 2, 3))),
    # a lone newline between grids, the grid after it with newlines
    "lone_between": TokenLayout("video", (Segment("frame", 3, 4, newline=True), Segment("newline", 1, 0, newline=True),
                                          Segment("frame", 2, 5, newline=True), Segment("newline", 1, 0, newline=True))),
    "lone_first": TokenLayout("video", (Segment("newline", 1, 0, newline=True), Segment("frame", 3, 3),
                                        Segment("frame", 2, 4))),
    "one_grid_with_newlines": TokenLayout("image", (Segment("base", 5, 4, newline=True),)),
    "two_grids": TokenLayout("image", (Segment("base", 3, 3), Segment("crop", 4, 4))),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("keep", [1, 5, 7, 0.3, 1.0])
def test_plan_output_order_equals_reference(name, keep):
    layout = LAYOUTS[name]
    x = torch.randn(layout.num_tokens, 6, generator=torch.Generator().manual_seed(3))
    content = sum(s.rows * s.cols for s in layout.segments)
    plan = PoolPlan(layout, _budget_count(keep, content))
    features, sources = plan.apply(x)
    ref_sources, ref = reference_pool(x, layout, keep)
    assert sources.tolist() == ref_sources
    torch.testing.assert_close(features, ref, atol=1e-6, rtol=1e-5)
    assert features.data_ptr() != x.data_ptr()


def test_lone_newline_alone_is_copied():
    layout = TokenLayout("video", (Segment("newline", 1, 0, newline=True),))
    x = torch.randn(1, 4)
    plan = PoolPlan(layout, 1)
    features, sources = plan.apply(x)
    assert sources.tolist() == [0] and torch.equal(features, x)
    # a fresh tensor, not a view of the encoder's output
    x.add_(1.0)
    assert not torch.equal(features, x)
