"""codebook_assign: Triton kernel vs torch twin, exact ties, errors, and the twin vs loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.helpers import TOL, assert_close, assert_same_best, both, case_id, randn
from tokenreduce.kernels import codebook_assign, use_backend

F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16


def _oracle_scores(x: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """``[N, K]`` fp64 scores, higher is better (negated distance for l2)."""
    x, c = x.reshape(-1, x.shape[-1]).double(), codebook.double()
    if metric == "cosine":
        return F.normalize(x, dim=-1) @ F.normalize(c, dim=-1).T
    return -torch.cdist(x, c).square()


# (leading shape of x, K, D, dtype, metric)
CASES = [
    ((1,), 1, 1, F32, "l2"),
    ((700,), 300, 96, F16, "l2"),
    ((700,), 300, 96, F16, "cosine"),
    ((4, 729), 32, 1152, BF16, "cosine"),  # frames x tokens, the VQ shape
    ((50,), 20, 4096, F32, "l2"),
    ((3, 7), 5, 3, F32, "cosine"),
]


@pytest.mark.parametrize(
    "lead,K,D,dtype,metric", CASES,
    ids=[case_id(N="x".join(map(str, lead)), K=k, D=d, dtype=dt, metric=m) for lead, k, d, dt, m in CASES],
)
def test_codebook_matches_twin(device, lead, K, D, dtype, metric):
    x = randn(*lead, D, dtype=dtype, device=device)
    codebook = randn(K, D, dtype=dtype, device=device)
    (gi, gv), (wi, wv) = both(codebook_assign, x, codebook, metric)
    assert gi.shape == lead and gi.dtype == torch.int64 and gv.dtype == torch.float32
    scores = _oracle_scores(x, codebook, metric)
    # Distances grow with D; the tolerance scales with the typical squared norm.
    scale = 1.0 if metric == "cosine" else 2.0 * D
    assert_same_best(gi.flatten(), wi.flatten(), scores, atol=1e-5 * scale, name="index")
    atol, rtol = TOL[dtype]
    assert_close(gv, wv, atol * scale, rtol, name="value")


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_codebook_ties_go_to_lower_index(device, metric):
    # Integer data: every dot product is exact, so duplicated codewords tie exactly on both backends.
    x = torch.randint(-3, 4, (300, 8)).float().to(device)
    base = torch.randint(-3, 4, (5, 8)).float()
    codebook = torch.cat([base, base, base]).to(device)  # codewords j, j + 5, j + 10 are equal
    (gi, gv), (wi, wv) = both(codebook_assign, x, codebook, metric)
    assert torch.equal(gi, wi)
    assert int(gi.max()) < 5
    assert_close(gv, wv, 1e-5, 1e-6, name="value")


def test_codebook_rejects_nonfinite_and_bad_shapes():
    codebook = torch.randn(4, 3)
    x = torch.randn(5, 3)
    x[2, 1] = float("nan")
    for backend in ("torch", "triton"):
        with use_backend(backend), pytest.raises(ValueError, match="NaN or inf"):
            codebook_assign(x, codebook)
    with pytest.raises(ValueError, match="NaN or inf"):
        codebook_assign(torch.randn(5, 3), torch.full((4, 3), float("inf")))
    with pytest.raises(ValueError, match="metric"):
        codebook_assign(torch.randn(5, 3), codebook, "dot")
    with pytest.raises(ValueError, match="codebook"):
        codebook_assign(torch.randn(5, 4), codebook)


def test_twin_matches_loops():
    x, codebook = torch.randn(9, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    codebook[4] = codebook[1]  # a tie: the lower index must win
    x[0] = codebook[1] * 3.0
    with use_backend("torch"):
        l2_idx, l2_val = codebook_assign(x, codebook, "l2")
        cos_idx, cos_val = codebook_assign(x, codebook, "cosine")
    for i in range(9):
        d = [float(((x[i] - codebook[j]) ** 2).sum()) for j in range(6)]
        c = [float(x[i] @ codebook[j] / x[i].norm() / codebook[j].norm()) for j in range(6)]
        assert l2_idx[i].item() == min(range(6), key=lambda j: (d[j], j))
        assert l2_val[i].item() == pytest.approx(min(d), abs=1e-9)
        assert cos_idx[i].item() == min(range(6), key=lambda j: (-c[j], j))
        assert cos_val[i].item() == pytest.approx(max(c), abs=1e-12)
    assert cos_idx[0].item() == 1
