"""Shared helpers of the kernel tests: backends, tolerances, comparisons with readable failures."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from tokenreduce.kernels import interpreter_enabled, triton_available, use_backend

# Both backends accumulate in fp32 from the same (upcast) inputs, so outputs differ only by summation
# order; half inputs get a little more slack for the GPU's tensor-core accumulation. Values returned in
# the input dtype (entropy gradients) get the dtype's own resolution: see HALF_OUT.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (3e-5, 3e-5), torch.bfloat16: (3e-5, 3e-5)}
HALF_OUT = {torch.float32: (1e-6, 1e-5), torch.float16: (1e-5, 2e-3), torch.bfloat16: (1e-4, 1.6e-2)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def kernel_device() -> str:
    """Where the Triton path runs in this session: the interpreter on CPU, else a GPU."""
    if not triton_available():
        pytest.skip("Triton is not installed")
    if interpreter_enabled():
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("the Triton path needs TRITON_INTERPRET=1 (set by tests/conftest.py) or a GPU")


def both(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """``(triton_result, torch_result)`` of the public op ``fn`` on the same inputs."""
    with use_backend("triton"):
        got = fn(*args, **kwargs)
    with use_backend("torch"):
        want = fn(*args, **kwargs)
    return got, want


def case_id(**parts: Any) -> str:
    """``B2-N577-D1024-fp16`` style test id: numbers as ``<key><value>``, dtypes by name, strings as they
    are, ``True`` flags by their key; ``None`` and ``False`` parts are left out."""
    names = {v: k for k, v in DTYPES.items()}
    out = []
    for key, value in parts.items():
        if value is None or value is False:
            continue
        if isinstance(value, torch.dtype):
            out.append(names[value])
        elif value is True:
            out.append(key)
        elif isinstance(value, str):
            out.append(value)
        else:
            out.append(f"{key}{value}")
    return "-".join(out)


def _where(t: torch.Tensor, flat: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(int(i) for i in torch.unravel_index(f, t.shape)) for f in flat]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str = "") -> None:
    """Elementwise ``|a - e| <= atol + rtol |e|``; NaN and +-inf must sit at the same places.

    On failure, says how many elements differ out of how many, the worst absolute error and where, and
    the first few mismatches as ``(index, actual, expected)``.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    nan_a, nan_e = a.isnan(), e.isnan()
    bad = nan_a != nan_e
    inf = a.isinf() | e.isinf()
    bad |= inf & ~(nan_a | nan_e) & (a != e)
    finite = ~(nan_a | nan_e | inf)
    err = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    bad |= finite & (err > atol + rtol * e.abs())
    if not bool(bad.any()):
        return
    flat = bad.flatten().nonzero().flatten()
    worst = int(err.flatten().argmax())
    first = [(idx, float(a.flatten()[f]), float(e.flatten()[f])) for idx, f in zip(_where(a, flat[:5]), flat[:5])]
    raise AssertionError(
        f"{name}: {flat.numel()} of {a.numel()} elements differ (atol={atol}, rtol={rtol}); "
        f"max abs err {float(err.flatten()[worst]):.3g} at {_where(a, torch.tensor([worst]))[0]}; "
        f"first mismatches (index, actual, expected): {first}"
    )


def assert_same_best(
    got_idx: torch.Tensor, want_idx: torch.Tensor, scores: torch.Tensor, atol: float, name: str = ""
) -> None:
    """Indices of a best score agree, except where two candidates' oracle scores are within ``atol``.

    ``scores[..., j]`` is the oracle score of candidate ``j``: a differing pick must be a near-tie, so
    the rounding of either backend may flip it, but no real difference is let through.
    """
    assert got_idx.shape == want_idx.shape, f"{name}: shape {tuple(got_idx.shape)} != {tuple(want_idx.shape)}"
    differ = got_idx != want_idx
    if not bool(differ.any()):
        return
    s_got = scores.gather(-1, got_idx.unsqueeze(-1)).squeeze(-1)
    s_want = scores.gather(-1, want_idx.unsqueeze(-1)).squeeze(-1)
    gap = (s_got - s_want).abs()
    bad = differ & ~(gap <= atol)
    assert not bool(bad.any()), (
        f"{name}: {int(bad.sum())} of {bad.numel()} picks differ by more than a near-tie (atol={atol}); "
        f"first at {_where(bad, bad.flatten().nonzero().flatten()[:3])}, gap {float(gap[bad].max()):.3g}"
    )
    assert int(differ.sum()) <= max(1, differ.numel() // 100), f"{name}: {int(differ.sum())} near-tie flips"


def randn(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu", scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).to(dtype=dtype, device=device)


def rand_mask(*shape: int, p: float = 0.8, device: str = "cpu") -> torch.Tensor:
    """Random bool mask with about ``p`` True, each row keeping at least its first entry."""
    mask = torch.rand(*shape) < p
    if mask.dim() >= 2 and mask.shape[-1] > 0:
        mask[..., 0] = True
    return mask.to(device)


