"""Pure-torch nearest-codeword assignment: the CPU fallback and the oracle for the Triton kernel."""

from __future__ import annotations

import torch

from tokenreduce.kernels.similarity.naive import compute_dtype, normalized


def _first_of_duplicates(codebook: torch.Tensor) -> torch.Tensor | None:
    """Index of the first occurrence of each distinct codeword, or ``None`` when all are distinct.

    CPU BLAS may round identical columns of a matmul differently (edge tiles take another code path), so
    duplicated codewords could tie inexactly and let a higher index win; scoring only the first copy of
    each codeword makes "ties go to the lower index" exact for them.
    """
    unique, inverse = torch.unique(codebook, dim=0, return_inverse=True)
    if unique.shape[0] == codebook.shape[0]:
        return None
    order = torch.arange(codebook.shape[0], device=codebook.device)
    first = torch.full((unique.shape[0],), codebook.shape[0], dtype=torch.long, device=codebook.device)
    return first.scatter_reduce(0, inverse, order, reduce="amin").sort().values


def codebook_assign(x: torch.Tensor, codebook: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    first = _first_of_duplicates(codebook)
    if first is not None:
        codebook = codebook[first]
    dtype = compute_dtype(x, codebook)
    if metric == "cosine":
        sim = normalized(x, False, dtype) @ normalized(codebook, False, dtype).T
        value, index = sim.max(1)
    else:
        xf, cf = x.to(dtype), codebook.to(dtype)
        dist = (xf * xf).sum(1, keepdim=True) - 2.0 * (xf @ cf.T) + (cf * cf).sum(1)[None, :]
        value, index = dist.min(1)
        value = value.clamp_min(0.0)
    return (index if first is None else first[index]), value
