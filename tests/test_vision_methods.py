"""ToMe, VisionZip and PruMerge step by step: configs, schedules at budgets that do not divide, the official
orders, and the selections' edge cases, each against a plain-Python re-derivation of the method's definition
(issue #36; tests/test_vision_stage.py holds the main oracles)."""

import math

import pytest
import torch

from tokenreduce.core.registry import get_method
from tokenreduce.plugins.baselines.prumerge import (
    PruMergeConfig,
    first_true,
    group_counts,
    prumerge_group,
    prumerge_reference,
    uniform_fill,
)
from tokenreduce.plugins.baselines.tome import (
    ToMeConfig,
    ToMeProjectorConfig,
    merge_schedule,
    merge_step,
    merge_tokens,
    reference_permutation,
)
from tokenreduce.plugins.baselines.visionzip import VisionZipConfig, visionzip_reference, visionzip_select


def _unit(v):
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _cos(a, b):
    return float(_unit(a) @ _unit(b))


# ----- ToMe -------------------------------------------------------------------------------------------------
def test_tome_config():
    assert ToMeConfig().r == 16 and ToMeConfig().keep is None
    assert ToMeConfig(r=0).r == 0  # falsy: no merging, not the default
    assert ToMeConfig(keep=1.0).r is None
    with pytest.raises(ValueError) as error:
        ToMeConfig(r=4, keep=0.5)
    assert str(error.value) == "set one of `r` and `keep`, not both; got r=4, keep=0.5"
    for bad in (dict(r=-1), dict(r=2.5), dict(keep=0.0), dict(keep=1.5), dict(variant="official")):
        with pytest.raises(ValueError, match=f"`{next(iter(bad))}`"):
            ToMeConfig(**bad)
    assert ToMeProjectorConfig(keep=3).keep == 3
    for bad in (dict(keep=0), dict(keep=0.0), dict(variant="x")):
        with pytest.raises(ValueError, match=f"`{next(iter(bad))}`"):
            ToMeProjectorConfig(**bad)


@pytest.mark.parametrize("args, expected", [
    # keep = 0.33 of 100 patches: target ceil(33.0) = 33; each block merges ceil((remaining - 33) / blocks
    # left): ceil(67/7) = 10, ceil(57/6) = 10, ceil(47/5) = 10, ceil(37/4) = 10, ceil(27/3) = 9, 9, 9
    ((100, 7, None, 0.33), [10, 10, 10, 10, 9, 9, 9]),
    # 10 patches to 1: ceil(9/3) = 3, ceil(6/2) = 3, then half of the 4 left caps ceil(3/1) = 3 at 2
    ((10, 3, None, 0.1), [3, 3, 2]),
    # 0.3 * 10 is 3.0000000000000004 in floats: the target is 3, not 4
    ((10, 2, None, 0.3), [4, 3]),
    ((10, 2, None, 1.0), [0, 0]),
    # a target of one token: ceil(9/5) = 2, ceil(7/4) = 2, ceil(5/3) = 2, ceil(3/2) = 2, then 1
    ((10, 5, None, 0.1), [2, 2, 2, 2, 1]),
    # fixed r, capped at half of what remains and at leaving one token
    ((7, 4, 3, None), [3, 2, 1, 0]),
    ((9, 3, 0, None), [0, 0, 0]),
    ((1, 2, 5, None), [0, 0]),
])
def test_tome_schedule_at_budgets_that_do_not_divide(args, expected):
    assert merge_schedule(*args) == expected


