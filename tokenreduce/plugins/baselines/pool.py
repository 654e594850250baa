"""``pool``: spatial average pooling of each crop / frame grid to a target number of tokens.

Plain downsampling beats many published methods (VTC-Bench). Each segment of the layout (base image,
high-resolution canvas, video frame) is pooled on its own grid with ``adaptive_avg_pool2d``, sharing the
budget in proportion to segment size; a pooled row of a canvas that had newline slots keeps one newline.
A pooled token is placed at (and takes the position of) the original token at the centre of its cell.
The bins depend only on the item's layout and the budget: the method keeps a :class:`PoolPlan` per
(layout, count), so a call runs only the pooling on the features.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from tokenreduce.core.config import MethodConfig, check_keep, resolve_keep
from tokenreduce.core.layout import Segment, TokenLayout
from tokenreduce.core.reduction import ProjectorMethod, ReduceContext, Reduction
from tokenreduce.core.registry import register_method
from tokenreduce.ops.pooling import PoolPlan


@dataclass
class PoolConfig(MethodConfig):
    """Options of ``pool``.

    Attributes:
        keep: content tokens kept per item: a count (int >= 1) or a fraction (float in (0, 1]). The pooled
            grids are rounded, so the count reached is close to, not always exactly, the budget.
    """

    keep: int | float = 0.25

    def validate(self) -> None:
        check_keep("keep", self.keep)


@register_method("pool", config_cls=PoolConfig)
class PoolMethod(ProjectorMethod):
    """Spatial average pooling per crop and per frame, keeping newline slots."""

    #: Plans kept per method (least recently used dropped first): a model sees few distinct layouts.
    max_plans: int = 64

    def __init__(self, config: PoolConfig):
        super().__init__(config)
        self._plans: OrderedDict[tuple[tuple[Segment, ...], int], PoolPlan] = OrderedDict()

    def plan(self, layout: TokenLayout) -> PoolPlan:
        """The pooling plan of ``layout`` at this method's budget, made on first use and then reused."""
        k = resolve_keep(self.config.keep, sum(s.rows * s.cols for s in layout.segments))
        key = (layout.segments, k)  # the plan depends on nothing else of the layout
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = PoolPlan(layout, k)
            if len(self._plans) > self.max_plans:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def reduce(self, features: torch.Tensor, context: ReduceContext) -> Reduction:
        feats, sources = self.plan(context.layout).apply(features)
        return Reduction(sources=sources, features=feats)
