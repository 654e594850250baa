"""Projector-stage selections against references written from each method's definition.

The references below are plain Python over the layout's segments (no tokenreduce arithmetic): ``pool``
averages the cells of an adaptive-pooling grid and places each pooled token at its cell's centre,
``random`` draws ``randperm`` with the item's seed, ``divprune`` is the greedy max-min selection under
cosine distance. Layouts cover a single grid, an anyres image (base grid + canvas with newline slots), a
video (frames + a lone trailing newline) and a flat row; budgets that do not divide the token counts.
:func:`reference_reducer` plugs them into the end-to-end oracles of ``test_projector_stage.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from tokenreduce.core.layout import Segment, TokenLayout
from tokenreduce.core.reduction import ReduceContext, Reduction
from tokenreduce.core.registry import get_method, method_specs

LAYOUTS = {
    "grid": TokenLayout.grid("image", 5, 7),
    "anyres": TokenLayout("image", (Segment("base", 3, 3), Segment("crop", 4, 6, newline=True))),
    "video": TokenLayout("video", (Segment("frame", 3, 4, time=0), Segment("frame", 3, 4, time=1),
                                   Segment("newline", 1, 0, newline=True))),
    "flat": TokenLayout.flat("image", 13),
}
BUDGETS = [1, 5, 0.1, 0.33, 0.5, 0.77, 1.0]


def _budget_count(keep, total):
    """Tokens a budget means: an int as is, a float the share of ``total`` rounded up; within [1, total]."""
    count = keep if isinstance(keep, int) else math.ceil(round(keep * total, 6))
    return max(1, min(total, count))


def _segments(layout):
    """Per segment: (segment, first token index)."""
    out, start = [], 0
    for seg in layout.segments:
        out.append((seg, start))
        start += seg.rows * (seg.cols + int(seg.newline))
    return out


# ----- pool ---------------------------------------------------------------------------------------------
def reference_pool(x, layout, keep):
    segs = _segments(layout)
    total = sum(s.rows * s.cols for s, _ in segs)
    k = _budget_count(keep, total)
    feats, sources = [], []
    for seg, start in segs:
        width = seg.cols + int(seg.newline)
        if seg.cols == 0:  # a lone newline slot stays
            feats.append(x[start])
            sources.append(start)
            continue
        size = seg.rows * seg.cols
        target = min(size, max(1, round(k * size / total)))
        # the pooled grid keeps the segment's aspect ratio
        h = min(seg.rows, max(1, round(seg.rows * math.sqrt(target / size))))
        w = min(seg.cols, max(1, round(target / h)))
        for i in range(h):
            r0, r1 = (i * seg.rows) // h, -((-(i + 1) * seg.rows) // h)
            for j in range(w):
                c0, c1 = (j * seg.cols) // w, -((-(j + 1) * seg.cols) // w)
                cell = [x[start + r * width + c] for r in range(r0, r1) for c in range(c0, c1)]
                feats.append(torch.stack(cell).mean(0))
                sources.append(start + ((r0 + r1 - 1) // 2) * width + (c0 + c1 - 1) // 2)
            if seg.newline:
                centre = start + ((r0 + r1 - 1) // 2) * width + seg.cols
                feats.append(x[centre])
                sources.append(centre)
    return sources, torch.stack(feats)


# ----- random -------------------------------------------------------------------------------------------
def reference_random(x, layout, keep, seed):
    n = x.shape[0]
    k = _budget_count(keep, n)
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist()
    return sorted(chosen), x[sorted(chosen)]


# ----- divprune -----------------------------------------------------------------------------------------
def _lone_newlines(layout):
    """Slots of the lone newline segments (a video's trailing separator)."""
    return [start for seg, start in _segments(layout) if seg.cols == 0 and seg.newline]


def _all_newlines(layout):
    """Every newline slot: the one ending each canvas row and the lone ones."""
    out = []
    for seg, start in _segments(layout):
        if seg.newline:
            width = seg.cols + 1
            out += [start + r * width + seg.cols for r in range(seg.rows)] if seg.cols else [start]
    return out


def reference_divprune(x, layout, keep):
    # every slot but the lone newlines is a candidate: canvas rows' newline slots compete and count in N
    lone = _lone_newlines(layout)
    candidates = [i for i in range(x.shape[0]) if i not in lone]
    k = _budget_count(keep, len(candidates))
    v = [x[i].double() / x[i].double().norm() for i in candidates]
    n = len(candidates)

    def dist(a, b):
        return 1.0 - float(v[a] @ v[b])

    if k >= n:
        chosen = list(range(n))
    else:
        nearest = [min(dist(i, j) for j in range(n) if j != i) for i in range(n)]
        chosen = [max(range(n), key=lambda i: (nearest[i], -i))]
        while len(chosen) < k:
            rest = [i for i in range(n) if i not in chosen]
            chosen.append(max(rest, key=lambda i: (min(dist(i, c) for c in chosen), -i)))
    kept = sorted(candidates[i] for i in chosen)
    return kept + lone, torch.stack([x[i] for i in kept + lone])


# ----- cdpruner -----------------------------------------------------------------------------------------
def reference_cdpruner(x, layout, keep, text=None, theta=1.0):
    """The official CDPruner on the content tokens: kernel ``L = r r^T * cos`` built whole, relevance the
    min-max normalised mean negated cosine to the text tokens (``exp(theta / (2 (1 - theta)) r)`` below 1),
    and the official greedy MAP loop (Cholesky rows ``cis``, gains ``di2s``) in float64; a gain under 1e-5 of
    the largest diagonal entry is zero (the chosen tokens span it), ties to the lower token."""
    content = []
    for seg, start in _segments(layout):
        width = seg.cols + int(seg.newline)
        content += [start + r * width + c for r in range(seg.rows) for c in range(seg.cols)]
    k = _budget_count(keep, len(content))
    unit = torch.stack([x[i].double() / x[i].double().norm() for i in content])
    if text is None or text.shape[0] == 0:
        rel = torch.ones(len(content), dtype=torch.float64)
    else:
        t = text.double() / text.double().norm(dim=-1, keepdim=True)
        rel = -(unit @ t.T).mean(-1)
        rel = (rel - rel.min() + 1e-6) / (rel.max() - rel.min())
        if theta < 1:
            rel = torch.exp(theta / (2 * (1 - theta)) * rel)
    kernel = rel[:, None] * (unit @ unit.T) * rel[None]
    cis = torch.zeros(k, len(content), dtype=torch.float64)
    di2s = rel * rel  # the diagonal: a token's cosine with itself is 1
    chosen = []
    floor = float(kernel.diagonal().max()) * 1e-5
    for i in range(k):
        gains = [(float(g) if float(g) > floor else 0.0) if n not in chosen else -1.0 for n, g in enumerate(di2s)]
        j = max(range(len(gains)), key=lambda n: (gains[n], -n))
        chosen.append(j)
        eis = (kernel[j] - cis[:i, j] @ cis[:i]) / math.sqrt(max(float(di2s[j]), floor))
        cis[i] = eis
        di2s -= eis**2
        di2s[j] = -math.inf
    kept = sorted(content[i] for i in chosen)
    slots = _all_newlines(layout)
    return kept + slots, torch.stack([x[i] for i in kept + slots])


# ----- evs ------------------------------------------------------------------------------------------------
def reference_evs(x, layout, keep, reference=False):
    """vLLM's EVS on the layout's frames: every first-frame token first, then the others by ``1 - cos`` with the
    token at the same place one frame earlier (ties to the earlier token); ``max(frame, count)`` kept, the
    count ``ceil(keep * N)`` (``int(N * keep)`` for the reference variant). Lone newline slots stay."""
    frames = [[start + r * (seg.cols + int(seg.newline)) + c for r in range(seg.rows) for c in range(seg.cols)]
              for seg, start in _segments(layout) if seg.cols]
    total, size = sum(len(f) for f in frames), len(frames[0])
    count = int(total * keep) if reference and isinstance(keep, float) else _budget_count(keep, total)
    count = max(size, count)
    scored = []
    for t, frame in enumerate(frames):
        for p, token in enumerate(frame):
            if t == 0:
                score = 255.0
            else:
                a, b = x[token].double(), x[frames[t - 1][p]].double()
                score = 1 - float(a @ b / (a.norm() * b.norm()))
            scored.append((-score, t * size + p, token))
    kept = sorted(token for _, _, token in sorted(scored)[:count])
    slots = _lone_newlines(layout)
    return kept + slots, torch.stack([x[i] for i in kept + slots])


def _method(name, **options):
    spec = get_method(name)
    return spec.method_cls(spec.config_cls(**options))


def _context(layout, seed=None):
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return ReduceContext(layout=layout, modality=layout.modality, row=0, item=0, generator=gen)


def _features(layout, seed=0):
    return torch.randn(layout.num_tokens, 8, generator=torch.Generator().manual_seed(seed))


def _as_set(reduction: Reduction, x):
    out = reduction.output_features(x)
    order = reduction.sources.argsort(stable=True)
    return reduction.sources[order].tolist(), out[order]


def _sorted_reference(sources, feats):
    order = sorted(range(len(sources)), key=lambda i: sources[i])
    return [sources[i] for i in order], feats[order]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("keep", BUDGETS)
def test_pool_equals_average_pooling_reference(layout, keep):
    lay = LAYOUTS[layout]
    x = _features(lay)
    got_src, got = _as_set(_method("pool", keep=keep).reduce(x, _context(lay)), x)
    ref_src, ref = _sorted_reference(*reference_pool(x, lay, keep))
    assert got_src == ref_src
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("keep", BUDGETS)
@pytest.mark.parametrize("seed", [0, 7])
def test_random_equals_seeded_permutation(layout, keep, seed):
    lay = LAYOUTS[layout]
    x = _features(lay)
    got_src, got = _as_set(_method("random", keep=keep, seed=seed).reduce(x, _context(lay, seed)), x)
    ref_src, ref = reference_random(x, lay, keep, seed)
    assert got_src == ref_src
    assert torch.equal(got, ref)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("keep", BUDGETS)
def test_divprune_equals_greedy_max_min(layout, keep):
    lay = LAYOUTS[layout]
    x = _features(lay, seed=3)
    reduction = _method("divprune", keep=keep).reduce(x, _context(lay))
    got_src, got = _as_set(reduction, x)
    ref_src, ref = _sorted_reference(*reference_divprune(x, lay, keep))
    assert got_src == ref_src
    assert torch.equal(got, ref)
    # every kept token went to its own output slot; dropped tokens to none
    slot = {s: i for i, s in enumerate(reduction.sources.tolist())}
    assert reduction.assignment.tolist() == [slot.get(t, -1) for t in range(lay.num_tokens)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("keep", BUDGETS)
@pytest.mark.parametrize("theta", [1.0, 0.5, 0.25, None], ids=["theta1", "theta0.5", "theta0.25", "no-text"])
def test_cdpruner_equals_the_official_greedy_map(layout, keep, theta):
    lay = LAYOUTS[layout]
    x = _features(lay, seed=5)
    row = torch.randn(8, 8, generator=torch.Generator().manual_seed(9))
    mask = torch.tensor([True, True, False, True, True, False, True, True])  # padding / placeholders at 2, 5
    context = ReduceContext(layout=lay, modality=lay.modality, row=0, item=0)
    if theta is not None:
        context = ReduceContext(layout=lay, modality=lay.modality, row=0, item=0, text_embeds=row, text_mask=mask)
    reduction = _method("cdpruner", keep=keep, theta=theta or 1.0).reduce(x, context)
    got_src, got = _as_set(reduction, x)
    text = None if theta is None else row[mask]
    ref_src, ref = _sorted_reference(*reference_cdpruner(x, lay, keep, text, theta or 1.0))
    assert got_src == ref_src
    assert torch.equal(got, ref)
    slot = {s: i for i, s in enumerate(reduction.sources.tolist())}
    assert reduction.assignment.tolist() == [slot.get(t, -1) for t in range(lay.num_tokens)]


def test_cdpruner_relevance_changes_the_choice():
    """Two near-duplicate pairs; the text points at the second pair's direction, which the official score
    negates: with one token kept, the relevance weighting decides which pair it comes from."""
    x = torch.tensor([[1.0, 0.0], [0.99, 0.05], [0.0, 1.0], [0.05, 0.99]])
    lay = TokenLayout.flat("image", 4)
    text, mask = torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([True, False])

    def kept(text):
        context = ReduceContext(layout=lay, modality="image", row=0, item=0, text_embeds=text, text_mask=mask)
        return _method("cdpruner", keep=1).reduce(x, context).sources.tolist()

    assert kept(text) == [0]  # least similar to the (unmasked) text: largest negated similarity
    assert kept(-text) == [2]
    assert kept(text.masked_fill(~mask[:, None], 0.0)) == [0]  # the masked column never counted
    assert _method("cdpruner", keep=1).reduce(x, _context(lay)).sources.tolist() == [0]  # no text: first tie
    no_text = ReduceContext(layout=lay, modality="image", row=0, item=0, text_embeds=text,
                             text_mask=torch.zeros(2, dtype=torch.bool))
    assert _method("cdpruner", keep=1).reduce(x, no_text).sources.tolist() == [0]


VIDEO_LAYOUTS = {
    "video": LAYOUTS["video"],
    "qwen": TokenLayout("video", tuple(Segment("frame", 2, 3, time=t) for t in range(4))),
    "one-frame": TokenLayout("video", (Segment("frame", 4, 4, time=0),)),
}


@pytest.mark.parametrize("layout", list(VIDEO_LAYOUTS))
@pytest.mark.parametrize("keep", BUDGETS)
@pytest.mark.parametrize("variant", ["default", "reference"])
def test_evs_equals_the_temporal_change_reference(layout, keep, variant):
    lay = VIDEO_LAYOUTS[layout]
    x = _features(lay, seed=11)
    x[6] = x[0] * 3  # a token that did not change (up to scale) since the previous frame
    reduction = _method("evs", keep=keep, variant=variant).reduce(x, _context(lay))
    got_src, got = _as_set(reduction, x)
    ref_src, ref = _sorted_reference(*reference_evs(x, lay, keep, variant == "reference"))
    assert got_src == ref_src
    assert torch.equal(got, ref)


def test_evs_keeps_the_first_frame_and_the_changed_tokens():
    """Two frames of 4 tokens, the second equal to the first but at one place: one token beyond the first
    frame is kept, the changed one."""
    first = torch.eye(4, 8)
    second = first.clone()
    second[2] = torch.ones(8)
    lay = TokenLayout("video", (Segment("frame", 2, 2, time=0), Segment("frame", 2, 2, time=1)))
    got = _method("evs", keep=5).reduce(torch.cat([first, second]), _context(lay)).sources.tolist()
    assert sorted(got) == [0, 1, 2, 3, 6]


def test_divprune_first_pick_is_the_most_isolated_token():
    """Four tokens: three close together and one apart; two kept: the isolated one first, then the one of
    the cluster farthest from it."""
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.95, -0.05]])
    lay = TokenLayout.flat("image", 4)
    got = _method("divprune", keep=2).reduce(x, _context(lay)).sources.tolist()
    assert sorted(got) == [2, 3]


