"""The sync counter itself: which ops count as host-device syncs, and which do not."""

import torch

from tokenreduce.testing.syncs import SyncCounter, host_only


def _count(fn) -> dict:
    with SyncCounter() as syncs:
        fn()
    return dict(syncs.by_op())


def test_counts_the_ops_that_make_the_host_wait():
    x = torch.arange(10)
    mask = x > 4
    assert _count(lambda: x.sum().item()) == {"item": 1}
    assert _count(lambda: int(x.max())) == {"item": 1}
    assert _count(lambda: bool((x > 3).any())) == {"item": 1}
    assert _count(lambda: float(x.float().mean())) == {"item": 1}
    assert _count(lambda: x.tolist()) == {"tolist": 1}
    assert _count(lambda: x.cpu()) == {"cpu": 1}
    assert _count(lambda: x.numpy()) == {"numpy": 1}
    assert _count(lambda: mask.nonzero()) == {"nonzero": 1}
    assert _count(lambda: torch.masked_select(x, mask)) == {"masked_select": 1}
    assert _count(lambda: torch.unique(x)) == {"unique": 1}
    assert _count(lambda: x[mask]) == {"bool_index": 1}
    assert _count(lambda: x.repeat_interleave(x)) == {"repeat_interleave": 1}
    assert _count(lambda: torch.bincount(x)) == {"bincount": 1}


def test_shape_known_ops_do_not_count():
    x = torch.randn(6, 8)
    idx = torch.tensor([0, 2, 5])
    mask = x[:, 0] > 0

    def ops():
        x[idx]
        x.index_select(0, idx)
        torch.topk(x, 3, dim=1)
        x.argsort(dim=1)
        torch.gather(x, 1, x.argsort(dim=1))
        x.masked_fill(mask[:, None], 0.0)
        torch.where(mask[:, None], x, 0.0)
        x.new_zeros(6).scatter_(0, idx, 1.0)
        idx.repeat_interleave(torch.tensor([1, 2, 1]), output_size=4)
        torch.nonzero_static(mask, size=6)
        x.shape[0] + x.numel()

    assert _count(ops) == {}


def test_host_only_blocks_are_not_counted():
    x = torch.arange(5)
    with SyncCounter() as syncs:
        with host_only():
            x.tolist()
            x.nonzero()
        x.nonzero()
    assert syncs.count == 1
    assert syncs.events[0].where.startswith("tests/hot/test_sync_counter.py")
