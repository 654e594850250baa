"""Density, budgets and per-crop token choice of ``doc_correlation`` against plain references."""

import math

import pytest
import torch

from tokenreduce.core.layout import Segment, TokenLayout
from tokenreduce.core.reduction import ReduceContext
from tokenreduce.plugins.doc_correlation.density import (
    adaptive_budgets,
    distribute,
    global_budgets,
    information_density,
    redundancy,
)
from tokenreduce.plugins.doc_correlation.method import DocCorrelationConfig, DocCorrelationMethod
from tokenreduce.plugins.doc_correlation.select import choose_tokens, merge_dropped


def _reference_redundancy(x, threshold, bound, centre=False):
    x = x.double()
    if centre:
        x = x - x.mean(-1, keepdim=True)
    x = torch.nn.functional.normalize(x, dim=-1)
    n = x.shape[0]
    redundant = 0
    for i in range(n):
        alike = sum(1 for j in range(n) if j != i and float(x[i] @ x[j]) > threshold)
        redundant += alike > bound
    return redundant / n


def test_density_of_controlled_crops():
    torch.manual_seed(0)
    blank = torch.ones(30, 8) + 1e-3 * torch.randn(30, 8)      # every token alike
    text = torch.randn(30, 8)                                   # tokens differ
    half = torch.cat([blank[:15], text[:15]])
    assert information_density(blank, 0.9, 0.05) == 0.0
    assert information_density(text, 0.9, 0.05) == 1.0
    assert information_density(half, 0.9, 0.05) == pytest.approx(0.5)
    # density falls as more of the crop repeats
    d = [information_density(torch.cat([blank[:k], text[: 30 - k]]), 0.9, 0.05) for k in (0, 10, 20, 30)]
    assert d == sorted(d, reverse=True) and d[0] == 1.0 and d[-1] == 0.0


@pytest.mark.parametrize("metric", ["cosine", "correlation"])
@pytest.mark.parametrize("bound", [0, 3, 0.2])
def test_redundancy_equals_loop_reference(metric, bound):
    torch.manual_seed(1)
    centres = torch.randn(4, 6)
    x = centres[torch.randint(0, 4, (25,))] + 0.3 * torch.randn(25, 6)
    got = float(redundancy(x, 0.7, bound, metric))
    count = bound * 24 if isinstance(bound, float) else bound
    assert got == pytest.approx(_reference_redundancy(x, 0.7, count, centre=metric == "correlation"))


def test_nan_tokens_are_left_out():
    x = torch.randn(6, 4)
    x[2] = float("nan")
    assert float(redundancy(x, 0.99, 0)) == float(redundancy(x[[0, 1, 3, 4, 5]], 0.99, 0))


def test_adaptive_budgets_are_ceil_of_density_times_size():
    assert adaptive_budgets([0.0, 0.25, 0.5, 1.0, 0.01], [16, 16, 7, 9, 100], 1) == [1, 4, 4, 9, 1]
    assert adaptive_budgets([0.0, 0.3], [16, 10], 0) == [0, 3]
    assert adaptive_budgets([0.0], [2], 5) == [2]


def test_distribute_respects_bounds_total_and_proportions():
    assert distribute(10, [1, 1], [0, 0], [10, 10]) == [5, 5]
    assert distribute(12, [3, 1], [0, 0], [100, 100]) == [9, 3]
    # a capped crop passes its share on
    assert distribute(12, [3, 1], [0, 0], [4, 100]) == [4, 8]
    # lower bounds first, totals clamped to what the bounds allow
    assert distribute(2, [1, 0, 0], [1, 1, 1], [5, 5, 5]) == [1, 1, 1]
    assert distribute(100, [1, 1], [0, 0], [3, 4]) == [3, 4]
    # zero weights share by capacity
    assert distribute(6, [0, 0], [0, 0], [2, 4]) == [2, 4]
    torch.manual_seed(2)
    for _ in range(50):
        n = int(torch.randint(1, 6, ()))
        upper = torch.randint(1, 30, (n,)).tolist()
        lower = [int(torch.randint(0, u + 1, ())) for u in upper]
        weights = torch.rand(n).tolist()
        total = int(torch.randint(0, 120, ()))
        k = distribute(total, weights, lower, upper)
        assert sum(k) == min(max(total, sum(lower)), sum(upper))
        assert all(lo <= v <= up for lo, v, up in zip(lower, k, upper))


