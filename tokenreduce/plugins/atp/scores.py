"""ATP's signals at one pruning layer: redundancy scores, spatial sampling, thresholds.

Pure functions of an :class:`~tokenreduce.core.llm.LLMContext`, shared by inference (hard masks, physical
dropping) and training (soft masks through attention). What is known of ATP-LLaVA (CVPR'25) and what is
reconstructed is in the package docstring; every reconstructed constant is a config option.
"""

from __future__ import annotations

import math

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
    visual_cols = column_index(ctx.visual, device=device)
    self_attn = ctx.attention(visual_cols.clamp_min(0), visual_cols >= 0)
    cross_attn = ctx.text_attention(causal=cross == "text")
    rows, features = [], []
    for r, cols in enumerate(ctx.visual):
        n = max(1, cols.numel())
        seen_by = torch.arange(n, 0, -1, device=device, dtype=self_attn.dtype)  # visual queries at or after each key
        s_self = self_attn[r, cols] * n / seen_by
        s_self = s_self / s_self.sum().clamp_min(EPS) * n
        s_cross = cross_attn[r, cols] / cross_attn[r, cols].sum().clamp_min(EPS) * n
        combined = self_weight * s_self + (1.0 - self_weight) * s_cross
        rows.append(torch.log(combined.clamp_min(EPS)))
        features.append(torch.stack([torch.log(s_self.clamp_min(EPS)).mean(), torch.log(s_cross.clamp_min(EPS)).mean()])
                        if cols.numel() else torch.zeros(2, device=device))
    return rows, torch.stack(features) if features else torch.zeros(0, 2, device=device)


def spatial_sample(ctx: LLMContext, row: int, rate: float) -> torch.Tensor:
    """Spatial augmented pruning: the row's visual tokens on a uniform grid of stride ``round(1/sqrt(rate))``.

    The grid is laid per crop / per frame (each segment of each item's layout); newline slots are never
    sampled. Returns a bool mask over ``ctx.visual[row]``.
    """
    tokens = ctx.visual_tokens[row]
    out = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    if rate <= 0 or tokens.numel() == 0:
        return out
    stride = max(1, round(1.0 / math.sqrt(rate)))
    for i in torch.unique(tokens[:, 0]).tolist():
        layout = ctx.items[i].layout
        here = tokens[:, 0] == i
        idx = tokens[here, 1].cpu()
        rows, cols = layout.rows[idx], layout.cols[idx]
        content = layout.content_mask[idx]
        out[here] = ((rows % stride == stride // 2) & (cols % stride == stride // 2) & content).to(out.device)
    return out


def normal_quantile(p: float) -> float:
    """Inverse standard normal CDF (for mean + k·std thresholds that keep about ``1 - p``)."""
    return math.sqrt(2.0) * torch.erfinv(torch.tensor(2.0 * p - 1.0)).item()
