"""``evs``: Efficient Video Sampling, vLLM's video pruning (Bagrov et al., 2025), on every family.

Each video token scores how much it changed since the previous frame (``1 - cos`` with the token at the
same place); the first frame is kept whole, then the most changed tokens fill the budget. Static regions of
a video cost tokens once. The reference implementation is vLLM's (``vllm/multimodal/video_prune/evs.py``:
``compute_retention_mask``); ``tests/vllm`` checks this one against it on identical embeddings.

vLLM's count is ``max(frame tokens, int(N * (1 - q)))`` for a pruning rate ``q``; here ``keep = 1 - q`` and
the count rounds up (``ceil``, as every method here) unless ``variant="reference"``. Videos only; a lone
trailing newline slot (LLaVA-OneVision) stays.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenreduce.core.config import MethodConfig, check_choice, check_keep, resolve_keep
from tokenreduce.core.reduction import ProjectorMethod, ReduceContext, Reduction, slots_of
from tokenreduce.core.registry import register_method
from tokenreduce.ops.vision import add_newline_slots, content_groups

from .select import evs_select

VARIANTS = ("default", "reference")


@dataclass
class EVSConfig(MethodConfig):
    """Options of ``evs``.

    Attributes:
        keep: video tokens kept: a count or a fraction (vLLM's ``1 - video_pruning_rate``); never fewer
            than one frame's tokens.
        variant: ``"default"`` (``ceil(keep * N)``) or ``"reference"`` (vLLM's ``int(N * keep)``).
    """

    keep: int | float = 0.25
    variant: str = "default"

    def validate(self) -> None:
        check_keep("keep", self.keep)
        check_choice("variant", self.variant, VARIANTS)


def evs_count(keep: int | float, total: int, frame: int, reference: bool = False) -> int:
    """Tokens EVS keeps of ``total``: the budget, at least one frame (``frame`` tokens)."""
    if reference and isinstance(keep, float):
        return max(frame, int(total * keep))
    return max(frame, resolve_keep(keep, total))


@register_method("evs", config_cls=EVSConfig, modalities=("video",))
class EVSMethod(ProjectorMethod):
    """Keep the video tokens that changed most since the previous frame (EVS)."""

    def reduce(self, features: torch.Tensor, context: ReduceContext) -> Reduction:
        groups = content_groups(context.layout, per_crop=True)
        sizes = {g.numel() for g in groups}
        if len(sizes) != 1:
            raise ValueError(f"evs needs frames of one size, got frames of {sorted(sizes)} tokens")
        frames = torch.stack(groups).to(features.device)
        k = evs_count(self.config.keep, frames.numel(), frames.shape[1], self.config.variant == "reference")
        kept = evs_select(features, frames, k)
        assignment = slots_of(kept, features.shape[0])
        sources, outputs, assignment = add_newline_slots(context.layout, features, kept, features[kept], assignment)
        return Reduction(sources=sources, features=outputs, assignment=assignment)
