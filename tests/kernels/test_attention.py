"""attention_importance and cls_attention: Triton kernel vs torch twin, and the twin vs loops."""

from __future__ import annotations

import math

import pytest
import torch

from tests.kernels.helpers import TOL, assert_close, both, case_id, rand_mask, randn
from tokenreduce.kernels import attention_importance, cls_attention, use_backend
from tokenreduce.kernels.attention import naive

F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16

# (B, Hq, Hkv, Q, S, D, dtype, key_mask, query_mask, per_head)
CASES = [
    (1, 32, 8, 40, 640, 128, F16, True, False, False),  # the FastV-style shape
    (2, 4, 2, 1, 100, 64, F32, True, False, True),
    (2, 4, 1, 7, 333, 80, BF16, True, True, True),
    (1, 2, 2, 70, 50, 16, F16, False, True, False),  # more queries than one query block
    (3, 2, 2, 3, 1, 1, F32, False, False, False),
    (1, 2, 1, 5, 1500, 32, F32, True, True, False),  # several key blocks: online softmax rescaling
]


@pytest.mark.parametrize(
    "B,Hq,Hkv,Q,S,D,dtype,km,qm,per_head",
    CASES,
    ids=[case_id(B=b, Hq=hq, Hkv=hk, Q=q, S=s, D=d, dtype=dt, kmask=km, qmask=qm, heads=ph)
         for b, hq, hk, q, s, d, dt, km, qm, ph in CASES],
)
def test_attention_matches_twin(device, B, Hq, Hkv, Q, S, D, dtype, km, qm, per_head):
    q = randn(B, Hq, Q, D, dtype=dtype, device=device, scale=2.0)
    k = randn(B, Hkv, S, D, dtype=dtype, device=device, scale=2.0)
    key_mask = rand_mask(B, S, device=device) if km else None
    query_mask = rand_mask(B, Q, device=device) if qm else None
    got, want = both(attention_importance, q, k, key_mask=key_mask, query_mask=query_mask, per_head=per_head)
    assert got.shape == ((B, Hq, S) if per_head else (B, S)) and got.dtype == torch.float32
    assert_close(got, want, *TOL[dtype], name="importance")
    assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), 1e-5, 1e-5, name="rows sum to 1")
    if key_mask is not None:
        masked = (~key_mask).view(B, *(1,) * (got.dim() - 2), S).expand_as(got)
        assert bool((got[masked] == 0).all()), "masked keys must get exactly 0"


def test_attention_empty_rows_and_scale(device):
    B, H, Q, S, D = 3, 2, 4, 37, 16
    q, k = randn(B, H, Q, D, device=device), randn(B, H, S, D, device=device)
    key_mask, query_mask = rand_mask(B, S, device=device), rand_mask(B, Q, device=device)
    key_mask[1] = False  # no valid key: zero probabilities, not NaN
    query_mask[2] = False  # no valid query: zeros
    q[0, :, ~query_mask[0]] = float("nan")  # masked queries contribute nothing, even NaN
    got, want = both(attention_importance, q, k, scale=0.3, key_mask=key_mask, query_mask=query_mask)
    assert_close(got, want, *TOL[F32], name="importance")
    assert bool((got[1:] == 0).all()) and not bool(got.isnan().any())


def test_attention_nan_propagates_like_twin(device):
    q, k = randn(2, 2, 3, 8, device=device), randn(2, 2, 20, 8, device=device)
    k[0, 1, 5, 2] = float("nan")
    got, want = both(attention_importance, q, k)
    assert_close(got, want, *TOL[F32], name="nan")
    assert bool(got[0].isnan().all()) and not bool(got[1].isnan().any())


@pytest.mark.parametrize("drop_cls", [True, False])
@pytest.mark.parametrize("dtype", [F16, F32], ids=["fp16", "fp32"])
def test_cls_attention_matches_twin(device, dtype, drop_cls):
    B, H, N, D = 2, 4, 65, 32
    q_cls, k = randn(B, H, D, dtype=dtype, device=device), randn(B, H, N, D, dtype=dtype, device=device)
    got, want = both(cls_attention, q_cls, k, drop_cls=drop_cls)
    assert got.shape == (B, N - 1 if drop_cls else N)
    assert_close(got, want, *TOL[dtype], name="cls")
    heads, _ = both(cls_attention, q_cls, k, drop_cls=drop_cls, per_head=True)
    assert_close(heads.mean(1), got, 1e-6, 1e-5, name="per-head mean")


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    if m == -math.inf:
        return [0.0] * len(xs)
    e = [math.exp(v - m) for v in xs]
    return [v / sum(e) for v in e]


