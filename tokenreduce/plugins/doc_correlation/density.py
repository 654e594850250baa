"""Information density of a crop and the token budgets it buys (TCC's local-information branch).

A token of a crop is *redundant* when more than ``max_neighbors`` other tokens of the same crop are more
similar to it than ``threshold`` (cosine or Pearson correlation of shallow-layer features, counted by
:func:`tokenreduce.kernels.neighbor_count`). The crop's redundancy ``r`` is the share of redundant tokens
and its information density is ``d = 1 - r``: a blank margin (every patch alike) has ``d`` near 0, a crop
of text-like glyphs (patches that differ) has ``d`` near 1. Budgets follow the density, either per crop
(``ceil(d * N)``) or by sharing an image's global budget among its crops in proportion to ``d * N``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tokenreduce import kernels


def neighbor_bound(max_neighbors: int | float, n: int) -> float:
    """The neighbour count above which a token of an ``n``-token crop is redundant.

    An int is a count; a float is a fraction of the crop's other tokens (``max_neighbors * (n - 1)``), so
    the same setting means the same thing for crops of different sizes (unpadded canvases, thumbnails).
    """
    if isinstance(max_neighbors, float):
        return max_neighbors * max(n - 1, 0)
    return float(max_neighbors)


def neighbor_counts(features: torch.Tensor, threshold: float, metric: str = "cosine") -> torch.Tensor:
    """Per token of ``features: [n, d]`` (one crop), how many other tokens are alike beyond ``threshold``.

    Tokens whose features hold NaN (slots with no tower patch) count -1 and are nobody's neighbour.
    """
    valid = ~torch.isnan(features).any(dim=-1)
    # NaN rows zeroed and masked out (they count nobody and nobody counts them): no host read of `valid`
    x = torch.nan_to_num(features.float(), nan=0.0)
    counts = kernels.neighbor_count(x[None], threshold, mask=valid[None], metric=metric)[0].long()
    return torch.where(valid, counts, -1)


def redundancy(features: torch.Tensor, threshold: float, max_neighbors: int | float,
               metric: str = "cosine") -> torch.Tensor:
    """Share of redundant tokens among ``features: [n, d]`` (one crop), a 0-dim float tensor in [0, 1].

    Tokens whose features hold NaN (slots with no tower patch) are left out.
    """
    return redundancy_of(neighbor_counts(features, threshold, metric), max_neighbors)


def redundancy_of(counts: torch.Tensor, max_neighbors: int | float) -> torch.Tensor:
    """:func:`redundancy` from the crop's :func:`neighbor_counts`."""
    valid = counts >= 0
    n = int(valid.sum())
    if n == 0:
        return torch.zeros((), dtype=torch.float32, device=counts.device)
    return (counts[valid].float() > neighbor_bound(max_neighbors, n)).float().mean()


def distinctiveness(counts: torch.Tensor) -> torch.Tensor:
    """Per token, the share of the crop's other tokens NOT alike it (``1 - count / (n - 1)``; NaN slots 0).

    The token-level reading of the density: a token of a blank margin or a repeated text line resembles many
    others and scores near 0, a token unlike the rest of its crop (a glyph, a coloured frame) near 1.
    """
    valid = counts >= 0
    others = (valid.sum() - 1).clamp_min(1).float()  # stays on the device
    return torch.where(valid, 1.0 - counts.float() / others, torch.zeros((), device=counts.device))


def density_on_device(counts: torch.Tensor, max_neighbors: int | float) -> torch.Tensor:
    """``1 - redundancy_of(counts, max_neighbors)`` as a 0-dim float32 tensor on ``counts``' device, the
    same value without reading the number of valid tokens on the host."""
    valid = counts >= 0
    n = valid.sum()
    if isinstance(max_neighbors, float):
        bound = ((n - 1).clamp_min(0).double() * max_neighbors).float()
    else:
        bound = torch.tensor(float(max_neighbors), device=counts.device)
    hits = ((counts.float() > bound) & valid).sum()
    return 1.0 - hits.float() / n.clamp_min(1).float()


def information_density(features: torch.Tensor, threshold: float, max_neighbors: int | float,
                        metric: str = "cosine") -> float:
    """``d = 1 - r`` of one crop (see :func:`redundancy`)."""
    return float(1.0 - redundancy(features, threshold, max_neighbors, metric))


def adaptive_budgets(densities: Sequence[float], sizes: Sequence[int], min_tokens: int) -> list[int]:
    """Per crop ``ceil(d * N)`` tokens, at least ``min_tokens`` (and at most ``N``)."""
    return [max(min(min_tokens, n), min(n, math.ceil(d * n - 1e-9))) for d, n in zip(densities, sizes)]


