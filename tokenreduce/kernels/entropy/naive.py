"""Pure-torch softmax entropy and its sliding-window mean: the CPU fallback and the kernels' oracle."""

from __future__ import annotations

import torch

from tokenreduce.kernels.similarity.naive import compute_dtype


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` over the last dim; differentiable through autograd."""
    dtype = compute_dtype(logits)
    z = logits.to(dtype) / temperature
    # A row of only -inf has no distribution: compute on zeros (finite, zero gradient), report NaN.
    dead = (z == float("-inf")).all(-1, keepdim=True)
    z = torch.where(dead, torch.zeros_like(z), z)
    # Entropy is shift-invariant: centring on the (detached) max keeps lse and sum(p*z) small.
    top = z.amax(-1, keepdim=True).detach()
    z = z - torch.where(top.isfinite(), top, torch.zeros_like(top))
    # -inf logits (banned tokens) have p = 0 and must add 0 to sum(p*z), not 0 * -inf = NaN; the where
    # also keeps their gradient exactly 0.
    z_finite = torch.where(z == float("-inf"), torch.zeros_like(z), z)
    h = torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z_finite).sum(-1)
    return torch.where(dead.squeeze(-1), torch.full_like(h, float("nan")), h)


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
