"""Softmax entropy of next-token distributions and its sliding-window mean, for entropy-shaped decoding.

``token_entropy`` streams the vocabulary (no probability tensor is ever written) and is differentiable on
both backends. ``window_entropy`` is the windowed signal ARES-style decoding thresholds on.
"""

from __future__ import annotations

import math

import torch

from tokenreduce.kernels._backend import check_mask, check_tensor, select_backend
from tokenreduce.kernels.entropy import naive

WINDOW_MODES = ("forward", "next")


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy ``H = logsumexp(z) - sum(softmax(z) * z)`` of ``z = logits / temperature`` per row.

    In nats. ``-inf`` logits (banned tokens) have probability 0 and contribute 0; a row of only ``-inf``
    has no distribution and gives NaN; NaN or ``+inf`` logits give NaN for their row (both backends).

    Args:
        logits: ``[..., V]`` float logits (any float dtype; accumulation is float32).
        temperature: softmax temperature, ``> 0``.

    Returns:
        ``[...]`` float32 entropies (float64 for float64 logits on the torch path). Differentiable:
        ``dH/dlogits = -p * (z - sum(p * z)) / temperature``; on the Triton path this is a fused kernel
        and the gradient has the dtype of ``logits``.
    """
    op = "token_entropy"
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or not logits.is_floating_point():
        raise ValueError(f"{op}: `logits` must be a float tensor [..., V]")
    temperature = float(temperature)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"{op}: `temperature` must be a finite number > 0, got {temperature}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{op}: the vocabulary dim of `logits` is empty")
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    if select_backend(op, flat, differentiable=True) == "triton":
        from tokenreduce.kernels.entropy import triton as impl
    else:
        impl = naive
    return impl.token_entropy(flat, temperature).reshape(lead)


def window_entropy(
    entropy: torch.Tensor, window: int = 4, mask: torch.Tensor | None = None, mode: str = "forward"
) -> torch.Tensor:
    """Mean entropy over a sliding window of ``window`` steps.

    * ``mode="forward"`` (the ARES paper): ``out[t] = mean(entropy[t : t + window])``.
    * ``mode="next"`` (the released ARES code): ``out[t] = mean(entropy[t + 1 : t + 1 + window])``.

    Positions whose window does not fit entirely inside the sequence, or (with ``mask``) contains a masked
    step, are NaN: the mean is only defined over a full window of valid steps.

    Args:
        entropy: ``[B, T]`` per-step entropies.
        window: window length, ``>= 1``.
        mask: ``[B, T]`` bool valid steps (e.g. generated, non-padding tokens).
        mode: ``"forward"`` or ``"next"``.

    Returns:
        ``[B, T]`` float32 (float64 for float64 input on the torch path). Not differentiable on the
        Triton path.
    """
    op = "window_entropy"
    check_tensor(op, "entropy", entropy, 2)
    if mode not in WINDOW_MODES:
        raise ValueError(f"{op}: `mode` must be one of {WINDOW_MODES}, got {mode!r}")
    if int(window) != window or window < 1:
        raise ValueError(f"{op}: `window` must be an int >= 1, got {window!r}")
    check_mask(op, "mask", mask, tuple(entropy.shape), entropy.device)
    if select_backend(op, entropy) == "triton":
        from tokenreduce.kernels.entropy import triton as impl
    else:
        impl = naive
    return impl.window_entropy(entropy, int(window), mask, mode)


__all__ = ["WINDOW_MODES", "token_entropy", "window_entropy"]
