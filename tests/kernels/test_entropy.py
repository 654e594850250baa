"""token_entropy (forward and backward) and window_entropy: Triton kernels vs torch twins vs loops."""

from __future__ import annotations

import math

import pytest
import torch

from tests.kernels.helpers import HALF_OUT, TOL, assert_close, both, case_id, rand_mask, randn
from tokenreduce.kernels import token_entropy, use_backend, window_entropy
from tokenreduce.kernels.entropy import naive
from tokenreduce.kernels.entropy import triton as entropy_triton

F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16
INF, NAN = float("inf"), float("nan")

# (leading shape, V, dtype, temperature, logit scale)
CASES = [
    ((1,), 152064, BF16, 1.0, 3.0),  # Qwen2 vocabulary, one decoding step
    ((64,), 1000, F32, 0.7, 3.0),
    ((7,), 50000, F16, 1.0, 1.0),
    ((2, 3), 999, F32, 2.0, 100.0),  # large logits: the shifted form must not cancel
    ((5,), 1, F32, 1.0, 1.0),  # a single token: entropy 0
]


@pytest.mark.parametrize(
    "lead,V,dtype,temperature,scale", CASES,
    ids=[case_id(R="x".join(map(str, lead)), V=v, dtype=d, T=t, scale=s) for lead, v, d, t, s in CASES],
)
def test_entropy_matches_twin(device, lead, V, dtype, temperature, scale):
    logits = randn(*lead, V, dtype=dtype, device=device, scale=scale)
    got, want = both(token_entropy, logits, temperature)
    assert got.shape == lead and got.dtype == torch.float32
    atol, rtol = TOL[dtype]
    assert_close(got, want, atol * 10, rtol * 10, name="entropy")  # sums over up to 152k terms
    assert bool((got >= -1e-6).all()) and bool((got <= math.log(V) + 1e-4).all())


def test_entropy_special_values(device):
    V = 3000
    logits = randn(6, V, device=device, scale=2.0)
    logits[0, : V - 3] = -INF  # banned tokens: entropy over the 3 others
    logits[1] = -INF  # nothing allowed: no distribution, NaN
    logits[2, 17] = NAN
    logits[3, 5] = INF
    logits[4, 1:] = -INF  # one allowed token: entropy 0
    got, want = both(token_entropy, logits)
    assert_close(got, want, 1e-5, 1e-5, name="entropy")
    assert bool(got[1:4].isnan().all()) and got[4].item() == 0.0
    with use_backend("torch"):
        three = token_entropy(logits[0, V - 3 :])
    assert got[0].item() == pytest.approx(three.item(), abs=1e-6)


@pytest.mark.parametrize("splits", [1, 3, 7])
def test_entropy_split_rows_combine(device, splits):
    logits = randn(3, 20000, device=device, scale=4.0)
    logits[1, 5000:] = -INF  # whole splits of -inf
    h, lse, mz = entropy_triton.entropy_forward(logits, 1.0, splits=splits)
    assert h.dtype == lse.dtype == mz.dtype == torch.float32
    with use_backend("torch"):
        want = token_entropy(logits)
    assert_close(h, want, 1e-5, 1e-5, name=f"splits={splits}")
    assert_close(lse, torch.logsumexp(logits, -1), 1e-5, 1e-6, name="lse")
    assert_close(lse - h, mz, 1e-4, 1e-5, name="sum p z")


GRADS = [(4, 3000, F32, 1.3), (3, 777, F16, 1.0), (2, 5000, BF16, 0.5)]