class _ReferenceMethod:
    """A stand-in with ``reduce`` for :func:`tests.reference.reduced_rows`, built on the references above."""

    def __init__(self, name, config):
        self.name, self.config = name, config
        self.uses_text = get_method(name).method_cls.uses_text

    def reduce(self, features, context):
        keep = self.config.keep
        if self.name == "pool":
            src, feats = reference_pool(features, context.layout, keep)
        elif self.name == "random":
            src, feats = reference_random(features, context.layout, keep, self.config.seed)
        elif self.name == "evs":
            src, feats = reference_evs(features, context.layout, keep, self.config.variant == "reference")
        elif self.name == "cdpruner":
            text = None if context.text_embeds is None else context.text_embeds[context.text_mask]
            src, feats = reference_cdpruner(features, context.layout, keep, text, self.config.theta)
        else:
            src, feats = reference_divprune(features, context.layout, keep)
        return Reduction(sources=torch.as_tensor(src, dtype=torch.long), features=feats.to(features.dtype))


REFERENCE_METHODS = ("pool", "random", "divprune", "cdpruner", "evs")


def reference_reducer(name, config):
    """The plain reference of method ``name`` with ``config``, or None when this file has none."""
    return _ReferenceMethod(name, config) if name in REFERENCE_METHODS else None


