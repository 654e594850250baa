"""``fastv``: after layer ``K``, keep the visual tokens the last token attends to most (FastV, ECCV'24).

Layer ``K-1``'s attention from the last prompt token to every visual token (head-mean) ranks them; layers
``>= K`` see only the top share, in prefill and decode, with their original positions. The paper's
defaults are ``K = 2`` and a 50% pruning ratio. Unlike the reference code this runs under SDPA and flash
attention (scores come from the cached keys, no eager attention), with batches and left padding, and
saves the FLOPs (tokens are removed, not masked).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokenreduce.core.config import MethodConfig, check_choice, check_keep, check_range
from tokenreduce.core.llm import LLMContext
from tokenreduce.core.reduction import LLMMethod
from tokenreduce.core.registry import register_method
from tokenreduce.ops.llm import check_layers, scores_for, top_visual


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
        check_range("budget", budget, 0.0, 1.0, low_open=True)
        if num_layers is None:
            return cls(keep=float(budget), **options)
        # The first `layer` layers see every token: move K up when the paper's K=2 leaves no room.
        layer = options.pop("layer", min(cls.layer, max(1, math.ceil(num_layers * budget) - 1)))
        keep = (num_layers * budget - layer) / (num_layers - layer)
        if keep <= 0:
            # `layer` at its minimum of 1 leaves only the budget to change.
            advice = "a smaller `layer` or a larger budget" if layer > 1 else f"a budget above {1 / num_layers:.0%}"
            raise ValueError(
                f"fastv with `layer`={layer} cannot average {budget:.0%} of the visual tokens over {num_layers} "
                f"layers (the first {layer} layers see all of them); choose {advice}"
            )
        return cls(layer=layer, keep=min(1.0, keep), **options)


@register_method("fastv", config_cls=FastVConfig)
class FastVMethod(LLMMethod):
    """Prune visual tokens after layer K by the last token's attention (FastV)."""

    def llm_layers(self, num_layers: int) -> list[int]:
        layer = self.config.layer
        if layer == FastVConfig.layer and 2 <= num_layers <= layer:
            # The paper's default K=2 on a shallower model: the deepest layer that still has one before it.
            layer = num_layers - 1
        return check_layers("layer", (layer,), num_layers)

    def select(self, ctx: LLMContext) -> list[torch.Tensor]:
        return top_visual(ctx, scores_for(ctx, self.config.query), self.config.keep)