def test_twin_matches_loops():
    B, Hq, Hkv, Q, S, D = 2, 4, 2, 3, 6, 5
    q, k = torch.randn(B, Hq, Q, D, dtype=torch.float64), torch.randn(B, Hkv, S, D, dtype=torch.float64)
    key_mask = torch.tensor([[1, 1, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    query_mask = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool)
    scale = 0.7
    got = naive.attention_importance(q, k, scale=scale, key_mask=key_mask, query_mask=query_mask, per_head=True)
    for b in range(B):
        for h in range(Hq):
            total = [0.0] * S
            valid_q = [i for i in range(Q) if query_mask[b, i]]
            for i in valid_q:
                logits = [
                    scale * float(q[b, h, i] @ k[b, h // (Hq // Hkv), s]) if key_mask[b, s] else -math.inf
                    for s in range(S)
                ]
                for s, p in enumerate(_softmax(logits)):
                    total[s] += p / len(valid_q)
            for s in range(S):
                assert math.isclose(got[b, h, s].item(), total[s], rel_tol=1e-10, abs_tol=1e-12)


def test_cls_twin_matches_loops():
    B, H, N, D = 2, 3, 5, 4
    q_cls, k = torch.randn(B, H, D, dtype=torch.float64), torch.randn(B, H, N, D, dtype=torch.float64)
    with use_backend("torch"):
        got = cls_attention(q_cls, k)
    for b in range(B):
        want = [0.0] * (N - 1)
        for h in range(H):
            probs = _softmax([float(q_cls[b, h] @ k[b, h, j]) / math.sqrt(D) for j in range(N)])
            for j in range(1, N):
                want[j - 1] += probs[j] / H
        for j in range(N - 1):
            assert math.isclose(got[b, j].item(), want[j], rel_tol=1e-10)


def test_attention_rejects_bad_heads():
    with pytest.raises(ValueError, match="multiple"):
        attention_importance(torch.randn(1, 3, 1, 4), torch.randn(1, 2, 5, 4))
    with pytest.raises(ValueError, match="D=4"):
        attention_importance(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 5, 8))


@pytest.mark.parametrize("dtype", [F16, F32], ids=["fp16", "fp32"])
def test_causal_query_positions_match_twin_and_loops(device, dtype):
    B, Hq, Hkv, Q, S, D = 2, 4, 2, 5, 90, 32
    q = randn(B, Hq, Q, D, dtype=dtype, device=device)
    k = randn(B, Hkv, S, D, dtype=dtype, device=device)
    positions = torch.tensor([[0, 10, 44, 89, 3], [5, 5, 60, 1, 70]], device=device)
    key_mask = rand_mask(B, S, device=device)
    key_mask[:, 0] = False  # query 0 of row 0 then sees no key: it adds nothing
    got, want = both(attention_importance, q, k, key_mask=key_mask, query_positions=positions)
    assert_close(got, want, *TOL[dtype], name="causal")
    qf, kf = q.double().cpu(), k.double().cpu().repeat_interleave(Hq // Hkv, dim=1)
    for b in range(B):
        expected = torch.zeros(S, dtype=torch.float64)
        for i in range(Q):
            allowed = (torch.arange(S) <= positions[b, i].cpu()) & key_mask[b].cpu()
            if not bool(allowed.any()):
                continue
            logits = torch.einsum("hd,hsd->hs", qf[b, :, i], kf[b]) / math.sqrt(D)
            expected += torch.softmax(logits.masked_fill(~allowed, -math.inf), -1).mean(0) / Q
        assert_close(want[b].cpu().double(), expected, 1e-3 if dtype == F16 else 1e-5, 1e-3, name=f"loops row {b}")


def _full_matrix(q, k, scale, key_mask=None, query_mask=None, query_positions=None):
    """The whole ``[B, Hq, Q, S]`` probability matrix at once, in float64: the reference the streaming
    twin and the Triton kernel must match."""
    B, Hq, Q, _ = q.shape
    S = k.shape[2]
    kf = k.double().cpu().repeat_interleave(Hq // k.shape[1], dim=1)
    logits = torch.einsum("bhqd,bhsd->bhqs", q.double().cpu(), kf) * scale
    allowed = torch.ones(B, Q, S, dtype=torch.bool)
    if key_mask is not None:
        allowed &= key_mask.cpu()[:, None, :]
    if query_positions is not None:
        allowed &= torch.arange(S)[None, None, :] <= query_positions.cpu()[:, :, None]
    probs = torch.softmax(logits.masked_fill(~allowed[:, None], -math.inf), -1).nan_to_num(0.0)
    weight = torch.ones(B, Q, dtype=torch.float64) if query_mask is None else query_mask.cpu().double()
    weight = weight / weight.sum(1, keepdim=True).clamp_min(1.0)
    return (probs * weight[:, None, :, None]).sum(2).mean(1)


def _atp_case(B, Hq, Hkv, Q, S, D, dtype, device):
    """Every visual token as a causal query against the whole sequence (ATP's self-modality score)."""
    q = randn(B, Hq, Q, D, dtype=dtype, device=device, scale=2.0)
    k = randn(B, Hkv, S, D, dtype=dtype, device=device, scale=2.0)
    start = torch.tensor([5, 9][:B], device=device)
    positions = start[:, None] + torch.arange(Q, device=device)[None]
    key_mask = torch.ones(B, S, dtype=torch.bool, device=device)
    key_mask[1:, :4] = False  # left padding of the second row
    query_mask = torch.ones(B, Q, dtype=torch.bool, device=device)
    query_mask[1:, Q - 7 :] = False  # that row has fewer visual tokens
    return q, k, dict(key_mask=key_mask, query_mask=query_mask, query_positions=positions)


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
def test_streaming_twin_matches_full_matrix(dtype):
    q, k, masks = _atp_case(2, 8, 4, 150, 190, 32, dtype, "cpu")
    want = _full_matrix(q, k, 32**-0.5, **masks)
    for chunk in (8 * 190, 8 * 190 * 37, None):  # one query per chunk, ragged chunks, the default
        got = naive.attention_importance(q, k, scale=32**-0.5, chunk_elements=chunk, **masks)
        assert_close(got.double(), want, 1e-6, 1e-5, name=f"chunk {chunk}")


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_triton_streaming_matches_full_matrix(device, dtype):
    q, k, masks = _atp_case(2, 4, 2, 100, 140, 32, dtype, device)
    with use_backend("triton"):
        got = attention_importance(q, k, **masks)
    assert_close(got.cpu().double(), _full_matrix(q, k, 32**-0.5, **masks), 1e-6, 1e-4, name="triton vs full")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_ascending_twin_skips_unseen_keys_with_the_same_scores(dtype):
    # ATP's case, and the tightest one the promise allows: the queries are the last Q columns (query i at
    # S - Q + i), the second row's first queries left padding at position 0 (masked).
    q, k, masks = _atp_case(2, 8, 4, 150, 190, 32, dtype, "cpu")
    tight = torch.arange(40, 190)[None].repeat(2, 1)
    tight[1, :6] = 0
    tight_mask = torch.ones(2, 150, dtype=torch.bool)
    tight_mask[1, :6] = False
    cases = [masks, dict(key_mask=masks["key_mask"], query_mask=tight_mask, query_positions=tight)]
    for case in cases:
        want = _full_matrix(q, k, 32**-0.5, **case)
        for chunk in (8 * 190, 8 * 190 * 37, None):
            got = naive.attention_importance(q, k, scale=32**-0.5, chunk_elements=chunk, ascending=True, **case)
            assert_close(got.double(), want, 1e-6, 1e-5, name=f"ascending, chunk {chunk}")
    # Through the dispatcher too (the Triton kernel takes no promise: it scores every key).
    got = attention_importance(q, k, ascending=True, **cases[1])
    assert_close(got.double(), _full_matrix(q, k, 32**-0.5, **cases[1]), 1e-6, 1e-5, name="dispatched")


def test_ascending_twin_query_that_sees_no_key_past_skipped_width():
    # Masked queries at position 0 (left padding of 4 columns) see no valid key: they must add nothing, and
    # must not turn the sum into NaN when every key of their chunk's skipped width is padding.
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 8, 4, generator=g)
    k = torch.randn(1, 2, 10, 4, generator=g)
    key_mask = torch.ones(1, 10, dtype=torch.bool)
    key_mask[0, :4] = False
    case = dict(key_mask=key_mask, query_mask=torch.tensor([[False, False] + [True] * 6]),
                query_positions=torch.tensor([[0, 0, 4, 5, 6, 7, 8, 9]]))
    want = _full_matrix(q, k, 0.5, **case)
    for chunk in (2 * 10, None):  # one query per chunk (the first chunk's width holds only padding), the default
        got = naive.attention_importance(q, k, scale=0.5, chunk_elements=chunk, ascending=True, **case)
        assert_close(got.double(), want, 1e-6, 1e-5, name=f"chunk {chunk}")
