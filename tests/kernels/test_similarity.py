"""pairwise_similarity and neighbor_count: Triton kernel vs torch twin, and the twin vs loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.helpers import TOL, assert_close, both, case_id, rand_mask, randn
from tokenreduce.kernels import neighbor_count, pairwise_similarity
from tokenreduce.kernels.similarity import naive

F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16

# (B, N, M or None for self-similarity, D, dtype, metric, masked)
PAIRWISE = [
    (1, 1, None, 1, F32, "cosine", False),
    (2, 577, None, 64, F16, "cosine", True),
    (2, 577, 33, 1024, F16, "correlation", True),
    (1, 40, None, 4096, BF16, "correlation", False),
    (3, 100, 7, 300, F32, "cosine", True),
    (2, 17, 1, 2, BF16, "cosine", True),
    (1, 257, 129, 96, F32, "correlation", False),
]


@pytest.mark.parametrize(
    "B,N,M,D,dtype,metric,masked",
    PAIRWISE,
    ids=[case_id(B=b, N=n, M=m, D=d, dtype=dt, metric=mt[:3], masked=mk) for b, n, m, d, dt, mt, mk in PAIRWISE],
)
def test_pairwise_matches_twin(device, B, N, M, D, dtype, metric, masked):
    x = randn(B, N, D, dtype=dtype, device=device, scale=3.0) + 0.5
    y = None if M is None else randn(B, M, D, dtype=dtype, device=device)
    mask = rand_mask(B, N, device=device) if masked else None
    y_mask = rand_mask(B, M, device=device) if masked and M is not None else None
    got, want = both(pairwise_similarity, x, y, metric=metric, mask=mask, y_mask=y_mask)
    assert got.dtype == torch.float32
    assert_close(got, want, *TOL[dtype], name="similarity")


def test_pairwise_fill_and_zero_vectors(device):
    x = randn(2, 9, 5, device=device)
    x[:, 3] = 0.0  # zero vector: similarity 0 with everything, like F.normalize
    x[:, 4] = 2.5  # constant vector: zero after centring, so correlation 0 with everything
    mask = rand_mask(2, 9, device=device)
    mask[:, 3:5] = True
    pair = mask[:, :, None] & mask[:, None, :]
    for metric in ("cosine", "correlation"):
        got, want = both(pairwise_similarity, x, metric=metric, mask=mask, fill=0.25)
        assert_close(got, want, *TOL[F32], name=metric)
        assert bool((got[~pair] == 0.25).all())
        assert bool((got[:, 3][mask] == 0).all())
    assert bool((got[:, 4][mask] == 0).all())


def test_pairwise_nan_propagates_like_twin(device):
    x = randn(1, 6, 8, device=device)
    x[0, 2, 5] = float("nan")
    mask = torch.ones(1, 6, dtype=torch.bool, device=device)
    mask[0, 4] = False
    x[0, 4, 0] = float("nan")  # masked rows are filled, their NaN does not leak
    got, want = both(pairwise_similarity, x, mask=mask)
    assert_close(got, want, *TOL[F32], name="nan")
    assert bool(got[0, 2].isnan()[mask[0]].all()) and not bool(got[0, 4].isnan().any())


def test_pairwise_rejects_bad_inputs():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="metric"):
        pairwise_similarity(x, metric="dot")
    with pytest.raises(ValueError, match="y_mask"):
        pairwise_similarity(x, y_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="D=4"):
        pairwise_similarity(x, torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="bool"):
        pairwise_similarity(x, mask=torch.ones(2, 3))
    # a mask elsewhere than the data (a host mask for GPU tokens) is named, not handed to a kernel
    with pytest.raises(ValueError, match="`mask` is on meta but the data is on cpu"):
        pairwise_similarity(x, mask=torch.ones(2, 3, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="`y` is on meta"):
        pairwise_similarity(x, torch.empty(2, 3, 4, device="meta"))


def test_twin_matches_loops():
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    y = torch.randn(2, 4, 3, dtype=torch.float64)
    cos = naive.pairwise_similarity(x, y, metric="cosine")
    cor = naive.pairwise_similarity(x, y, metric="correlation")
    for b in range(2):
        for i in range(5):
            for j in range(4):
                u, v = x[b, i].tolist(), y[b, j].tolist()
                dot = sum(p * q for p, q in zip(u, v))
                assert math.isclose(cos[b, i, j].item(), dot / math.hypot(*u) / math.hypot(*v), rel_tol=1e-12)
                mu, mv = sum(u) / 3, sum(v) / 3
                cu, cv = [p - mu for p in u], [q - mv for q in v]
                r = sum(p * q for p, q in zip(cu, cv)) / math.hypot(*cu) / math.hypot(*cv)
                assert math.isclose(cor[b, i, j].item(), r, rel_tol=1e-9, abs_tol=1e-12)
    # And against torch's own definitions.
    assert torch.allclose(cor[0], torch.corrcoef(torch.cat([x[0], y[0]]))[:5, 5:])
    assert torch.allclose(cos[1], F.cosine_similarity(x[1][:, None], y[1][None], dim=-1))


NEIGHBORS = [
    (1, 1, 1, F32, "cosine", False, 0.0),
    (2, 577, 64, F16, "cosine", True, 0.1),
    (2, 300, 1024, BF16, "correlation", True, 0.05),
    (1, 33, 4096, F32, "correlation", False, -0.02),
    (3, 130, 7, F32, "cosine", True, 0.5),
]


@pytest.mark.parametrize(
    "B,N,D,dtype,metric,masked,threshold",
    NEIGHBORS,
    ids=[case_id(B=b, N=n, D=d, dtype=dt, metric=m[:3], masked=mk, thr=t) for b, n, d, dt, m, mk, t in NEIGHBORS],
)
def test_neighbor_count_matches_twin(device, B, N, D, dtype, metric, masked, threshold):
    # Clustered tokens so that many pairs pass the threshold and the counts are not all 0.
    centers = randn(B, 4, D)
    x = (centers[:, torch.randint(0, 4, (N,))] + 0.7 * randn(B, N, D)).to(dtype=dtype, device=device)
    mask = rand_mask(B, N, device=device) if masked else None
    got, want = both(neighbor_count, x, threshold, mask=mask, metric=metric)
    assert got.dtype == torch.int64 and got.shape == (B, N)
    # A pair within rounding of the threshold may be counted by one backend only: bracket the count
    # between the twin's counts at threshold +- eps, and demand near-total exact agreement.
    sim = naive.pairwise_similarity(x, metric=metric, mask=mask)
    sim = sim.masked_fill(torch.eye(N, dtype=torch.bool, device=device), float("-inf"))
    eps = 1e-5
    lo, hi = (sim > threshold + eps).sum(-1), (sim > threshold - eps).sum(-1)
    assert bool(((lo <= got) & (got <= hi)).all()), "counts outside the rounding bracket"
    assert int((got != want).sum()) <= max(1, got.numel() // 200)
    assert int(want.sum()) > 0 or N == 1


def test_neighbor_count_twin_matches_loops():
    x = torch.randn(2, 7, 4)
    x[0, 1] = x[0, 0] * 2.0  # an exact duplicate direction
    mask = torch.tensor([[1, 1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    got = naive.neighbor_count(x, 0.2, mask=mask)
    unit = F.normalize(x, dim=-1)
    for b in range(2):
        for i in range(7):
            want = sum(
                1 for j in range(7)
                if j != i and mask[b, i] and mask[b, j] and float(unit[b, i] @ unit[b, j]) > 0.2
            )
            assert got[b, i].item() == want


def test_neighbor_count_ignores_nan(device):
    x = randn(1, 20, 8, device=device)
    x[0, 3, 0] = float("nan")  # NaN similarities compare False: never counted, on both backends
    got, want = both(neighbor_count, x, 0.0)
    assert torch.equal(got, want)
    assert got[0, 3].item() == 0