def _tome_reference(x, size, metric, r, prefix, order):
    """One merge of ToMe by its definition, per row: A = even positions, B = odd ones; each A token's best B
    token by cosine (first on ties; protected tokens never merge, B token 1 not a destination when two are
    protected); the r best A tokens (ties: lower position first) merge into their B tokens by a size-weighted
    mean. Returns, per row, the output tokens' member lists in the output order."""
    n = x.shape[0]
    a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
    protected = set(range(prefix))
    score, best = {}, {}
    for a in a_pos:
        allowed = [bb for bb in b_pos if bb not in protected]
        if a in protected or not allowed:
            score[a], best[a] = -math.inf, None
            continue
        sims = [_cos(metric[a], metric[bb]) for bb in allowed]
        j = max(range(len(allowed)), key=lambda i: (sims[i], -i))
        score[a], best[a] = sims[j], allowed[j]
    ranked = sorted(a_pos, key=lambda a: (-score[a], a))
    merged, unmerged = ranked[:r], ranked[r:]
    members = {t: [t] for t in range(n)}
    for a in merged:
        members[best[a]] += [a]
        del members[a]
    if order == "spatial":
        keys = sorted(members)
    else:
        if prefix > 0:
            unmerged = sorted(unmerged)
        keys = ([unmerged[0], b_pos[0], *unmerged[1:], *b_pos[1:]] if prefix >= 2 else [*unmerged, *b_pos])
    return [sorted(members[k]) for k in keys]


