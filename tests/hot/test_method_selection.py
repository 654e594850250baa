"""The methods' selection code without host reads: plain-Python references and sync counts.

The rewritten selection / merging steps (ToMe's merge step, VisionZip's contextual merge, PruMerge+'s
uniform fill, the lone newline slots) must choose what the definitions choose, and read the
device only where a count depends on the data.
"""

from __future__ import annotations

import pytest
import torch

from tokenreduce import kernels
from tokenreduce.core.layout import Segment, TokenLayout
from tokenreduce.ops.vision import add_newline_slots
from tokenreduce.plugins.baselines.prumerge import PruMergeConfig, group_counts, prumerge_group
from tokenreduce.plugins.baselines.tome import merge_tokens
from tokenreduce.plugins.baselines.visionzip import visionzip_select
from tokenreduce.testing.syncs import SyncCounter


def _plus_reference(attn: list[float], keep: float | None, factor: float) -> list[int]:
    """PruMerge+'s kept positions from the definition: IQR outliers (highest first), then stride or evenly
    spread positions not yet kept."""
    n = len(attn)
    q1, q3 = (float(v) for v in torch.quantile(torch.tensor(attn), torch.tensor([0.25, 0.75])))
    n_out = max(1, sum(a > q3 + factor * (q3 - q1) for a in attn))
    order = sorted(range(n), key=lambda i: (-attn[i], i))
    if keep is None:
        kept = order[:n_out]
        step = max(1, (n // n_out) // 3)
        kept += [i for i in range(0, n, step) if i not in kept]
    else:
        total = max(1, round(keep * n))
        total = max(1, total - 1) if total < n else total
        kept = order[: min(n_out, total)]
        pool = [i for i in range(n) if i not in kept]
        need = min(total - len(kept), len(pool))
        if need > 0:
            picks = torch.linspace(0, len(pool) - 1, need).round().long().tolist()
            kept += [pool[p] for p in sorted(set(picks))]
    return sorted(kept)


@pytest.mark.parametrize("keep", [None, 0.3, 0.6])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prumerge_plus_kept_set_equals_the_definition(keep, seed):
    torch.manual_seed(seed)
    n = 40
    feats, keys = torch.randn(n, 4), torch.randn(n, 3)
    attn = torch.softmax(torch.randn(n) * (1 + seed), 0)
    cfg = PruMergeConfig(keep=keep, neighbors=0)
    sources, outputs, slot = prumerge_group(feats, attn, keys, torch.arange(n), cfg, plus=True)
    expected = _plus_reference(attn.tolist(), keep, cfg.iqr_factor)
    pruned = [i for i in range(n) if i not in expected]
    assert sources[: len(expected)].tolist() == expected
    torch.testing.assert_close(outputs[: len(expected)], feats[expected])
    if pruned:
        assert int(sources[-1]) == max(pruned, key=lambda j: (float(attn[j]), -j))
        assert all(int(slot[j]) == len(expected) for j in pruned)
    n_out, n_fill = group_counts(attn, n, cfg, plus=True).tolist()
    assert n_fill == (len(expected) - n_out if keep is None else 0)


def test_prumerge_with_a_fixed_keep_reads_nothing_and_plus_reads_once():
    torch.manual_seed(5)
    n = 30
    feats, keys, attn = torch.randn(n, 4), torch.randn(n, 3), torch.rand(n)
    with SyncCounter() as syncs:
        prumerge_group(feats, attn, keys, torch.arange(n), PruMergeConfig(keep=0.25), plus=False)
    assert syncs.count == 0, syncs.by_line()
    with SyncCounter() as syncs:
        prumerge_group(feats, attn, keys, torch.arange(n), PruMergeConfig(keep=None), plus=True)
    assert syncs.count == 1, syncs.by_line()


def test_tome_and_visionzip_steps_read_nothing():
    torch.manual_seed(6)
    x, keys, attn = torch.randn(24, 8), torch.randn(24, 3), torch.rand(24)
    with SyncCounter() as syncs:
        merge_tokens(x, 5)
        visionzip_select(x, attn, keys, torch.arange(24), dominant=6, contextual=3)
    assert syncs.count == 0, syncs.by_line()


def test_bipartite_matching_skips_the_finite_check_only_when_asked():
    metric = torch.randn(1, 6, 4)
    with SyncCounter() as syncs:
        kernels.bipartite_matching(metric, assume_finite=True)
    assert syncs.count == 0
    with SyncCounter() as syncs:
        kernels.bipartite_matching(metric)
    assert syncs.count == 1
    metric[0, 2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        kernels.bipartite_matching(metric)


def test_lone_newline_slots_are_added_without_a_read():
    """A 2x3 base grid, a 3x2 canvas with newlines and a lone newline: the rows' slots are dropped (unless
    asked for), the lone newline stays; the counts come from the layout, so nothing is read from the device."""
    layout = TokenLayout("image", (Segment("base", 2, 3), Segment("crop", 3, 2, newline=True),
                                   Segment("newline", 1, 0, newline=True)))
    n = layout.num_tokens  # 6 + 9 + 1
    features = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 2)
    kept = torch.tensor([1, 6, 13])  # base row 0, canvas rows 0 and 2
    assignment = torch.full((n,), -1).index_put((kept,), torch.arange(3))
    with SyncCounter() as syncs:
        src, out, assign = add_newline_slots(layout, features, kept, features[kept], assignment)
    assert syncs.count == 0, syncs.by_line()
    assert src.tolist() == [1, 6, 13, 15]
    torch.testing.assert_close(out, features[src])
    assert assign.tolist() == [-1, 0, -1, -1, -1, -1, 1, -1, -1, -1, -1, -1, -1, 2, -1, 3]
    # with ``rows``, every newline slot (rows' and lone, ascending) after the kept tokens
    with SyncCounter() as syncs:
        src, out, assign = add_newline_slots(layout, features, kept, features[kept], assignment, rows=True)
    assert syncs.count == 0, syncs.by_line()
    assert src.tolist() == [1, 6, 13, 8, 11, 14, 15]
    torch.testing.assert_close(out, features[src])
    assert [int(assign[i]) for i in (8, 11, 14, 15)] == [3, 4, 5, 6]

