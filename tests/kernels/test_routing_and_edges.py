"""Which implementation each public kernel op runs, and the edge cases of the torch twins.

Routing: every op is called under ``auto`` on CPU tensors (the torch twin must run), and under a forced
``torch`` and ``triton`` (the named implementation must run, once); the spies record calls and hand the
real result back. The edge cases (empty rows, a window as long as the sequence, a one-token matching,
thresholds compared in float64) have hand-written expectations.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import tokenreduce.kernels as K
from tokenreduce.kernels import _backend


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# op name -> (package holding naive.py / triton.py, implementation function, call of the public op)
OPS = {
    "attention_importance": ("attention", "attention_importance",
                             lambda: K.attention_importance(torch.randn(1, 2, 3, 4, generator=_gen()),
                                                            torch.randn(1, 2, 5, 4, generator=_gen(1)))),
    "cls_attention": ("attention", "attention_importance",
                      lambda: K.cls_attention(torch.randn(1, 2, 4, generator=_gen()),
                                              torch.randn(1, 2, 5, 4, generator=_gen(1)))),
    "codebook_assign": ("codebook", "codebook_assign",
                        lambda: K.codebook_assign(torch.randn(6, 4, generator=_gen()), torch.randn(3, 4, generator=_gen(1)))),
    "token_entropy": ("entropy", "token_entropy", lambda: K.token_entropy(torch.randn(2, 7, generator=_gen()))),
    "window_entropy": ("entropy", "window_entropy", lambda: K.window_entropy(torch.rand(2, 9, generator=_gen()), 3)),
    "bipartite_matching": ("matching", "bipartite_matching",
                           lambda: K.bipartite_matching(torch.randn(1, 6, 4, generator=_gen()))),
    "topk_select": ("select", "topk_select", lambda: K.topk_select(torch.randn(2, 6, generator=_gen()), 3)),
    "threshold_select": ("select", "threshold_select",
                         lambda: K.threshold_select(torch.randn(2, 6, generator=_gen()), 0.0)),
    "pairwise_similarity": ("similarity", "pairwise_similarity",
                            lambda: K.pairwise_similarity(torch.randn(1, 5, 4, generator=_gen()))),
    "neighbor_count": ("similarity", "neighbor_count",
                       lambda: K.neighbor_count(torch.randn(1, 5, 4, generator=_gen()), 0.1)),
}


def _spy(monkeypatch, module, name, seen, tag):
    real = getattr(module, name)

    def spy(*args, **kwargs):
        seen.append(tag)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


@pytest.mark.parametrize("op", list(OPS))
def test_each_op_runs_the_backend_asked_for(op, monkeypatch):
    package, name, call = OPS[op]
    naive = importlib.import_module(f"tokenreduce.kernels.{package}.naive")
    triton = importlib.import_module(f"tokenreduce.kernels.{package}.triton")
    seen: list[str] = []
    _spy(monkeypatch, naive, name, seen, "torch")
    _spy(monkeypatch, triton, name, seen, "triton")
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    call()  # auto, CPU tensors: the torch twin
    assert seen == ["torch"]
    with K.use_backend("torch"):
        call()
    assert seen == ["torch", "torch"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read at each call by the backend check
    with K.use_backend("triton"):
        call()
    assert seen == ["torch", "torch", "triton"]


def test_window_entropy_defaults_and_a_window_as_long_as_the_sequence():
    e = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    # default: window 4, forward mode: out[t] = mean(e[t : t + 4])
    out = K.window_entropy(e)
    torch.testing.assert_close(out[0, :3], torch.tensor([2.5, 3.5, 4.5]))
    assert out[0, 3:].isnan().all()
    # one full window fits: exactly one value
    out = K.window_entropy(e, 6)
    assert out[0, 0].item() == pytest.approx(3.5) and out[0, 1:].isnan().all()
    out = K.window_entropy(e, 5, mode="next")  # e[1:6]
    assert out[0, 0].item() == pytest.approx(4.0) and out[0, 1:].isnan().all()


def test_bipartite_matching_protects_token_0_only_when_asked():
    # token 0 (A) is closest to token 1 (B); unprotected by default, it is matched with its score
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]])
    index, score = K.bipartite_matching(metric)
    assert index.tolist() == [[0, 1]] and score[0, 0] > 0.99
    index, score = K.bipartite_matching(metric, protect_first=True)
    assert score[0, 0] == float("-inf") and score[0, 1] > 0.99
    # no token at all: nothing to protect, empty results
    index, score = K.bipartite_matching(torch.zeros(2, 0, 3), protect_first=True)
    assert index.shape == (2, 0) and score.shape == (2, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bipartite_matching_one_token_has_no_destination(dtype):
    index, score = K.bipartite_matching(torch.randn(2, 1, 3, dtype=dtype, generator=_gen()))
    two = K.bipartite_matching(torch.randn(2, 2, 3, dtype=dtype, generator=_gen()))
    assert index.tolist() == [[0], [0]] and index.dtype == torch.long
    assert (score == float("-inf")).all() and score.dtype == two[1].dtype


def test_masks_of_the_wrong_shape_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match="`protect` must have shape"):
        K.bipartite_matching(torch.randn(1, 4, 3), protect=torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="`mask` must have shape"):
        K.threshold_select(torch.randn(2, 4), 0.0, mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="`mask` must have shape"):
        K.window_entropy(torch.randn(2, 4), 2, mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="`mask` must be a bool tensor"):
        K.topk_select(torch.randn(2, 4), 1, mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="`mask` must have shape"):
        K.neighbor_count(torch.randn(1, 4, 3), 0.5, mask=torch.ones(1, 5, dtype=torch.bool))


def test_threshold_select_compares_float64_scores_in_float64():
    # 0.1 + 1e-12 is above 0.1 in float64, below float32's 0.1 (0.10000000149...)
    scores = torch.tensor([[0.1 + 1e-12, 0.05]], dtype=torch.float64)
    sel = K.threshold_select(scores, 0.1)
    assert sel.keep.tolist() == [[True, False]] and sel.indices.tolist() == [[0]]
    # float32 scores: the threshold is rounded to float32 with them, 0.1f is not above 0.1f
    sel = K.threshold_select(torch.tensor([[0.1, 0.2]]), 0.1)
    assert sel.keep.tolist() == [[False, True]]


def test_threshold_select_of_no_rows_or_no_columns():
    empty_rows = K.threshold_select(torch.zeros(0, 5), 0.0)
    assert empty_rows.indices.shape == (0, 0) and empty_rows.keep.shape == (0, 5)
    empty_cols = K.threshold_select(torch.zeros(3, 0), 0.0)
    assert empty_cols.indices.shape == (3, 0) and empty_cols.keep.shape == (3, 0)


def test_cls_attention_passes_scale_and_key_mask_on():
    q = torch.randn(2, 2, 4, generator=_gen())
    k = torch.randn(2, 2, 5, 4, generator=_gen(1))
    key_mask = torch.tensor([[True, True, False, True, True], [True, True, True, True, False]])
    got = K.cls_attention(q, k, scale=0.3, key_mask=key_mask)
    logits = torch.einsum("bhd,bhnd->bhn", q, k) * 0.3
    probs = logits.masked_fill(~key_mask[:, None], float("-inf")).softmax(-1).mean(1)
    torch.testing.assert_close(got, probs[:, 1:])
    assert (got[0, 1] == 0) and (got[1, 3] == 0)


def test_pairwise_similarity_of_two_sets_with_their_masks():
    x = torch.randn(1, 3, 4, generator=_gen())
    y = torch.randn(1, 2, 4, generator=_gen(1))
    y_mask = torch.tensor([[True, False]])
    got = K.pairwise_similarity(x, y, y_mask=y_mask)
    want = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(y, dim=-1).transpose(1, 2)
    torch.testing.assert_close(got[..., 0], want[..., 0])
    assert (got[..., 1] == float("-inf")).all()
    with pytest.raises(ValueError, match="`y_mask` must have shape"):
        K.pairwise_similarity(x, y, y_mask=torch.ones(1, 3, dtype=torch.bool))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("float64", ["x", "codebook"])
def test_codebook_assign_of_mixed_dtypes_computes_in_float64(metric, float64):
    x = torch.randn(5, 3, generator=_gen(), dtype=torch.float64)
    codebook = torch.randn(4, 3, generator=_gen(1), dtype=torch.float64)
    if metric == "l2":
        want_value, want_index = torch.cdist(x, codebook).pow(2).min(1)
    else:
        sim = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(codebook, dim=-1).T
        want_value, want_index = sim.max(1)
    if float64 == "x":
        codebook = codebook.float()
    else:
        x = x.float()
    with K.use_backend("torch"):
        index, value = K.codebook_assign(x, codebook, metric)
    assert value.dtype == torch.float64 and index.tolist() == want_index.tolist()
    torch.testing.assert_close(value, want_value, atol=1e-6, rtol=1e-6)


def test_codebook_assign_takes_one_vector_and_refuses_what_is_not_a_float_tensor():
    codebook = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    index, value = K.codebook_assign(torch.tensor([0.9, 0.8]), codebook)
    assert index.shape == () and index.item() == 1 and value.item() == pytest.approx(0.05)
    for bad in (torch.tensor([[1, 2]]), [[1.0, 2.0]]):
        with pytest.raises(ValueError, match="`x` must be a float tensor"):
            K.codebook_assign(bad, codebook)


def test_window_entropy_is_float32_or_float64_for_float64():
    with K.use_backend("torch"):
        half = K.window_entropy(torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float16), 2)
    assert half.dtype == torch.float32
    e = torch.tensor([[0.1, 0.2, 0.3 + 1e-12, 0.4]], dtype=torch.float64)
    with K.use_backend("torch"):
        out = K.window_entropy(e, 2)
    assert out.dtype == torch.float64
    assert out[0, :3].tolist() == [(0.1 + 0.2) / 2, (0.2 + (0.3 + 1e-12)) / 2, ((0.3 + 1e-12) + 0.4) / 2]


def test_neighbor_count_is_strictly_above_the_threshold():
    # two identical unit vectors: cosine exactly 1.0, not above a threshold of 1.0
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    assert K.neighbor_count(x, 1.0).tolist() == [[0, 0, 0]]
    assert K.neighbor_count(x, 0.5).tolist() == [[1, 1, 0]]


def test_attention_importance_of_one_valid_query_sums_to_one():
    q = torch.randn(1, 2, 3, 4, generator=_gen())
    k = torch.randn(1, 2, 5, 4, generator=_gen(1))
    query_mask = torch.tensor([[False, True, False]])
    got = K.attention_importance(q, k, query_mask=query_mask)
    want = (torch.einsum("bhd,bhsd->bhs", q[:, :, 1], k) * 4**-0.5).softmax(-1).mean(1)
    torch.testing.assert_close(got, want)
