"""``evs`` against vLLM's own Efficient Video Sampling (``compute_retention_mask``) on identical embeddings."""

from __future__ import annotations

import pytest
import torch
from vllm.multimodal.video_prune.evs import compute_retention_mask

from tokenreduce.plugins.baselines.evs.method import evs_count
from tokenreduce.plugins.baselines.evs.select import evs_select


@pytest.mark.parametrize("t, h, w, q", [(4, 8, 8, 0.75), (6, 4, 6, 0.5), (3, 6, 4, 0.9), (8, 4, 4, 0.3)])
def test_evs_keeps_what_vllm_keeps(t, h, w, q):
    per_frame = (h // 2) * (w // 2)
    gen = torch.Generator().manual_seed(t * 100 + h)
    embeds = torch.randn(t * per_frame, 16, generator=gen)
    embeds[per_frame + 1] = embeds[1] * 2  # a place that did not change: lowest score, dropped first
    keep = 1 - q
    expected = compute_retention_mask(embeds, (t, h, w), spatial_merge_size=2, q=q).nonzero().flatten()
    frames = torch.arange(t * per_frame).view(t, per_frame)
    got = evs_select(embeds, frames, evs_count(keep, t * per_frame, per_frame, reference=True))
    assert got.tolist() == expected.tolist()
