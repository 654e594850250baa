"""topk_select and threshold_select: Triton kernel vs torch twin (exactly), and the twin vs sorting."""

from __future__ import annotations

import math

import pytest
import torch

from tests.kernels.helpers import both, case_id, rand_mask, randn
from tokenreduce.kernels import Selection, threshold_select, topk_select, use_backend
from tokenreduce.kernels.select import naive
from tokenreduce.kernels.select import triton as select_triton

F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16


def _scores(B: int, N: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Scores with the hard cases: ties, +-0, +-inf, NaN."""
    s = randn(B, N, device=device)
    if N >= 8:
        s[:, ::5] = s[:, 1:2]  # many exact ties
        s[0, 2] = float("nan")
        s[-1, 3] = float("inf")
        s[-1, 4] = float("-inf")
        s[0, 6], s[0, 7] = -0.0, 0.0
    return s.to(dtype)


def _check(sel: Selection, want: Selection, k_eff: torch.Tensor | None = None) -> None:
    assert torch.equal(sel.keep, want.keep), f"keep differs at {(sel.keep != want.keep).nonzero()[:5].tolist()}"
    assert torch.equal(sel.indices, want.indices)
    # The indices are exactly the kept positions, ascending, -1 padded.
    for row, keep in zip(sel.indices, sel.keep):
        n = int(keep.sum())
        assert torch.equal(row[:n], keep.nonzero().flatten()) and bool((row[n:] == -1).all())
    if k_eff is not None:
        assert torch.equal(sel.keep.sum(1), k_eff.to(sel.keep.device))


# (B, N, dtype, masked, k per row)
TOPK = [
    (1, 1, F32, False, [1]),
    (1, 1, F32, False, [0]),
    (4, 1000, F32, True, [0, 17, 999, 400]),
    (3, 577, F16, False, [576, 1, 288]),
    (2, 2880, BF16, True, [720, 2880]),
    (5, 33, F32, True, [40, 3, 0, 33, 8]),
]


@pytest.mark.parametrize(
    "B,N,dtype,masked,k", TOPK,
    ids=[case_id(B=b, N=n, dtype=dt, masked=m, k=max(k)) for b, n, dt, m, k in TOPK],
)
def test_topk_matches_twin_exactly(device, B, N, dtype, masked, k):
    scores = _scores(B, N, dtype, device)
    mask = rand_mask(B, N, device=device) if masked else None
    k = torch.tensor(k, device=device)
    got, want = both(topk_select, scores, k, mask)
    valid = mask.sum(1) if masked else torch.full((B,), N, device=device)
    _check(got, want, torch.minimum(k, valid))
    assert got.indices.shape == (B, min(int(k.max()), N))


def test_topk_several_chunks_per_row(device):
    # On a GPU a row longer than 4096 is streamed in chunks; force chunks of 64 here.
    B, N, block = 3, 300, 64
    scores = _scores(B, N, F32, device)
    scores[1, 50:200] = 0.5  # a tie run crossing chunk borders
    mask = rand_mask(B, N, device=device)
    k = torch.tensor([150, 60, 3], device=device)
    with use_backend("torch"):
        want = topk_select(scores, k, mask)
    got = select_triton.topk_select(scores, k, mask, int(k.max()), block_n=block)
    _check(Selection(*got), want)
    thresholds = torch.tensor([0.0, 0.5, -1.0], device=device)
    got = select_triton.threshold_select(scores, thresholds, mask, block_n=block)
    with use_backend("torch"):
        want = threshold_select(scores, thresholds, mask)
    _check(Selection(*got), want)


def test_topk_int_budget_and_errors(device):
    scores = _scores(2, 50, F32, device)
    got, want = both(topk_select, scores, 7)
    _check(got, want, torch.tensor([7, 7]))
    with pytest.raises(ValueError, match=">= 0"):
        topk_select(scores, torch.tensor([3, -1]))
    with pytest.raises(ValueError, match="shape"):
        topk_select(scores, torch.tensor([3, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        topk_select(scores, 2.5)
    with pytest.raises(ValueError, match="integer"):
        topk_select(scores, torch.tensor([2.0, 3.0]))


def test_topk_twin_matches_sorting():
    B, N = 6, 40
    scores = torch.randint(-4, 5, (B, N)).float()  # heavy ties
    scores[0, 3] = float("nan")
    scores[1, 5] = float("-inf")
    mask = rand_mask(B, N, p=0.7)
    k = torch.tensor([0, 5, 13, 40, 22, 1])
    with use_backend("torch"):
        sel = topk_select(scores, k, mask)
    for b in range(B):
        valid = [i for i in range(N) if mask[b, i]]
        # Highest first, NaN above everything, lower index first among equals.
        ranked = sorted(valid, key=lambda i: (-math.inf if math.isnan(scores[b, i]) else -scores[b, i].item(), i))
        want = sorted(ranked[: int(k[b])])
        assert sel.indices[b][sel.indices[b] >= 0].tolist() == want


THRESH = [
    (1, 1, F32, False),
    (4, 1000, F16, True),
    (2, 2880, BF16, False),
]


@pytest.mark.parametrize("B,N,dtype,masked", THRESH, ids=[case_id(B=b, N=n, dtype=d, masked=m) for b, n, d, m in THRESH])
def test_threshold_matches_twin_exactly(device, B, N, dtype, masked):
    scores = _scores(B, N, dtype, device)
    mask = rand_mask(B, N, device=device) if masked else None
    thresholds = torch.linspace(-0.5, 1.0, B).to(device)
    got, want = both(threshold_select, scores, thresholds, mask)
    _check(got, want)
    got, want = both(threshold_select, scores, 0.25, mask)
    _check(got, want)


def test_threshold_twin_matches_loops():
    scores = torch.tensor([[0.1, float("nan"), 0.7, 0.3], [float("inf"), -1.0, 0.2, 0.2]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    with use_backend("torch"):
        sel = threshold_select(scores, torch.tensor([0.2, 0.2]), mask)
    assert sel.indices.tolist() == [[2], [0]]  # NaN never passes; 0.2 > 0.2 is False
    assert sel.keep.tolist() == [[False, False, True, False], [True, False, False, False]]
    nothing = naive.threshold_select(scores, torch.tensor([float("nan"), float("inf")]), None)
    assert nothing[0].shape == (2, 0) and not bool(nothing[1].any())
