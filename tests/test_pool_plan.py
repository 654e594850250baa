"""``pool`` works out each layout's bins once: a second call with an equal layout reuses the plan and gives
the same output, bit for bit; a different layout or budget gets its own plan. Every output is checked against
the plain-Python average-pooling reference of ``test_selection.py`` and, bit for bit, against pooling each
segment on its own with :func:`pool_segment` (what ``pool`` did before it kept plans)."""

from __future__ import annotations

import pytest
import torch

from tokenreduce.core.config import resolve_keep
from tokenreduce.core.layout import Segment, TokenLayout
from tokenreduce.ops.pooling import pool_segment

from .test_selection import LAYOUTS, _context, _features, _method, _sorted_reference, reference_pool


def _per_segment(x, layout, keep):
    """Each segment pooled on its own, its share of the budget computed here."""
    sizes = [s.rows * s.cols for s in layout.segments]
    k = resolve_keep(keep, sum(sizes))
    out = [pool_segment(x[sl], seg, sl.start, max(1, round(k * size / sum(sizes))) if size else 0)
           for seg, sl, size in zip(layout.segments, layout.segment_slices(), sizes)]
    return torch.cat([f for f, _ in out]), torch.cat([s for _, s in out])


def _check(reduction, x, layout, keep, dtype=torch.float32):
    feats, sources = _per_segment(x, layout, keep)
    assert torch.equal(reduction.features, feats) and torch.equal(reduction.sources, sources)
    assert reduction.features.dtype == dtype
    # a fresh, contiguous tensor: writing to it must not touch the encoder's output
    assert reduction.features.is_contiguous() and reduction.features.data_ptr() != x.data_ptr()
    order = reduction.sources.argsort(stable=True)
    ref_src, ref = _sorted_reference(*reference_pool(x.float(), layout, keep))
    assert reduction.sources[order].tolist() == ref_src
    torch.testing.assert_close(reduction.features[order].float(), ref, atol=1e-2 if dtype != torch.float32 else 1e-6,
                               rtol=1e-2 if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_second_call_with_an_equal_layout_reuses_the_plan(layout, dtype):
    lay = LAYOUTS[layout]
    method = _method("pool", keep=0.33)
    x = _features(lay).to(dtype)
    first = method.reduce(x, _context(lay))
    plan = method.plan(lay)
    # an equal layout built anew (as the adapters build one per forward), other features
    again = TokenLayout(lay.modality, tuple(Segment(**vars(s)) for s in lay.segments), image_size=(10, 20))
    y = _features(lay, seed=1).to(dtype)
    second = method.reduce(y, _context(again))
    assert method.plan(again) is plan and len(method._plans) == 1
    _check(first, x, lay, 0.33, dtype)
    _check(second, y, lay, 0.33, dtype)
    repeat = method.reduce(x, _context(again))
    assert torch.equal(repeat.features, first.features) and torch.equal(repeat.sources, first.sources)


def test_a_different_layout_or_budget_gets_its_own_plan():
    method = _method("pool", keep=0.5)
    plans = {}
    for name, lay in LAYOUTS.items():
        x = _features(lay)
        _check(method.reduce(x, _context(lay)), x, lay, 0.5)
        plans[name] = method.plan(lay)
    assert len({id(p) for p in plans.values()}) == len(LAYOUTS) == len(method._plans)
    # same segment kinds, one grid a column wider: not the same plan
    wider = TokenLayout.grid("image", 5, 8)
    x = _features(wider)
    _check(method.reduce(x, _context(wider)), x, wider, 0.5)
    assert method.plan(wider) is not plans["grid"]
    # the same layout at another budget
    method.config.keep = 0.25
    lay = LAYOUTS["anyres"]
    x = _features(lay)
    _check(method.reduce(x, _context(lay)), x, lay, 0.25)
    assert method.plan(lay) is not plans["anyres"]


def test_plans_are_bounded():
    method = _method("pool", keep=1)
    method.max_plans = 3
    layouts = [TokenLayout.grid("image", 2, c) for c in range(1, 6)]
    for lay in layouts:
        method.reduce(_features(lay), _context(lay))
    assert len(method._plans) == 3
    assert [key[0] for key in method._plans] == [lay.segments for lay in layouts[2:]]
