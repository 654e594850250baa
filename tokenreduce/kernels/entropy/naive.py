"""Pure-torch softmax entropy and its sliding-window mean: the CPU fallback and the kernels' oracle."""

from __future__ import annotations

import torch

from tokenreduce.kernels.similarity.naive import compute_dtype


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` over the last dim; differentiable through autograd."""
    dtype = compute_dtype(logits)
    z = logits.to(dtype) / temperature
    # -inf logits (banned tokens) have probability 0 and must add 0, not 0 * -inf = NaN, to sum(p * z):
    # clamping them to the most negative finite value does that and keeps their gradient 0.
    zc = z.clamp_min(torch.finfo(dtype).min)
    # Entropy is shift-invariant: centring on the (detached) max keeps lse and sum(p*z) small.
    zc = zc - zc.amax(-1, keepdim=True).detach()
    h = torch.logsumexp(zc, -1) - (torch.softmax(zc, -1) * zc).sum(-1)
    dead = (z == float("-inf")).all(-1)
    return torch.where(dead, torch.full_like(h, float("nan")), h)


def window_entropy(
    entropy: torch.Tensor, window: int, mask: torch.Tensor | None, mode: str
) -> torch.Tensor:
    B, T = entropy.shape
    e = entropy.to(compute_dtype(entropy))
    offset = 0 if mode == "forward" else 1
    out = torch.full((B, T), float("nan"), dtype=e.dtype, device=e.device)
    n = T - window - offset + 1
    if n > 0:
        mean = e.unfold(1, window, 1)[:, offset : offset + n].sum(-1) / window
        if mask is not None:
            full = mask.unfold(1, window, 1)[:, offset : offset + n].all(-1)
            mean = torch.where(full, mean, torch.full_like(mean, float("nan")))
        out[:, :n] = mean
    return out