@pytest.mark.parametrize("n, r, prefix", [(9, 3, 1), (10, 4, 0), (11, 3, 2), (8, 2, 0), (7, 3, 1)])
@pytest.mark.parametrize("order", ["spatial", "reference"])
def test_tome_merge_step_orders_equal_the_definition(n, r, prefix, order):
    """Tokens, sizes and every original token's slot after one merge, in spatial order or the official one."""
    torch.manual_seed(n * 10 + r)
    b, d = 2, 5
    x, metric = torch.randn(b, n, d), torch.randn(b, n, 3)
    size = torch.rand(b, n) + 0.5
    slot = torch.arange(n).expand(b, -1).contiguous()
    out, new_size, new_slot = merge_step(x, size, metric, slot, r, prefix, order)
    assert out.shape == (b, n - r, d)
    for row in range(b):
        groups = _tome_reference(x[row], size[row], metric[row], r, prefix, order)
        expected = torch.stack([sum(x[row, i] * size[row, i] for i in g) / sum(size[row, i] for i in g) for g in groups])
        torch.testing.assert_close(out[row], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(new_size[row], torch.stack([sum(size[row, i] for i in g) for g in groups]))
        assert [int(new_slot[row, i]) for i in range(n)] == [next(k for k, g in enumerate(groups) if i in g) for i in range(n)]


def test_tome_merge_step_with_r_zero_changes_nothing():
    x, size, slot = torch.randn(1, 5, 3), torch.ones(1, 5), torch.arange(5)[None]
    out, new_size, new_slot = merge_step(x, size, torch.randn(1, 5, 2), slot, 0, 0, "reference")
    assert out is x and new_size is size and new_slot is slot


def test_tome_reference_permutation_by_hand():
    """``cat([unmerged A, B])``: with a class token the unmerged A ascending, without it in score order; two
    prefix tokens lead."""
    ranked = torch.tensor([[4, 0, 2, 6]])  # A positions 8, 0, 4, 12 by decreasing score
    assert reference_permutation(ranked, 1, 8, 0).tolist() == [[0, 4, 12, 1, 3, 5, 7]]
    assert reference_permutation(ranked, 1, 8, 1).tolist() == [[0, 4, 12, 1, 3, 5, 7]]
    ranked = torch.tensor([[3, 2, 0, 1]])  # positions 6, 4, 0, 2
    assert reference_permutation(ranked, 1, 8, 0).tolist() == [[4, 0, 2, 1, 3, 5, 7]]
    assert reference_permutation(ranked, 1, 8, 1).tolist() == [[0, 2, 4, 1, 3, 5, 7]]
    assert reference_permutation(ranked, 2, 9, 2).tolist() == [[0, 1, 2, 3, 5, 7]]


@pytest.mark.parametrize("k", [1, 4, 7, 11])
def test_tome_merge_tokens_reference_order_rounds(k):
    """Rounds of ``min(half, what is left above k)`` merges in the official order: the members of each output
    follow from the definition applied round after round."""
    torch.manual_seed(k)
    x = torch.randn(12, 6)
    merged, slot = merge_tokens(x, k, "reference")
    groups = [[i] for i in range(12)]
    current = x.clone()
    sizes = torch.ones(12)
    while len(groups) > k:
        r = min(len(groups) // 2, len(groups) - k)
        members = _tome_reference(current, sizes, current, r, 0, "reference")
        groups = [sorted(i for m in g for i in groups[m]) for g in members]
        current = torch.stack([x[g].mean(0) for g in groups])
        sizes = torch.tensor([float(len(g)) for g in groups])
    assert merged.shape == (k, 6)
    for j, g in enumerate(groups):
        torch.testing.assert_close(merged[j], x[g].mean(0), atol=1e-5, rtol=1e-5)
        assert all(int(slot[i]) == j for i in g)


# ----- VisionZip -------------------------------------------------------------------------------------------
def test_visionzip_config():
    """Counts or fractions; ``at_budget`` splits the budget 54 : 10 (dominant : contextual), the contextual
    share capped at what the budget leaves; the reference variant renumbers positions."""
    for budget, dominant, contextual in [(0.5, 0.5 - 5 / 64, 5 / 64), (0.37, 0.37 * 54 / 64, 0.37 * 10 / 64),
                                         (0.9, 0.8, 0.1 - 1e-12), (1.0, 1.0, 0.0)]:
        config = VisionZipConfig.at_budget(budget)
        assert config.dominant == pytest.approx(dominant) and config.contextual == pytest.approx(contextual, abs=1e-9)
        assert config.dominant + config.contextual == pytest.approx(budget)
    assert VisionZipConfig.at_budget(0.5, layer=-3).layer == -3
    assert VisionZipConfig(dominant=0, contextual=0.0).dominant == 0
    assert VisionZipConfig(variant="reference").renumber_positions is True
    assert not VisionZipConfig().renumber_positions
    for bad in (dict(dominant=1.5), dict(contextual=-1), dict(dominant=-0.1), dict(layer=1.5),
                dict(variant="official"), dict(contextual=2.5)):
        with pytest.raises(ValueError, match=f"`{next(iter(bad))}`"):
            VisionZipConfig(**bad)
    for bad in (0.0, 1.2):
        with pytest.raises(ValueError, match="`budget`"):
            VisionZipConfig.at_budget(bad)


def _visionzip_definition(feats, attn, keys, dominant, contextual):
    """VisionZip on one group: the ``dominant`` best-attended tokens (ties: lower index), then of the rest
    (ascending) every ``rest // contextual``-th is a target, and every other token merges into its most
    key-similar target (first on ties): target + mean of its members."""
    n = feats.shape[0]
    dom = sorted(sorted(range(n), key=lambda i: (-float(attn[i]), i))[:dominant])
    rest = [i for i in range(n) if i not in dom]
    contextual = min(contextual, len(rest))
    slot = {i: k for k, i in enumerate(dom)}
    if contextual == 0:
        return dom, [feats[i] for i in dom], {**slot, **{i: -1 for i in rest}}
    step = max(1, len(rest) // contextual)
    targets = rest[::step][:contextual]
    others = [i for i in rest if i not in targets]
    members = {t: [] for t in targets}
    for o in others:
        sims = [_cos(keys[o], keys[t]) for t in targets]
        members[targets[max(range(len(targets)), key=lambda j: (sims[j], -j))]].append(o)
    outputs = [feats[i] for i in dom]
    for k, t in enumerate(targets):
        outputs.append(feats[t] + (torch.stack([feats[o] for o in members[t]]).mean(0) if members[t] else 0))
        for i in [t, *members[t]]:
            slot[i] = len(dom) + k
    return dom + targets, outputs, slot


@pytest.mark.parametrize("n, dominant, contextual", [
    (15, 4, 3),   # rest 11, stride 11 // 3 = 3: targets 0, 3, 6 of the rest
    (13, 5, 0),   # no contextual token: the rest dropped (slot -1)
    (9, 3, 8),    # more contextual tokens than the rest: every rest token a target, none merged
    (10, 10, 2),  # everything dominant
    (14, 1, 5),   # rest 13, stride 2
])
def test_visionzip_select_edge_counts_equal_the_definition(n, dominant, contextual):
    torch.manual_seed(n + dominant)
    feats, keys, attn = torch.randn(n, 4), torch.randn(n, 3), torch.rand(n)
    attn[2] = attn[5]  # a tie
    group = torch.arange(n) + 3  # group indices are positions into features
    features = torch.cat([torch.randn(3, 4), feats])
    keys_all, attn_all = torch.cat([torch.randn(3, 3), keys]), torch.cat([torch.rand(3), attn])
    sources, outputs, slot = visionzip_select(features, attn_all, keys_all, group, dominant, contextual)
    ref_sources, ref_outputs, ref_slot = _visionzip_definition(feats, attn, keys, dominant, contextual)
    assert sources.tolist() == [i + 3 for i in ref_sources]
    torch.testing.assert_close(outputs, torch.stack(ref_outputs), atol=1e-5, rtol=1e-5)
    assert slot.tolist() == [ref_slot[i] for i in range(n)]


@pytest.mark.parametrize("n, dominant, contextual", [(16, 6, 3), (12, 4, 0), (10, 3, 20), (10, 1, 1)])
def test_visionzip_reference_equals_the_official_definition(n, dominant, contextual):
    """The official code: [CLS] counts among ``dominant``; dominant patches ascending after it; contextual
    targets every ``rest // contextual``-th of the rest, merged with the mean of their members."""
    torch.manual_seed(n)
    cls, hidden, keys, attn = torch.randn(5), torch.randn(n, 5), torch.randn(n, 3), torch.rand(n)
    columns, outputs, assignment = visionzip_reference(cls, hidden, attn, keys, dominant, contextual)
    dom = sorted(sorted(range(n), key=lambda i: -float(attn[i]))[: dominant - 1])
    rest = [i for i in range(n) if i not in dom]
    c = min(contextual, len(rest))
    expected = [cls, *[hidden[i] for i in dom]]
    slots = {i: 1 + k for k, i in enumerate(dom)}
    targets = []
    if c:
        targets = rest[:: max(1, len(rest) // c)][:c]
        members = {t: [] for t in targets}
        for o in (i for i in rest if i not in targets):
            members[max(targets, key=lambda t: (_cos(keys[o], keys[t]), -targets.index(t)))].append(o)
        for k, t in enumerate(targets):
            expected.append(hidden[t] + (torch.stack([hidden[o] for o in members[t]]).mean(0) if members[t] else 0))
            for i in [t, *members[t]]:
                slots[i] = 1 + len(dom) + k
    assert columns.tolist() == dom + targets
    torch.testing.assert_close(outputs, torch.stack(expected), atol=1e-5, rtol=1e-5)
    assert assignment.tolist() == [slots.get(i, -1) for i in range(n)]


# ----- PruMerge --------------------------------------------------------------------------------------------
def test_prumerge_config():
    assert PruMergeConfig.at_budget(0.3).keep == 0.3 and isinstance(PruMergeConfig.at_budget(1).keep, float)
    assert PruMergeConfig.at_budget(0.3, neighbors=0).neighbors == 0
    assert PruMergeConfig(neighbors=0, iqr_factor=0.0).neighbors == 0
    assert PruMergeConfig(variant="reference").renumber_positions is True
    assert not PruMergeConfig().renumber_positions
    with pytest.raises(ValueError) as error:
        PruMergeConfig(keep=0.5, variant="reference")
    assert str(error.value) == "`keep` must be None with variant='reference' (the official count is adaptive), got 0.5"
    for bad in (dict(keep=0.0), dict(keep=1.5), dict(iqr_factor=-1.0), dict(neighbors=-1), dict(neighbors=1.5),
                dict(layer=0.5), dict(variant="x")):
        with pytest.raises(ValueError, match=f"`{next(iter(bad))}`"):
            PruMergeConfig(**bad)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="`budget`"):
            PruMergeConfig.at_budget(bad)
    assert get_method("prumerge_plus").config_cls().keep is None


def _outliers(attn, factor):
    q1, q3 = torch.quantile(attn, 0.25), torch.quantile(attn, 0.75)
    return [i for i in range(attn.numel()) if float(attn[i]) > float(q3 + factor * (q3 - q1))]


def test_first_true_and_uniform_fill_by_hand():
    mask = torch.tensor([False, True, True, False, True, True])
    assert first_true(mask, 3).tolist() == [1, 2, 4]
    assert first_true(mask, 0).tolist() == []
    kept = torch.tensor([0, 4])
    # stride 3 over 10: 0, 3, 6, 9 of which 0 is kept
    assert uniform_fill(kept, 10, step=3).tolist() == [3, 6, 9]
    assert uniform_fill(kept, 10, step=3, count=2).tolist() == [3, 6]
    # 5 in all: 3 more spread evenly over the 8 free positions 1, 2, 3, 5, 6, 7, 8, 9: indices linspace(0, 7, 3)
    # = 0, 3.5, 7 rounded half to even: 0, 4, 7
    assert uniform_fill(kept, 10, total=5).tolist() == [1, 6, 9]
    assert uniform_fill(kept, 10, total=2).tolist() == []
    assert uniform_fill(kept, 10).tolist() == []
    assert uniform_fill(torch.arange(4), 4, total=6).tolist() == []  # nothing free
    assert uniform_fill(kept, 10, total=20).tolist() == [1, 2, 3, 5, 6, 7, 8, 9]


@pytest.mark.parametrize("factor", [1.5, 0.0])
def test_prumerge_group_counts_by_hand(factor):
    torch.manual_seed(5)
    n = 20
    attn = torch.softmax(torch.randn(n) * 3, 0)
    outliers = _outliers(attn, factor)
    counts = group_counts(attn, n, PruMergeConfig(iqr_factor=factor), plus=False)
    assert counts.tolist() == [max(1, len(outliers)), 0]
    assert group_counts(attn, n, PruMergeConfig(keep=0.5), plus=True).tolist() == [len(_outliers(attn, 1.5)), 0]
    # PruMerge+: stride positions (every floor(floor(n / outliers) / 3)-th) not among the top outliers
    plus = group_counts(attn, n, PruMergeConfig(iqr_factor=factor), plus=True)
    m = max(1, len(outliers))
    step = max(1, (n // m) // 3)
    top = set(sorted(range(n), key=lambda i: (-float(attn[i]), i))[:m])
    assert plus.tolist() == [m, sum(1 for i in range(0, n, step) if i not in top)]


def test_prumerge_group_counts_with_no_outlier_keeps_one():
    """Equal attention has no outlier: one token is kept (the first, ties going to the lower index), and
    PruMerge+'s stride floor(12 / 1 / 3) = 4 adds positions 4 and 8 (0 is that token)."""
    attn = torch.full((12,), 1 / 12)
    assert group_counts(attn, 12, PruMergeConfig(), plus=True).tolist() == [1, 2]
    assert group_counts(attn, 12, PruMergeConfig(), plus=False).tolist() == [1, 0]


def _prumerge_definition(feats, attn, keys, kept, neighbors):
    """Each kept token absorbs its ``neighbors`` most key-similar other tokens weighted by their attention;
    one extra token carries the attention-weighted sum of the pruned ones and stands at the best of them."""
    n = feats.shape[0]
    outputs = []
    for i in kept:
        out = feats[i].clone()
        if neighbors > 0 and n > 1:
            others = sorted((j for j in range(n) if j != i), key=lambda j: (-_cos(keys[i], keys[j]), j))
            out = out + sum(attn[j] * feats[j] for j in others[: min(neighbors, n - 1)])
        outputs.append(out)
    pruned = [j for j in range(n) if j not in kept]
    sources = list(kept)
    if pruned:
        outputs.append(sum(attn[j] * feats[j] for j in pruned))
        sources.append(max(pruned, key=lambda j: (float(attn[j]), -j)))
    slot = [kept.index(j) if j in kept else len(kept) for j in range(n)]
    return sources, torch.stack(outputs), slot


@pytest.mark.parametrize("keep, n, neighbors", [
    (0.3, 17, 2),   # round(5.1) = 5 tokens, one of them the extra: 4 kept
    (0.25, 10, 0),  # round(2.5) = 2 (half to even), minus the extra: 1 kept; no neighbours merged
    (1.0, 9, 3),    # everything kept, no extra token
    (0.05, 6, 40),  # round(0.3) = 0 -> at least 1 kept; more neighbours than tokens
])
def test_prumerge_group_with_a_fixed_keep_equals_the_definition(keep, n, neighbors):
    torch.manual_seed(n)
    feats, keys = torch.randn(n, 4), torch.randn(n, 3)
    attn = torch.softmax(torch.randn(n) * 2, 0)
    sources, outputs, slot = prumerge_group(feats, attn, keys, torch.arange(n), PruMergeConfig(keep=keep, neighbors=neighbors),
                                            plus=False)
    total = max(1, round(keep * n))
    if total < n:
        total = max(1, total - 1)
    kept = sorted(sorted(range(n), key=lambda i: (-float(attn[i]), i))[:total])
    ref_sources, ref_outputs, ref_slot = _prumerge_definition(feats, attn, keys, kept, neighbors)
    assert sources.tolist() == ref_sources
    torch.testing.assert_close(outputs, ref_outputs, atol=1e-5, rtol=1e-5)
    assert slot.tolist() == ref_slot


def test_prumerge_group_of_one_token():
    feats, keys, attn = torch.randn(8, 4), torch.randn(8, 3), torch.rand(8)
    sources, outputs, slot = prumerge_group(feats, attn, keys, torch.tensor([7]), PruMergeConfig(), plus=False,
                                            counts=(1, 0))
    assert sources.tolist() == [7] and slot.tolist() == [0]
    torch.testing.assert_close(outputs, feats[7:])


@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("neighbors", [3, 0, 1])
def test_prumerge_reference_equals_the_official_definition(plus, neighbors):
    """The official count ``int(n * outliers / n)``; PruMerge+ adds ``arange(0, n - 1, int(int(1 / ratio) / 3))``
    not already kept; kept tokens by decreasing attention, then the extra token of the pruned ones."""
    torch.manual_seed(11)
    n = 24
    hidden, keys = torch.randn(n, 5), torch.randn(n, 3)
    attn = torch.softmax(torch.randn(n) * 3, 0)
    config = PruMergeConfig(neighbors=neighbors)
    kept, outputs, assignment = prumerge_reference(hidden, attn, keys, config, plus)
    m = max(1, len(_outliers(attn, 1.5)))
    order = sorted(range(n), key=lambda i: -float(attn[i]))[: int(n * (m / n))]
    if plus:
        step = max(1, int(int(1 / (m / n)) / 3))
        order += [i for i in range(0, n - 1, step) if i not in order]
    assert kept.tolist() == order
    _, ref_outputs, _ = _prumerge_definition(hidden, attn, keys, order, neighbors)
    torch.testing.assert_close(outputs, ref_outputs, atol=1e-5, rtol=1e-5)
    assert assignment.tolist() == [order.index(j) if j in order else len(order) for j in range(n)]


@pytest.mark.parametrize("keep, k", [(0.3, 5), (4, 4), (1.0, 14)])  # ceil(0.3 * 14 = 4.2) = 5
@pytest.mark.parametrize("variant", ["default", "reference"])
def test_tome_projector_reduce_stands_each_merged_token_at_its_first_member(keep, k, variant):
    from tokenreduce.core.layout import TokenLayout
    from tokenreduce.core.reduction import ReduceContext

    torch.manual_seed(k)
    x = torch.randn(14, 6)
    spec = get_method("tome_projector")
    context = ReduceContext(layout=TokenLayout.flat("image", 14), modality="image", row=0, item=0)
    reduction = spec.method_cls(spec.config_cls(keep=keep, variant=variant)).reduce(x, context)
    merged, slot = merge_tokens(x, k, "spatial" if variant == "default" else "reference")
    torch.testing.assert_close(reduction.features, merged)
    assert reduction.assignment.tolist() == slot.tolist()
    assert reduction.sources.tolist() == [min(i for i in range(14) if int(slot[i]) == j) for j in range(k)]


def test_uniform_fill_at_one_pick_and_one_free_position():
    kept = torch.tensor([0, 4])
    assert uniform_fill(kept, 10, total=3).tolist() == [1]  # one more: the first free position
    assert uniform_fill(torch.arange(9), 10, total=10).tolist() == [9]  # the one free position
    assert uniform_fill(torch.zeros(0, dtype=torch.long), 5).tolist() == []  # neither step nor total: none


def test_prumerge_plus_stride_skips_the_top_token_only():
    """One outlier at position 0 (on every stride): the stride floor(12 / 1 / 3) = 4 adds 4 and 8 only."""
    attn = torch.full((12,), 0.01)
    attn[0] = 1.0
    assert group_counts(attn, 12, PruMergeConfig(), plus=True).tolist() == [1, 2]
    attn[0], attn[5] = 0.01, 1.0  # the outlier off the stride: 0, 4 and 8 are added
    assert group_counts(attn, 12, PruMergeConfig(), plus=True).tolist() == [1, 3]


def test_tome_reduce_without_a_tower_run_keeps_every_token():
    """Features computed elsewhere (no merge recorded): every token stands for itself."""
    from tokenreduce.core.layout import TokenLayout
    from tokenreduce.core.reduction import ReduceContext

    spec = get_method("tome")
    method = spec.method_cls(spec.config_cls(r=2))
    method.records = []
    x = torch.randn(6, 5)
    reduction = method.reduce(x, ReduceContext(layout=TokenLayout.flat("image", 6), modality="image", row=0, item=0))
    assert reduction.sources.tolist() == list(range(6)) and reduction.features is None


def test_tome_on_a_bare_tower_records_patches_in_and_out():
    """CLIP at 56 / 14: 16 patches and a class token; r = 2 in each of 3 blocks merges 6: 10 left per image."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    import tokenreduce as tr

    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                             num_attention_heads=4, image_size=56, patch_size=14)).eval()
    tr.wrap(tower, "tome", r=2)
    try:
        with torch.no_grad():
            out = tower(pixel_values=torch.randn(2, 3, 56, 56)).last_hidden_state
        samples = tr.stats(tower).samples
    finally:
        tr.unwrap(tower)
    assert out.shape == (2, 1 + 10, 32)
    assert [(s.items[0].modality, s.items[0].tokens_in, s.items[0].tokens_out) for s in samples] == [("image", 16, 10)] * 2


@pytest.mark.parametrize("n", [5, 2])
def test_prumerge_reference_of_one_outlier_among_few_patches(n):
    """One outlier of 5: ratio 0.2, PruMerge+'s step int(int(5.0) / 3) = 1 adds patches 0, 1, 3 (not the last);
    of 2 patches the kept one absorbs the other as its one neighbour."""
    attn = torch.full((n,), 0.05)
    attn[n // 2] = 0.8
    torch.manual_seed(n)
    hidden, keys = torch.randn(n, 4), torch.randn(n, 3)
    for plus in (False, True) if n > 2 else (False,):  # of 2 with PruMerge+ nothing is pruned
        kept, outputs, _ = prumerge_reference(hidden, attn, keys, PruMergeConfig(neighbors=4), plus)
        expected = [n // 2] + ([i for i in range(0, n - 1) if i != n // 2] if plus else [])
        assert kept.tolist() == expected
        _, ref_outputs, _ = _prumerge_definition(hidden, attn, keys, expected, 4)
        torch.testing.assert_close(outputs, ref_outputs, atol=1e-5, rtol=1e-5)