def test_global_budgets_follow_density():
    k = global_budgets(40, [0.0, 0.5, 1.0], [32, 32, 32], 1)
    assert sum(k) == 40 and k[0] == 1 and k[1] < k[2]
    assert k[2] == pytest.approx(2 * k[1], abs=1)


def test_choose_tokens_keeps_iqr_outliers_then_the_most_probable():
    deep = torch.full((20,), 0.01)
    deep[[3, 11]] = 0.5                       # two global-information tokens
    shallow = torch.arange(20, dtype=torch.float) / 190
    kept, n_global = choose_tokens(deep, shallow, 6, global_tokens=True, iqr_factor=1.5, sampling="topk",
                                   generator=None)
    assert n_global == 2
    assert kept.tolist() == [3, 11, 16, 17, 18, 19]
    kept, n_global = choose_tokens(deep, shallow, 1, global_tokens=True, iqr_factor=1.5, sampling="topk",
                                   generator=None)
    assert kept.tolist() == [3] and n_global == 1   # more outliers than budget: the highest (lower index on ties)
    kept, n_global = choose_tokens(deep, shallow, 3, global_tokens=False, iqr_factor=1.5, sampling="topk",
                                   generator=None)
    assert kept.tolist() == [17, 18, 19] and n_global == 0


def test_sampling_is_seeded_without_replacement_and_follows_the_distribution():
    deep = torch.zeros(40)
    shallow = torch.cat([torch.full((10,), 1.0), torch.full((30,), 1e-4)])

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return choose_tokens(deep, shallow, 8, global_tokens=True, iqr_factor=1.5, sampling="sample",
                             generator=g)[0]

    a, b = draw(0), draw(0)
    assert torch.equal(a, b) and a.numel() == 8 and a.unique().numel() == 8
    assert bool((a[1:] > a[:-1]).all())
    hits = sum(int((draw(s) < 10).sum()) for s in range(20))
    assert hits > 0.9 * 8 * 20            # the heavy tokens are drawn almost always
    assert not all(torch.equal(draw(s), draw(0)) for s in range(1, 6))


