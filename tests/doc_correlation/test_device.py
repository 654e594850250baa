"""doc_correlation at a fixed ``keep`` without host reads: each device step against its host definition.

The host functions (``distribute``'s rounds of water-filling, ``choose_tokens`` with ``torch.multinomial``
and ``merge_dropped`` on index lists) are written differently from the device ones (a sort for the water
level, ranks and masks, one similarity matrix per crop), so each comparison can fail; the whole reduction
is checked for reading nothing from the device and for stats that read it once, later.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from tokenreduce.core.layout import Segment, TokenLayout
from tokenreduce.core.reduction import ReduceContext
from tokenreduce.plugins.doc_correlation.density import (
    density_on_device,
    distribute,
    distribute_on_device,
    redundancy_of,
)
from tokenreduce.plugins.doc_correlation.method import DocCorrelationConfig, DocCorrelationMethod
from tokenreduce.plugins.doc_correlation.select import (
    choose_tokens,
    choose_tokens_on_device,
    merge_dropped,
    merge_into_kept,
)
from tokenreduce.testing.syncs import SyncCounter


def test_water_filling_by_sort_equals_the_rounds():
    rng = random.Random(0)
    for _ in range(3000):
        g = rng.randint(1, 8)
        upper = [rng.randint(0, 40) for _ in range(g)]
        lower = [min(rng.randint(0, 3), u) for u in upper]
        pick = rng.random()
        if pick < 0.3:  # shares proportional to the sizes (densities of 1): ties in the fractional parts
            weights = [float(u) for u in upper]
        elif pick < 0.5:
            weights = [float(rng.randint(0, 2)) for _ in range(g)]  # zero weights among the others
        else:
            weights = [rng.random() * rng.choice([0.0, 1.0, 5.0]) for _ in range(g)]
        total = rng.randint(0, sum(upper) + 5)
        got = distribute_on_device(total, torch.tensor(weights, dtype=torch.float64), lower, upper)
        assert got.tolist() == distribute(total, weights, lower, upper), (total, weights, lower, upper)


def test_water_filling_edges():
    w = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)
    assert distribute_on_device(7, w, [1, 1, 1], [5, 2, 5]).tolist() == distribute(7, [0, 0, 0], [1, 1, 1], [5, 2, 5])
    assert distribute_on_device(99, torch.ones(2, dtype=torch.float64), [0, 0], [3, 4]).tolist() == [3, 4]
    assert distribute_on_device(0, torch.ones(2, dtype=torch.float64), [1, 2], [3, 4]).tolist() == [1, 2]
    with pytest.raises(ValueError, match="exceeds"):
        distribute_on_device(3, torch.ones(1, dtype=torch.float64), [3], [2])


@pytest.mark.parametrize("max_neighbors", [1, 0.2])
def test_density_on_device_equals_the_host_share(max_neighbors):
    gen = torch.Generator().manual_seed(1)
    for n in (1, 5, 21):
        counts = torch.randint(-1, n, (n,), generator=gen)
        want = float(1.0 - redundancy_of(counts, max_neighbors))
        assert float(density_on_device(counts, max_neighbors)) == want


@pytest.mark.parametrize("global_tokens", [True, False])
@pytest.mark.parametrize("sampling", ["sample", "topk"])
def test_choose_on_device_equals_choose_tokens(global_tokens, sampling):
    gen = torch.Generator().manual_seed(2)
    for trial in range(40):
        n = int(torch.randint(2, 30, (1,), generator=gen))
        deep = torch.rand(n, generator=gen)
        deep[torch.randint(0, n, (2,), generator=gen)] += 3.0  # a few IQR outliers
        shallow = torch.rand(n, generator=gen)
        k = int(torch.randint(0, n + 1, (1,), generator=gen))
        host_gen = torch.Generator().manual_seed(trial)
        want, want_global = choose_tokens(deep, shallow, k, global_tokens=global_tokens, iqr_factor=1.5,
                                          sampling=sampling, generator=host_gen)
        noise = None
        if sampling == "sample":
            noise = torch.empty(n).exponential_(generator=torch.Generator().manual_seed(trial))
        mask, n_global = choose_tokens_on_device(deep, shallow, torch.tensor(k), global_tokens=global_tokens,
                                                 iqr_factor=1.5, noise=noise)
        assert mask.nonzero().flatten().tolist() == want.tolist() and int(n_global) == want_global


def test_merge_into_kept_equals_merge_dropped():
    gen = torch.Generator().manual_seed(3)
    for _ in range(30):
        n = int(torch.randint(1, 15, (1,), generator=gen))
        x, sim = torch.randn(n, 4, generator=gen), torch.randn(n, 3, generator=gen)
        sim[torch.rand(n, generator=gen) < 0.2] = float("nan")
        weights = torch.rand(n, generator=gen)
        mask = torch.rand(n, generator=gen) < 0.4
        kept = mask.nonzero().flatten()
        want, slot = merge_dropped(x, sim, kept, weights, "cosine")
        target, merged = merge_into_kept(x, sim, mask, weights, "cosine")
        torch.testing.assert_close(merged[kept], want, rtol=1e-6, atol=1e-6)
        # each token's output row, from its kept position: the rank of that position among the kept
        rank = {int(p): i for i, p in enumerate(kept)}
        assert [rank[int(t)] if int(t) >= 0 else -1 for t in target] == slot.tolist()


def _layout():
    """A base 3x4 grid then a 3x4 canvas of two 3x2 crops with a newline per row (LLaVA-NeXT style)."""
    segments = (Segment("base", 3, 4), Segment("crop", 3, 4, newline=True, crop_grid=(1, 2)))
    source = [[0, i] for i in range(12)]
    for r in range(3):
        source += [[1 + c // 2, r * 2 + c % 2] for c in range(4)] + [[-1, -1]]
    return TokenLayout("image", segments, extra={"tower_rows": 3, "patch_source": torch.tensor(source)})


@pytest.mark.parametrize("options", [{}, {"merge": True}, {"sampling": "topk", "base": "keep"}])
def test_fixed_keep_reads_nothing_and_its_info_later(options):
    layout = _layout()
    n = layout.num_tokens  # 24 content tokens in 3 crops, 3 newline slots
    gen = torch.Generator().manual_seed(5)
    sim = torch.randn(n, 5, generator=gen)
    sim[layout.is_newline] = float("nan")
    signals = {"similarity": sim, "shallow_attention": torch.rand(n, generator=gen),
               "deep_attention": torch.rand(n, generator=gen)}
    ctx = ReduceContext(layout=layout, modality="image", row=0, item=0, signals=signals,
                        generator=torch.Generator().manual_seed(0))
    method = DocCorrelationMethod(DocCorrelationConfig(keep=0.5, **options))
    with SyncCounter() as syncs:
        red = method.reduce(torch.randn(n, 4, generator=gen), ctx)
    assert syncs.count == 0, syncs.by_line()
    if options.get("base") != "keep":  # the thumbnail kept whole overdraws the budget (min_tokens per crop)
        assert red.num_tokens == round(0.5 * 27)  # newline slots paid from the budget, all kept
    with SyncCounter() as syncs:
        assert red.info  # the first read fills it: one read of the device
        text = json.dumps(red.info)
    assert syncs.count == 1
    crops = json.loads(text)["crops"]
    assert sum(c["budget"] for c in crops) == red.num_tokens - 3
    assert [c["kept"] for c in crops] == [c["budget"] for c in crops]
    newline = set(layout.is_newline.nonzero().flatten().tolist())
    assert newline <= set(red.sources.tolist())
