"""ATP's signals at one pruning layer: redundancy scores, spatial sampling, thresholds.

Pure functions of an :class:`~tokenreduce.core.llm.LLMContext`, shared by inference (hard masks, physical
dropping) and training (soft masks through attention). What is known of ATP-LLaVA (CVPR'25) and what is
reconstructed is in the package docstring; every reconstructed constant is a config option.
"""

from __future__ import annotations

import math
import statistics

import torch

from tokenreduce.core.llm import LLMContext
from tokenreduce.core.sequence import column_index

EPS = 1e-6


CROSS = ("text", "all_text")
SCORE_LAYERS = ("previous", "current")


def redundancy_scores(
    ctx: LLMContext, self_weight: float, cross: str = "text"
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per row, ``log`` of the combined importance of its visual tokens relative to uniform attention.

    Self-modality importance is the attention the row's visual tokens pay each visual token, averaged over
    the visual queries that can see it (causal attention would otherwise favour early tokens, which more
    queries see); cross-modality importance the attention its text tokens pay it. With ``cross="text"``
    (the paper's) that attention is causal, so text before the image sees none of it; ``"all_text"`` scores
    every text token's query against the visual keys, so a question placed before the image counts too.
    Both come from the context's captured layer (K-1's queries against its cached keys, or layer K's own
    after :meth:`~tokenreduce.core.llm.LLMContext.at_current_layer`; no eager attention) and are scaled by
    the number of visual tokens so uniform attention scores 1. Returns the per-row scores and ``[B, 2]``
    features (mean log self / cross importance) for threshold heads.
    """
    device = ctx.hidden.device
    visual_cols = column_index([c.to(device) for c in ctx.visual], device=device)
    valid = visual_cols >= 0
    self_attn = ctx.attention(visual_cols.clamp_min(0), valid)
    cross_attn = ctx.text_attention(causal=cross == "text")
    # All rows at once on the left-padded [B, Nmax] visual columns: no per-row host work.
    counts = [int(c.numel()) for c in ctx.visual]  # shapes, known on the host
    width = visual_cols.shape[1]
    n = torch.tensor([max(1, c) for c in counts], device=device, dtype=self_attn.dtype)[:, None]
    pad = torch.tensor([width - c for c in counts], device=device)[:, None]
    rank = torch.arange(width, device=device)[None] - pad  # position among the row's visual tokens
    seen_by = (n - rank).clamp_min(1)  # visual queries at or after each key
    safe = visual_cols.clamp_min(0)
    s_self = torch.gather(self_attn, 1, safe).masked_fill(~valid, 0.0) * n / seen_by
    s_self = s_self / s_self.sum(1, keepdim=True).clamp_min(EPS) * n
    s_cross = torch.gather(cross_attn, 1, safe).masked_fill(~valid, 0.0)
    s_cross = s_cross / s_cross.sum(1, keepdim=True).clamp_min(EPS) * n
    combined = torch.log((self_weight * s_self + (1.0 - self_weight) * s_cross).clamp_min(EPS))
    vf = valid.to(combined.dtype)
    mean_log = lambda x: (torch.log(x.clamp_min(EPS)) * vf).sum(1) / vf.sum(1).clamp_min(1.0)  # noqa: E731
    features = torch.stack([mean_log(s_self), mean_log(s_cross)], dim=1)
    rows = [combined[r, width - c :] for r, c in enumerate(counts)]
    return rows, features


def spatial_sample(ctx: LLMContext, row: int, rate: float) -> torch.Tensor:
    """Spatial augmented pruning: the row's visual tokens on a uniform grid of stride ``round(1/sqrt(rate))``.

    The grid is laid per crop / per frame (each segment of each item's layout); newline slots are never
    sampled. Returns a bool mask over ``ctx.visual[row]``.
    """
    tokens = ctx.visual_tokens[row]
    if rate <= 0 or tokens.numel() == 0:
        return torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    stride = max(1, round(1.0 / math.sqrt(rate)))
    table, start = _grid_table(ctx.items, stride, tokens.device)
    return table[start[tokens[:, 0]] + tokens[:, 1]]


# Grid tables by (stride, device, the items' layout objects): layouts are built once per image geometry and
# reused across calls, so a call's table is usually built already. Entries hold their layouts (an id is
# only trusted while its object is alive and the same).
_GRIDS: dict[tuple, tuple[list, torch.Tensor, torch.Tensor]] = {}
_GRIDS_MAX = 32


def _grid_table(items, stride: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One host-built table of every item's grid (layouts are host tensors) and each item's offset in it,
    on ``device``: read there by (item, token), no unique / boolean indexing on device tensors."""
    layouts = [item.layout for item in items]
    key = (stride, device, tuple(id(layout) for layout in layouts))
    hit = _GRIDS.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], layouts)):
        return hit[1], hit[2]
    tables, offsets, total = [], [], 0
    for layout in layouts:
        tables.append((layout.rows % stride == stride // 2) & (layout.cols % stride == stride // 2) & layout.content_mask)
        offsets.append(total)
        total += layout.num_tokens
    table = torch.cat(tables).to(device, non_blocking=True)
    start = torch.tensor(offsets, device=device)
    if len(_GRIDS) >= _GRIDS_MAX:
        _GRIDS.pop(next(iter(_GRIDS)))
    _GRIDS[key] = (layouts, table, start)
    return table, start


def normal_quantile(p: float) -> float:
    """Inverse standard normal CDF (for mean + k·std thresholds that keep about ``1 - p``)."""
    return statistics.NormalDist().inv_cdf(p)
