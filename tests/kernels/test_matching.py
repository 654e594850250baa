"""bipartite_matching: Triton kernel vs torch twin, protection, errors, and the twin vs ToMe's loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.helpers import TOL, assert_close, assert_same_best, both, case_id, rand_mask, randn
from tokenreduce.kernels import bipartite_matching, use_backend

F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16


def _oracle_scores(metric: torch.Tensor, protect: torch.Tensor | None) -> torch.Tensor:
    m = F.normalize(metric.double(), dim=-1)
    scores = m[:, ::2] @ m[:, 1::2].transpose(-1, -2)
    if protect is not None:
        scores = scores.masked_fill(protect[:, 1::2][:, None, :], -math.inf)
    return scores


# (B, N, D, dtype, protect_first, random protect mask)
CASES = [
    (2, 1, 8, F32, False, False),
    (2, 2, 8, F32, True, False),
    (2, 3, 5, F16, False, True),
    (3, 577, 64, F16, True, False),  # CLIP ViT-L/14-336: CLS + 576 patches
    (2, 101, 4096, BF16, False, True),
    (1, 600, 32, F32, True, True),  # several B tiles per program
]


@pytest.mark.parametrize(
    "B,N,D,dtype,first,masked", CASES,
    ids=[case_id(B=b, N=n, D=d, dtype=dt, protect_first=f, protect=m) for b, n, d, dt, f, m in CASES],
)
def test_matching_matches_twin(device, B, N, D, dtype, first, masked):
    metric = randn(B, N, D, dtype=dtype, device=device)
    if N > 20:
        metric[:, 10:20] = metric[:, 10:11]  # duplicated tokens (flat image regions) tie exactly
    protect = rand_mask(B, N, p=0.2, device=device) if masked else None
    (gi, gs), (wi, ws) = both(bipartite_matching, metric, protect_first=first, protect=protect)
    Na = (N + 1) // 2
    assert gi.shape == gs.shape == (B, Na) and gi.dtype == torch.int64 and gs.dtype == torch.float32
    full = protect.clone() if protect is not None else torch.zeros(B, N, dtype=torch.bool, device=device)
    full[:, 0] |= first
    scores = _oracle_scores(metric, full)
    finite = ~ws.isinf()
    assert_same_best(gi[finite], wi[finite], scores[finite], atol=1e-5, name="index")
    assert torch.equal(gi[~finite], wi[~finite])
    assert_close(gs, ws, *TOL[dtype], name="score")
    if first:
        assert bool((gs[:, 0] == -math.inf).all()) and bool((gi[:, 0] == 0).all())
    a_protected = full[:, ::2]
    assert bool((gs[a_protected] == -math.inf).all())
    if N > 1:
        chosen_b = full[:, 1::2].gather(1, gi.clamp_max(N // 2 - 1))
        assert not bool((chosen_b & finite).any()), "a protected B token was chosen as destination"


def test_matching_all_destinations_protected(device):
    metric = randn(2, 9, 4, device=device)
    protect = torch.zeros(2, 9, dtype=torch.bool, device=device)
    protect[:, 1::2] = True
    (gi, gs), (wi, ws) = both(bipartite_matching, metric, protect=protect)
    assert bool((gs == -math.inf).all()) and bool((gi == 0).all())
    assert torch.equal(gi, wi) and torch.equal(gs, ws)


def test_matching_rejects_nonfinite():
    metric = torch.randn(1, 6, 4)
    metric[0, 3, 2] = float("inf")
    for backend in ("torch", "triton"):
        with use_backend(backend), pytest.raises(ValueError, match="NaN or inf"):
            bipartite_matching(metric)


def test_twin_matches_tome_loops():
    # ToMe's bipartite_soft_matching, up to its node_max / node_idx, written out token by token.
    B, N, D = 2, 9, 3
    metric = torch.randn(B, N, D, dtype=torch.float64)
    metric[1, 3] = metric[1, 5]  # B tokens 1 and 2 of row 1 are equal: lower index wins
    with use_backend("torch"):
        idx, score = bipartite_matching(metric, protect_first=True)
    for b in range(B):
        unit = [metric[b, t] / metric[b, t].norm() for t in range(N)]
        for i, a in enumerate(range(0, N, 2)):
            sims = [float(unit[a] @ unit[t]) for t in range(1, N, 2)]
            if a == 0:  # class token: never merged
                assert score[b, i].item() == -math.inf and idx[b, i].item() == 0
                continue
            best = max(sims)
            assert idx[b, i].item() == sims.index(best)
            assert score[b, i].item() == pytest.approx(best, abs=1e-12)
