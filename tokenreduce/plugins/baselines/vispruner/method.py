"""``vispruner``: important tokens by [CLS] attention plus diverse ones (VisPruner, ICCV'25).

"Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs" (Zhang et al.):
the vision tower's own cues choose the tokens, before the LLM. Of each crop's budget, the share
``important`` goes to the patches the [CLS] token attends to most in the tower's layer ``layer`` (head mean);
the rest to the remaining patches left after repeatedly removing the most duplicated ones (bipartite
matching of alternate halves by cosine similarity, 8 per round). Towers without [CLS] (SigLIP) rank by the
attention each patch receives. Kept tokens keep their order and positions; every newline slot stays, as the
official LLaVA-NeXT code keeps them.

Departure: the official LLaVA code measures duplication on the tower's features before the projector; here
on the projected tokens the LLM receives (the projector is a per-token MLP), so anyres packing stays intact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenreduce.core.config import MethodConfig, check_keep, check_range, resolve_keep
from tokenreduce.core.reduction import ReduceContext, Reduction, VisionMethod
from tokenreduce.core.registry import register_method
from tokenreduce.ops.vision import attention_and_keys, reduce_per_crop

from .select import vispruner_select

FAMILIES = ("llava", "llava_next", "llava_next_video", "llava_onevision")


@dataclass
class VisPrunerConfig(MethodConfig):
    """Options of ``vispruner``.

    Attributes:
        keep: tokens kept per crop / frame: a count (int >= 1) or a fraction of its tokens (float in (0, 1]).
        important: share of that budget taken by [CLS] attention (the official default 0.5); the rest are
            the diverse tokens.
        layer: tower layer whose attention is read (the projected one: ``-2`` for LLaVA).
    """

    keep: int | float = 0.25
    important: float = 0.5
    layer: int = -2

    def validate(self) -> None:
        check_keep("keep", self.keep)
        check_range("important", self.important, 0.0, 1.0)
        check_range("layer", self.layer, integer=True)


@register_method("vispruner", config_cls=VisPrunerConfig, families=FAMILIES)
class VisPrunerMethod(VisionMethod):
    """[CLS]-important plus duplicate-free diverse tokens (VisPruner)."""

    @property
    def vision_layer(self) -> int:
        return self.config.layer

    def tower_signals(self, q, k, scale, num_prefix):
        return {"attention": attention_and_keys(q, k, scale, num_prefix)["attention"]}

    def reduce(self, features: torch.Tensor, context: ReduceContext) -> Reduction:
        attention = context.signals["attention"].to(features.device)

        def select(group: torch.Tensor):
            kept = group[vispruner_select(features[group], attention[group],
                                          resolve_keep(self.config.keep, group.numel()), self.config.important)]
            slot = torch.full((group.numel(),), -1, dtype=torch.long, device=group.device)
            slot[torch.searchsorted(group, kept)] = torch.arange(kept.numel(), device=group.device)
            return kept, features[kept], slot

        return reduce_per_crop(features, context, select, row_newlines=True)
