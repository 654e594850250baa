"""The torch twins' open mutation survivors of issue #36: the compute dtype of mixed float32 / float64
inputs, and every mask branch of ``pairwise_similarity`` and ``attention_importance``, against loops over
plain Python floats (float64), written from the ops' definitions."""

from __future__ import annotations

import math

import pytest
import torch

from tokenreduce.kernels.attention.naive import attention_importance
from tokenreduce.kernels.similarity.naive import pairwise_similarity


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _cosine(u, v, center=False):
    u, v = [float(a) for a in u], [float(b) for b in v]
    if center:
        mu, mv = sum(u) / len(u), sum(v) / len(v)
        u, v = [a - mu for a in u], [b - mv for b in v]
    nu = max(math.sqrt(sum(a * a for a in u)), 1e-12)
    nv = max(math.sqrt(sum(b * b for b in v)), 1e-12)
    return sum(a * b for a, b in zip(u, v)) / (nu * nv)


def _similarity_reference(x, y, metric, mask, y_mask, fill):
    y_ = x if y is None else y
    ym = mask if y is None else y_mask
    B, N, M = x.shape[0], x.shape[1], y_.shape[1]
    out = torch.empty(B, N, M, dtype=torch.float64)
    for b in range(B):
        for i in range(N):
            for j in range(M):
                ok = (mask is None or bool(mask[b, i])) and (ym is None or bool(ym[b, j]))
                out[b, i, j] = _cosine(x[b, i], y_[b, j], metric == "correlation") if ok else fill
    return out


@pytest.mark.parametrize("metric", ["cosine", "correlation"])
@pytest.mark.parametrize("wide", ["x", "y", "both"])
def test_pairwise_similarity_of_mixed_dtypes_computes_in_float64(metric, wide):
    """A float64 input makes the whole computation float64: vectors 1e-9 apart in float64 (the same in
    float32) keep their float64 cosines."""
    x = torch.randn(1, 3, 4, generator=_gen(), dtype=torch.float64)
    y = x + 1e-9 * torch.randn(1, 3, 4, generator=_gen(1), dtype=torch.float64)
    x = x.float().double() if wide == "y" else x  # exact in float32, so only the compute dtype differs
    want = _similarity_reference(x, y, metric, None, None, -math.inf)
    if wide == "y":
        x = x.float()
    if wide == "x":
        y = y.float()
        want = _similarity_reference(x, y.double(), metric, None, None, -math.inf)
    got = pairwise_similarity(x, y, metric=metric)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    # one float32 set alone stays float32
    assert pairwise_similarity(x.float(), metric=metric).dtype == torch.float32


@pytest.mark.parametrize("masks", ["x", "y", "both", "self"])
def test_pairwise_similarity_fills_exactly_the_masked_pairs(masks):
    x = torch.randn(2, 4, 3, generator=_gen(2))
    y = torch.randn(2, 5, 3, generator=_gen(3))
    mask = torch.tensor([[True, False, True, True], [False, True, True, True]])
    y_mask = torch.tensor([[True, True, False, True, False], [True, False, True, True, True]])
    if masks == "self":
        got = pairwise_similarity(x, mask=mask, fill=-7.0)
        want = _similarity_reference(x, None, "cosine", mask, None, -7.0)
    else:
        m = mask if masks in ("x", "both") else None
        ym = y_mask if masks in ("y", "both") else None
        got = pairwise_similarity(x, y, mask=m, y_mask=ym, fill=-7.0)
        want = _similarity_reference(x, y, "cosine", m, ym, -7.0)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)