@pytest.mark.parametrize("R,V,dtype,temperature", GRADS, ids=[case_id(R=r, V=v, dtype=d, T=t) for r, v, d, t in GRADS])
def test_entropy_backward_matches_twin_autograd(device, R, V, dtype, temperature):
    logits = randn(R, V, dtype=dtype, device=device, scale=3.0)
    logits[0, : V // 2] = -INF  # -inf logits: gradient exactly 0, not NaN
    weights = randn(R, device=device)
    grads = []
    for backend in ("triton", "torch"):
        leaf = logits.clone().requires_grad_()
        with use_backend(backend):
            (token_entropy(leaf, temperature) * weights).sum().backward()
        grads.append(leaf.grad)
    got, want = grads
    assert got.dtype == dtype
    assert_close(got, want, *HALF_OUT[dtype], name="grad")
    assert bool((got[0, : V // 2] == 0).all())


def test_entropy_backward_special_rows(device):
    logits = randn(4, 500, device=device, scale=2.0)
    logits[0] = -INF  # no distribution: NaN entropy, zero gradient
    logits[1, 7] = NAN
    logits[2, 9] = INF
    logits[3, :490] = -INF
    grads = []
    for backend in ("triton", "torch"):
        leaf = logits.clone().requires_grad_()
        with use_backend(backend):
            token_entropy(leaf).sum().backward()
        grads.append(leaf.grad)
    assert_close(grads[0], grads[1], 1e-6, 1e-5, name="grad")
    assert bool((grads[0][0] == 0).all()) and bool(grads[0][1:3].isnan().all())
    assert not bool(grads[0][3].isnan().any())


def test_twin_gradcheck_and_formula():
    logits = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    with use_backend("torch"):
        assert torch.autograd.gradcheck(lambda z: token_entropy(z, 0.8), (logits,))
        h = token_entropy(logits, 0.8)
    (grad,) = torch.autograd.grad(h.sum(), logits)
    z = logits.detach() / 0.8
    p = torch.softmax(z, -1)
    assert torch.allclose(grad, -p * (z - (p * z).sum(-1, keepdim=True)) / 0.8)


def test_entropy_twin_matches_loops():
    logits = torch.randn(4, 9, dtype=torch.float64) * 3
    logits[1, :4] = -INF
    h = naive.token_entropy(logits, 1.5)
    for r in range(4):
        z = [v / 1.5 for v in logits[r].tolist()]
        total = sum(math.exp(v) for v in z)
        want = -sum(math.exp(v) / total * math.log(math.exp(v) / total) for v in z if v > -INF)
        assert h[r].item() == pytest.approx(want, abs=1e-12)


def test_entropy_validates():
    with pytest.raises(ValueError, match="temperature"):
        token_entropy(torch.randn(2, 5), 0.0)
    with pytest.raises(ValueError, match="empty"):
        token_entropy(torch.randn(2, 0))


# (B, T, window, dtype, masked)
WINDOWS = [(3, 20, 4, F32, True), (2, 50, 1, F16, False), (1, 1, 4, F32, False), (2, 9, 9, BF16, True)]


@pytest.mark.parametrize("mode", ["forward", "next"])
@pytest.mark.parametrize("B,T,window,dtype,masked", WINDOWS, ids=[case_id(B=b, T=t, w=w, dtype=d, masked=m) for b, t, w, d, m in WINDOWS])
def test_window_matches_twin(device, B, T, window, dtype, masked, mode):
    entropy = (torch.rand(B, T) * 5).to(dtype=dtype, device=device)
    entropy[0, T // 2] = NAN  # a NaN step poisons the windows that hold it, on both backends
    mask = rand_mask(B, T, p=0.9, device=device) if masked else None
    got, want = both(window_entropy, entropy, window, mask, mode)
    assert got.dtype == torch.float32 and got.shape == (B, T)
    assert_close(got, want, 1e-6, 1e-6, name=mode)


def test_window_twin_matches_loops():
    entropy = torch.rand(2, 12, dtype=torch.float64)
    entropy[1, 7] = NAN
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 5] = False
    for mode, offset in (("forward", 0), ("next", 1)):
        with use_backend("torch"):
            got = window_entropy(entropy, 3, mask, mode)
        for b in range(2):
            for t in range(12):
                steps = range(t + offset, t + offset + 3)
                if steps[-1] >= 12 or not all(mask[b, s] for s in steps):
                    assert math.isnan(got[b, t].item())
                else:
                    want = sum(entropy[b, s].item() for s in steps) / 3
                    assert got[b, t].item() == pytest.approx(want, nan_ok=True)
    with pytest.raises(ValueError, match="window"):
        window_entropy(entropy, 0)
    with pytest.raises(ValueError, match="mode"):
        window_entropy(entropy, 2, mode="backward")