def distribute(total: int, weights: Sequence[float], lower: Sequence[int], upper: Sequence[int]) -> list[int]:
    """Integers ``k_i`` in ``[lower_i, upper_i]`` summing to ``total`` (clamped to what the bounds allow),
    shared in proportion to ``weights`` above the lower bounds.

    Water-filling: a crop that reaches its cap passes its excess on to the others; crops whose weights are
    all zero share by remaining capacity. Rounding gives the leftover units to the largest fractional
    parts, compared at 1e-6 (lower crop index first on ties), so the result is deterministic.
    """
    count = len(weights)
    low = [int(v) for v in lower]
    cap = [int(u) - int(v) for u, v in zip(upper, lower)]
    if any(c < 0 for c in cap):
        raise ValueError(f"`lower` {list(lower)} exceeds `upper` {list(upper)}")
    extra = min(max(int(total) - sum(low), 0), sum(cap))
    alloc = [0.0] * count
    remaining = float(extra)
    active = [c > 0 for c in cap]
    while remaining > 1e-9 and any(active):
        w = [max(float(weights[i]), 0.0) if active[i] else 0.0 for i in range(count)]
        if sum(w) <= 0:
            w = [float(cap[i] - alloc[i]) if active[i] else 0.0 for i in range(count)]
        scale = remaining / sum(w)
        taken = 0.0
        for i in range(count):
            if w[i] <= 0:
                continue
            take = min(w[i] * scale, cap[i] - alloc[i])
            alloc[i] += take
            taken += take
            if cap[i] - alloc[i] <= 1e-9:
                active[i] = False
        remaining -= taken
        if taken <= 1e-12:
            break
    whole = [min(cap[i], math.floor(alloc[i] + 1e-9)) for i in range(count)]
    short = extra - sum(whole)
    # fractional parts compared at 1e-6, so that equal shares tie whatever the float error (and the device
    # twin, distribute_on_device, orders them the same way)
    order = sorted(range(count), key=lambda i: (-round((alloc[i] - whole[i]) * 1e6), i))
    for i in order:
        if short <= 0:
            break
        if whole[i] < cap[i]:
            whole[i] += 1
            short -= 1
    return [lo + w for lo, w in zip(low, whole)]


def distribute_on_device(total: int, weights: torch.Tensor, lower: Sequence[int], upper: Sequence[int]) -> torch.Tensor:
    """:func:`distribute` without host reads: ``weights`` is a device tensor, the bounds and ``total`` are
    host ints (shapes and config), so the sum of the result is known on the host.

    The water level comes from a sort instead of rounds: with ``r_i = cap_i / w_i`` ascending, the crops
    with ``f(r_i) <= extra`` are full (``f(x) = sum_i min(cap_i, x w_i)``) and the level shares what is left
    among the rest in proportion to their weights; crops of weight zero share what the others cannot take
    by capacity. Rounding as :func:`distribute` (largest fractional parts, lower index on ties).
    """
    device = weights.device
    count = len(lower)
    caps = [int(u) - int(v) for u, v in zip(upper, lower)]
    if any(c < 0 for c in caps):
        raise ValueError(f"`lower` {list(lower)} exceeds `upper` {list(upper)}")
    extra = min(max(int(total) - sum(int(v) for v in lower), 0), sum(caps))
    low = torch.tensor([int(v) for v in lower], dtype=torch.long, device=device)
    if count == 0 or extra == 0:
        return low
    cap = torch.tensor(caps, dtype=torch.float64, device=device)
    w = torch.where(cap > 0, weights.double().clamp_min(0.0), 0.0)
    positive = w > 0
    ratio = torch.where(positive, cap / torch.where(positive, w, 1.0), float("inf"))
    ratio, order = torch.sort(ratio, stable=True)
    full = torch.cumsum(cap[order], 0)  # caps of the crops up to each one in ratio order
    after = w.sum() - torch.cumsum(w[order], 0)  # weights of the crops after it
    reached = torch.where(torch.isfinite(ratio), full + torch.nan_to_num(ratio * after, posinf=0.0), float("inf"))
    saturated = (reached <= extra).sum()  # how many crops are full
    full = torch.cat([full.new_zeros(1), full])
    after = torch.cat([w.sum().view(1), after])
    left, weight = full.gather(0, saturated.view(1))[0], after.gather(0, saturated.view(1))[0]  # no host index
    level = torch.where(weight > 0, (extra - left) / weight.clamp_min(1e-300), float("inf"))
    alloc = torch.where(positive, torch.minimum(cap, level * torch.where(positive, w, 0.0)), 0.0)
    spare = torch.where(positive, 0.0, cap)  # weight-zero crops share the rest by capacity
    rest = (extra - alloc.sum()).clamp_min(0.0)
    alloc = alloc + spare * (rest / spare.sum().clamp_min(1e-300))
    whole = torch.minimum(cap, torch.floor(alloc + 1e-9))
    short = extra - whole.sum()
    frac = torch.where(whole < cap, torch.round((alloc - whole) * 1e6), float("-inf"))
    rank = torch.empty(count, dtype=torch.long, device=device)
    rank[torch.sort(-frac, stable=True).indices] = torch.arange(count, device=device)
    return low + whole.long() + (rank < short).long()


def global_budgets(total: int, densities: Sequence[float], sizes: Sequence[int], min_tokens: int) -> list[int]:
    """Share ``total`` tokens among crops in proportion to ``d * N`` (each gets ``min_tokens`` first)."""
    lower = [min(min_tokens, n) for n in sizes]
    return distribute(total, [d * n for d, n in zip(densities, sizes)], lower, list(sizes))
