"""``random``: keep a seeded uniform sample of each item's visual tokens.

Random pruning is a strong baseline (UniPruneBench, VTC-Bench); every method should beat it. It samples
among all the item's tokens the LLM would see, newline slots included, so ``keep=1.0`` is the identity.
The same seed draws the same relative sample for items of the same size, so a row gives the same result
alone or in a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenreduce.core.config import MethodConfig, check_keep, check_range, resolve_keep
from tokenreduce.core.reduction import ProjectorMethod, ReduceContext, Reduction
from tokenreduce.core.registry import register_method


@dataclass
class RandomConfig(MethodConfig):
    """Options of ``random``.

    Attributes:
        keep: tokens kept per item: a count (int >= 1) or a fraction of its tokens (float in (0, 1]).
        seed: seed of the sampler.
    """

    keep: int | float = 0.25
    seed: int = 0

    def validate(self) -> None:
        check_keep("keep", self.keep)
        check_range("seed", self.seed, 0, integer=True)


@register_method("random", config_cls=RandomConfig)
class RandomMethod(ProjectorMethod):
    """Seeded uniform random sample of the visual tokens."""

    def reduce(self, features: torch.Tensor, context: ReduceContext) -> Reduction:
        n = features.shape[0]
        k = resolve_keep(self.config.keep, n)
        chosen = torch.randperm(n, generator=context.generator)[:k]
        return Reduction.keep(chosen.to(features.device))