SCALAR_KEEP = [s.name for s in method_specs()
               if isinstance(getattr(s.config_cls(), "keep", None), (int, float))
               and not isinstance(getattr(s.config_cls(), "keep", None), bool)]


@pytest.mark.parametrize("name", SCALAR_KEEP)
def test_bad_keep_is_named_in_the_error(name):
    with pytest.raises(ValueError, match=r"^`keep` as a token count must be >= 1, got 0$"):
        get_method(name).config_cls(keep=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pool_keeps_the_feature_dtype(dtype):
    lay = LAYOUTS["anyres"]
    x = _features(lay).to(dtype)
    reduction = _method("pool", keep=0.33).reduce(x, _context(lay))
    got_src, got = _as_set(reduction, x)
    ref_src, ref = _sorted_reference(*reference_pool(x.float(), lay, 0.33))
    assert got.dtype == dtype
    assert got_src == ref_src
    torch.testing.assert_close(got, ref.to(dtype))


@pytest.mark.parametrize("value, n, expected", [(0.3, 7, 2), (0.45, 7, 3), (0.7, 9, 6), (0.99, 3, 3), (5, 3, 3), (2, 9, 2)])
def test_per_group_count_of_the_tower_methods(value, n, expected):
    """VisionZip / PruMerge per-crop counts: a float is the nearest whole share of ``n``, an int is capped."""
    from tokenreduce.ops.vision import count

    assert count(value, n) == expected


@pytest.mark.parametrize("k", [2, 3])
def test_divprune_never_picks_a_token_twice(k):
    """Identical tokens are all at distance 0 from each other: the greedy still takes distinct ones, in order."""
    x = torch.ones(4, 8)
    reduction = _method("divprune", keep=k).reduce(x, _context(TokenLayout.flat("image", 4)))
    assert reduction.sources.tolist() == list(range(k))
