"""``pdrop``: PyramidDrop (CVPR'25): drop visual tokens in stages, by the last instruction token's attention.

At each layer of ``layers`` the visual tokens are ranked by the attention the last prompt token paid them
in the layer before, and the share ``keep[i]`` (of the row's LLM-input visual tokens) survives. The paper
uses 4 stages split at layers 8/16/24 of 32 with ratio 0.5 per stage.

``variant="reference"`` reproduces the official code (Cooperx521/PyramidDrop, ``pdrop_rank_drop``): the
tokens are scored with layer ``K``'s own input norm and query / key projections applied to the hidden
states entering it (the default reuses layer ``K-1``'s attention inputs, already computed: no extra
projection of the keys), ``int(keep * N)`` tokens are kept (the default: ``ceil``, as every method of the
project), and the shortened sequence gets consecutive positions (the default keeps the original ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenreduce.core.config import MethodConfig, check_choice, check_increasing_layers, check_range
from tokenreduce.core.llm import LLMContext
from tokenreduce.core.reduction import LLMMethod
from tokenreduce.core.registry import register_method
from tokenreduce.ops.llm import average_keep, check_layers, scores_for, top_visual

VARIANTS = ("default", "reference")


@dataclass
class PDropConfig(MethodConfig):
    """Options of ``pdrop``.

    Attributes:
        layers: the layers starting each stage, increasing.
        keep: fraction of the row's visual tokens kept from each of those layers on, non-increasing.
        query: ``"last"`` instruction token (the paper) or all ``"text"`` tokens.
        variant: ``"default"`` or ``"reference"`` (the official code's scoring layer, ``int(keep * N)``
            counts and consecutive positions; sets ``renumber_positions``).
    """

    layers: tuple[int, ...] = (8, 16, 24)
    keep: tuple[float, ...] = (0.5, 0.25, 0.125)
    query: str = "last"
    variant: str = "default"

    def validate(self) -> None:
        self.layers, self.keep = tuple(self.layers), tuple(self.keep)
        if not self.layers or len(self.layers) != len(self.keep):
            raise ValueError(
                f"`layers` and `keep` must be non-empty and of equal length, got {len(self.layers)} and {len(self.keep)}"
            )
        self.layers = check_increasing_layers("layers", self.layers)
        for k in self.keep:
            check_range("keep", k, 0.0, 1.0, low_open=True)
        if list(self.keep) != sorted(self.keep, reverse=True):
            raise ValueError(f"`keep` must be non-increasing, got {self.keep}")
        check_choice("query", self.query, ("last", "text"))
        check_choice("variant", self.variant, VARIANTS)
        if self.variant == "reference":
            self.renumber_positions = True

    @classmethod
    def at_budget(cls, budget: float, num_layers: int | None = None, **options) -> PDropConfig:
        """Three stages with one ratio per stage; ``budget`` is the final share, or, given ``num_layers``,
        the share averaged over all layers (stages then start at 1/16, 1/4 and 1/2 of the depth: with the
        paper's 8/16/24 split the first quarter of the layers alone already averages 25%)."""
        check_range("budget", budget, 0.0, 1.0, low_open=True)
        if num_layers is None:
            ratio = budget ** (1 / 3)
            return cls(keep=(ratio, ratio**2, ratio**3), **options)
        layers = options.pop("layers", None) or tuple(sorted({max(1, round(num_layers * f)) for f in (1 / 16, 0.25, 0.5)}))
        low, high = 1e-6, 1.0
        if average_keep(list(layers), [low ** (i + 1) for i in range(len(layers))], num_layers) > budget:
            raise ValueError(
                f"pdrop with stages at {layers} cannot average {budget:.0%} of the visual tokens over {num_layers} layers"
            )
        for _ in range(60):
            mid = (low + high) / 2
            avg = average_keep(list(layers), [mid ** (i + 1) for i in range(len(layers))], num_layers)
            low, high = (mid, high) if avg < budget else (low, mid)
        ratio = (low + high) / 2
        return cls(layers=layers, keep=tuple(ratio ** (i + 1) for i in range(len(layers))), **options)


@register_method("pdrop", config_cls=PDropConfig)
class PDropMethod(LLMMethod):
    """Multi-stage pruning inside the LLM by the last instruction token's attention (PyramidDrop)."""

    def llm_layers(self, num_layers: int) -> list[int]:
        return check_layers("layers", self.config.layers, num_layers)

    def select(self, ctx: LLMContext) -> list[torch.Tensor]:
        stage = list(self.config.layers).index(ctx.layer)
        keep = self.config.keep[stage]
        if self.config.variant != "reference":
            return top_visual(ctx, scores_for(ctx, self.config.query), keep)
        scores = scores_for(ctx.at_current_layer(), self.config.query)
        out = []
        for r, cols in enumerate(ctx.visual):
            k = min(cols.numel(), max(1, int(ctx.original_visual[r] * keep))) if cols.numel() else 0
            out.append(torch.sort(scores[r, cols], descending=True, stable=True).indices[:k])
        return out
