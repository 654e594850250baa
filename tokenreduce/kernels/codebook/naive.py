"""Pure-torch nearest-codeword assignment: the CPU fallback and the oracle for the Triton kernel."""

from __future__ import annotations

import torch

from tokenreduce.kernels.similarity.naive import compute_dtype, normalized


def codebook_assign(x: torch.Tensor, codebook: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = compute_dtype(x, codebook)
    if metric == "cosine":
        sim = normalized(x, False, dtype) @ normalized(codebook, False, dtype).T
        value, index = sim.max(1)
        return index, value
    xf, cf = x.to(dtype), codebook.to(dtype)
    dist = (xf * xf).sum(1, keepdim=True) - 2.0 * (xf @ cf.T) + (cf * cf).sum(1)[None, :]
    value, index = dist.min(1)
    return index, value.clamp_min(0.0)