def _importance_reference(q, k, scale, key_mask, query_mask, query_positions, per_head):
    """Per batch and query head: each query's softmax over the keys it may see (allowed by ``key_mask`` and at
    or before its position); a query that sees none, or a masked one, adds nothing; the queries' mean is over
    the valid ones (all of them without a mask); heads averaged unless ``per_head``. kv head of query head
    ``h``: ``h // (Hq / Hkv)``."""
    B, Hq, Q, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, S, dtype=torch.float64)
    for b in range(B):
        valid_q = [query_mask is None or bool(query_mask[b, i]) for i in range(Q)]
        weight = 1.0 / max(sum(valid_q), 1) if query_mask is not None else 1.0 / max(Q, 1)
        for h in range(Hq):
            for i in range(Q):
                if not valid_q[i]:
                    continue
                allowed = [(key_mask is None or bool(key_mask[b, j]))
                           and (query_positions is None or j <= int(query_positions[b, i])) for j in range(S)]
                if not any(allowed):
                    continue
                logits = [sum(float(q[b, h, i, d]) * float(k[b, h // G, j, d]) for d in range(q.shape[3])) * scale
                          if allowed[j] else -math.inf for j in range(S)]
                top = max(v for v in logits if v != -math.inf)
                exp = [math.exp(v - top) if v != -math.inf else 0.0 for v in logits]
                total = sum(exp)
                for j in range(S):
                    out[b, h, j] += weight * exp[j] / total
    return out if per_head else out.mean(1)


@pytest.mark.parametrize("wide", ["q", "k"])
def test_attention_importance_of_mixed_dtypes_computes_in_float64(wide):
    # four queries: the mean's weight 1/4 is exact in float32, where the twin builds it
    q = torch.randn(1, 2, 4, 4, generator=_gen(4), dtype=torch.float64) * 30
    k = torch.randn(1, 2, 5, 4, generator=_gen(5), dtype=torch.float64) * 30
    if wide == "q":
        k = k.float().double()
    else:
        q = q.float().double()
    want = _importance_reference(q, k, 0.37, None, None, None, False)
    got = attention_importance(q if wide == "q" else q.float(), k if wide == "k" else k.float(), scale=0.37)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("chunk", [None, 8])
def test_attention_importance_masks_equal_the_definition(per_head, chunk):
    """Masked keys hold NaN and masked queries inf (neither may reach a valid score); one query sees no key
    (all masked before its position) and adds nothing; grouped heads (4 query heads on 2 kv heads)."""
    B, Hq, Hkv, Q, S, D = 2, 4, 2, 4, 6, 3
    q = torch.randn(B, Hq, Q, D, generator=_gen(6))
    k = torch.randn(B, Hkv, S, D, generator=_gen(7))
    key_mask = torch.tensor([[False, True, True, False, True, True], [True, True, True, True, True, False]])
    query_mask = torch.tensor([[True, True, False, True], [True, True, True, True]])
    positions = torch.tensor([[0, 2, 3, 5], [1, 2, 4, 5]])  # row 0's first query sees only key 0, masked
    k[0, :, 0] = float("nan")
    k[0, :, 3] = float("nan")
    k[1, :, 5] = float("inf")
    q[0, :, 2] = float("inf")
    want = _importance_reference(q, k, 0.5, key_mask, query_mask, positions, per_head)
    got = attention_importance(q, k, scale=0.5, key_mask=key_mask, query_mask=query_mask, query_positions=positions,
                               per_head=per_head, ascending=True, chunk_elements=chunk)
    assert not got.isnan().any()
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    # key mask alone, and query positions alone
    k_clean = torch.randn(B, Hkv, S, D, generator=_gen(8))
    for kwargs in (dict(key_mask=key_mask), dict(query_positions=positions), dict(query_mask=query_mask)):
        want = _importance_reference(q.nan_to_num(posinf=0.0) if "query_mask" not in kwargs else q, k_clean, 0.5,
                                     kwargs.get("key_mask"), kwargs.get("query_mask"), kwargs.get("query_positions"),
                                     per_head)
        got = attention_importance(q.nan_to_num(posinf=0.0) if "query_mask" not in kwargs else q, k_clean, scale=0.5,
                                   per_head=per_head, chunk_elements=chunk, **kwargs)
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("ascending", [False, True])
def test_attention_twin_differentiates_like_the_dense_softmax(ascending):
    """With gradients on (a wrapped model trained), the twin's sum is built out of place and its gradient is
    the dense softmax's: the mean over heads and queries of each key's probability."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    positions = torch.arange(2, 7)[None]
    got = attention_importance(q, k, scale=0.5, query_positions=positions, ascending=ascending, chunk_elements=8)
    causal = torch.arange(7)[None, :] <= positions[0][:, None]
    dense = torch.softmax((q @ k.transpose(-1, -2) * 0.5).masked_fill(~causal, float("-inf")), -1).mean((1, 2))
    torch.testing.assert_close(got, dense)
    weights = torch.arange(7, dtype=torch.float64)
    grads = torch.autograd.grad((got * weights).sum(), (q, k))
    expected = torch.autograd.grad((dense * weights).sum(), (q, k))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)