def test_merge_dropped_equals_loop_reference():
    torch.manual_seed(3)
    x, sim, w = torch.randn(9, 5), torch.randn(9, 3), torch.rand(9) + 0.1
    kept = torch.tensor([1, 4, 7])
    out, slot = merge_dropped(x, sim, kept, w, "cosine")
    sn = torch.nn.functional.normalize(sim, dim=-1)
    members = {int(k): [int(k)] for k in kept}
    for j in range(9):
        if j in members:
            continue
        best = max(kept.tolist(), key=lambda k: (float(sn[j] @ sn[k]), -k))
        members[best].append(j)
        assert int(slot[j]) == kept.tolist().index(best)
    expected = torch.stack([sum(w[j] * x[j] for j in members[k]) / sum(w[j] for j in members[k]) for k in kept.tolist()])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def _two_crop_layout():
    """A base 3x4 grid then a 3x4 canvas of two 3x2 crops with a newline per row (LLaVA-NeXT style)."""
    segments = (Segment("base", 3, 4), Segment("crop", 3, 4, newline=True, crop_grid=(1, 2)))
    source = [[0, i] for i in range(12)]
    for r in range(3):
        source += [[1 + c // 2, r * 2 + c % 2] for c in range(4)] + [[-1, -1]]
    return TokenLayout("image", segments, extra={"tower_rows": 3, "patch_source": torch.tensor(source)})


def _reference_distinct(x, threshold):
    x = torch.nn.functional.normalize(x.double(), dim=-1)
    n = x.shape[0]
    return [1 - sum(1 for j in range(n) if j != i and float(x[i] @ x[j]) > threshold) / (n - 1) for i in range(n)]


@pytest.mark.parametrize("local_score", ["attention", "distinct"])
@pytest.mark.parametrize("keep", [None, 0.5])
def test_reduce_equals_step_by_step_reference(keep, local_score):
    """The whole per-item reduction (topk sampling) against a plain re-implementation from the signals."""
    torch.manual_seed(4)
    layout = _two_crop_layout()
    n = layout.num_tokens
    feats = torch.randn(n, 6)
    sim = torch.randn(n, 5)
    crop_of = layout.extra["patch_source"][:, 0]
    sim[crop_of == 1] = torch.tensor([1.0, 2, 3, 4, 5]) + 1e-3 * torch.randn(int((crop_of == 1).sum()), 5)  # blank
    deep, shallow = torch.rand(n), torch.rand(n)
    sim[layout.is_newline] = float("nan")
    cfg = DocCorrelationConfig(keep=keep, sampling="topk", threshold=0.9, max_neighbors=1, min_tokens=1,
                               count_newlines=False, local_score=local_score)
    red = DocCorrelationMethod(cfg).reduce(feats, ReduceContext(layout=layout, modality="image", row=0, item=0, signals={
        "similarity": sim, "shallow_attention": shallow, "deep_attention": deep}))
    groups = [[i for i in range(n) if int(crop_of[i]) == c] for c in range(3)]
    dens = []
    for g in groups:
        dens.append(1 - _reference_redundancy(sim[g], 0.9, 1))
    sizes = [len(g) for g in groups]
    if keep is None:
        budgets = [max(1, math.ceil(d * s - 1e-9)) for d, s in zip(dens, sizes)]
    else:
        budgets = global_budgets(round(keep * sum(sizes)), dens, sizes, 1)
    assert dens[1] == 0.0 and budgets[1] == 1 and budgets[0] > 1 and budgets[2] > 1
    expected = []
    for g, k in zip(groups, budgets):
        d = deep[g]
        q1, q3 = torch.quantile(d, 0.25), torch.quantile(d, 0.75)
        glob = [g[i] for i in range(len(g)) if d[i] > q3 + 1.5 * (q3 - q1)]
        glob = sorted(sorted(glob, key=lambda t: (-float(deep[t]), t))[:k])
        score = dict(zip(g, shallow[g].tolist()))
        if local_score == "distinct":  # attention (as a share of the crop's highest) only breaks ties
            top = max(score.values())
            score = {t: dist + score[t] / top / (len(g) + 1) for t, dist in zip(g, _reference_distinct(sim[g], 0.9))}
        rest = sorted([t for t in g if t not in glob], key=lambda t: (-score[t], t))
        expected += glob + rest[: k - len(glob)]
    newlines = [t for t in range(n) if layout.segments[int(layout.segment_ids[t])].newline
                and int(layout.cols[t]) == layout.segments[int(layout.segment_ids[t])].cols]  # every row's slot
    assert red.sources.sort().values.tolist() == sorted(expected + newlines)
    assert [c["budget"] for c in red.info["crops"]] == budgets
    assert [c["density"] for c in red.info["crops"]] == [round(d, 4) for d in dens]
    assert red.info["token_crop"] == [int(c) for c in crop_of]


def test_base_keep_mode_keeps_the_thumbnail_and_counts_it():
    layout = _two_crop_layout()
    n = layout.num_tokens
    signals = {"similarity": torch.randn(n, 5), "shallow_attention": torch.rand(n), "deep_attention": torch.rand(n)}
    ctx = ReduceContext(layout=layout, modality="image", row=0, item=0, signals=signals,
                        generator=torch.Generator().manual_seed(0))
    red = DocCorrelationMethod(DocCorrelationConfig(keep=0.75, base="keep", count_newlines=False)).reduce(
        torch.randn(n, 4), ctx)
    budgets = [c["budget"] for c in red.info["crops"]]
    assert budgets[0] == 12 and sum(budgets) == 18


@pytest.mark.parametrize("keep", [0.2, 0.5, 0.8, 1.0])
def test_newline_slots_are_paid_from_the_budget(keep):
    layout = _two_crop_layout()  # 24 content tokens, 3 newline slots
    n = layout.num_tokens
    signals = {"similarity": torch.randn(n, 5), "shallow_attention": torch.rand(n), "deep_attention": torch.rand(n)}
    ctx = ReduceContext(layout=layout, modality="image", row=0, item=0, signals=signals,
                        generator=torch.Generator().manual_seed(0))
    red = DocCorrelationMethod(DocCorrelationConfig(keep=keep)).reduce(torch.randn(n, 4), ctx)
    assert sum(c["budget"] for c in red.info["crops"]) == max(3, round(keep * 27) - 3)
    assert red.num_tokens == max(3, round(keep * 27) - 3) + 3  # every newline slot stays


@pytest.mark.parametrize("options, message", [
    ({"keep": 0.0}, r"`keep` must be in \(0.0, 1.0\]"),
    ({"similarity": "values"}, r"`similarity` must be one of \('keys', 'keys_mean', 'hidden'\)"),
    ({"metric": "dot"}, r"`metric` must be one of"),
    ({"sampling": "greedy"}, r"`sampling` must be one of \('auto', 'sample', 'topk'\)"),
    ({"max_neighbors": 1.5}, r"`max_neighbors` must be in \[0.0, 1.0\]"),
    ({"max_neighbors": -1}, r"`max_neighbors` must be in \[0, inf\]"),
    ({"base": "drop"}, r"`base` must be one of \('crop', 'keep'\)"),
    ({"merge": 1}, r"`merge` must be a bool"),
    ({"local_score": "cls"}, r"`local_score` must be one of \('auto', 'attention', 'distinct'\)"),
])
def test_config_errors_name_parameter_value_and_accepted(options, message):
    with pytest.raises(ValueError, match=message):
        DocCorrelationConfig(**options)


def test_auto_local_score_follows_the_tower():
    """``auto`` picks by attention on a tower with [CLS], by distinctiveness (top-k) on one without (SigLIP)."""
    torch.manual_seed(5)
    layout = _two_crop_layout()
    n = layout.num_tokens
    sim = torch.randn(n, 5)
    sim[:6] = torch.tensor([1.0, 2, 3, 4, 5])  # half the base crop alike: low distinctiveness, high attention
    shallow = torch.rand(n)
    shallow[:6] += 10
    signals = {"similarity": sim, "shallow_attention": shallow, "deep_attention": torch.zeros(n)}
    kept = {}
    for prefix in (1, 0):
        for sampling in ("topk", "auto"):
            method = DocCorrelationMethod(DocCorrelationConfig(keep=0.5, sampling=sampling, global_tokens=False,
                                                               min_tokens=1, count_newlines=False))
            q = k = torch.randn(1, 2, 12 + prefix, 4)
            method.tower_signals({1: q, -2: q}, {1: k, -2: k}, 0.5, num_prefix=prefix)
            ctx = ReduceContext(layout=layout, modality="image", row=0, item=0, signals=signals,
                                generator=torch.Generator().manual_seed(0))
            kept[prefix, sampling] = set(method.reduce(torch.randn(n, 4), ctx).sources.tolist())
    assert kept[0, "auto"] == kept[0, "topk"]  # without [CLS], auto sampling is top-k of distinctiveness
    kept = {p: kept[p, "topk"] for p in (1, 0)}
    base = [kept[p] & set(range(12)) for p in (1, 0)]
    assert base[0] and base[0] <= set(range(6))    # attention: the thumbnail keeps only the alike half
    assert base[1] and len(base[1] & set(range(6))) <= 1  # distinctiveness: the distinct half (an alike one on a tie)
