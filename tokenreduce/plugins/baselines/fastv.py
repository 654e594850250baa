"""``fastv``: after layer ``K``, keep the visual tokens the last token attends to most (FastV, ECCV'24).

Layer ``K-1``'s attention from the last prompt token to every visual token (head-mean) ranks them; layers
``>= K`` see only the top share, in prefill and decode, with their original positions. The paper's
defaults are ``K = 2`` and a 50% pruning ratio. Unlike the reference code this runs under SDPA and flash
attention (scores come from the cached keys, no eager attention), with batches and left padding, and
saves the FLOPs (tokens are removed, not masked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenreduce.core.config import MethodConfig, check_choice, check_keep, check_range
from tokenreduce.core.llm import LLMContext
from tokenreduce.core.reduction import LLMMethod
from tokenreduce.core.registry import register_method
from tokenreduce.ops.llm import one_layer, one_layer_at_budget, scores_for, top_visual


@dataclass
class FastVConfig(MethodConfig):
    """Options of ``fastv``.

    Attributes:
        layer: ``K``, the first decoder layer that sees the pruned sequence (scores come from layer K-1).
            The default (2) becomes the last layer on a model of 2 decoder layers; a value given is kept.
        keep: visual tokens kept after layer K: a count or a fraction of the row's visual tokens.
        query: which tokens score the visual tokens: ``"last"`` (the paper's code) or ``"text"`` (all text
            tokens, the paper's description).
    """

    layer: int = 2
    keep: int | float = 0.5
    query: str = "last"

    def validate(self) -> None:
        check_range("layer", self.layer, 1, integer=True)
        check_keep("keep", self.keep)
        check_choice("query", self.query, ("last", "text"))

    @classmethod
    def at_budget(cls, budget: float, num_layers: int | None = None, **options) -> FastVConfig:
        """Keep ``budget`` after layer K, or, given ``num_layers``, ``budget`` averaged over all layers."""
        return one_layer_at_budget(cls, "fastv", budget, num_layers, options)


@register_method("fastv", config_cls=FastVConfig)
class FastVMethod(LLMMethod):
    """Prune visual tokens after layer K by the last token's attention (FastV)."""

    def llm_layers(self, num_layers: int) -> list[int]:
        return one_layer(self.config, num_layers)

    def select(self, ctx: LLMContext) -> list[torch.Tensor]:
        return top_visual(ctx, scores_for(ctx, self.config.query), self.config.keep)
