"""``divprune``: keep the most diverse visual tokens (DivPrune, CVPR'25), a max-min diversity problem.

On the projected visual tokens (the LLM's input), with distance ``1 - cosine``: first the token whose
nearest other token is farthest, then repeatedly the token farthest from everything chosen so far, until
the budget. Kept tokens keep their order and original positions. As in the official code, which runs on
LLaVA-NeXT's whole visual sequence, the newline slot ending each anyres canvas row is a candidate like any
token and counts in ``N``; lone newline segments (OneVision's trailing video separator) stay outside the
count. So the kept count is known from the budget and the layout, with no read of the device.

``variant="reference"`` reproduces the official code (vbdi/divprune): a fraction ``keep`` keeps
``int(round(keep * N))`` tokens (Python's rounding, half to even) where the default keeps ``ceil(keep * N)``
as every method of the project does, and the reduced sequence gets consecutive positions. The default keeps
the ceiling so that one ``keep`` means the same token count for every method (docs/departures.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenreduce import kernels
from tokenreduce.core.config import MethodConfig, check_choice, check_keep, resolve_keep
from tokenreduce.core.hostsync import host_only
from tokenreduce.core.reduction import ProjectorMethod, ReduceContext, Reduction, slots_of
from tokenreduce.core.registry import register_method
from tokenreduce.ops.vision import add_newline_slots, newline_slots

VARIANTS = ("default", "reference")


@dataclass
class DivPruneConfig(MethodConfig):
    """Options of ``divprune``.

    Attributes:
        keep: visual tokens kept per item, canvas rows' newline slots included: a count (int >= 1) or a
            fraction (float in (0, 1]) of them.
        variant: ``"default"`` (the project's conventions) or ``"reference"`` (the official code's count
            ``int(round(keep * N))`` and consecutive positions; sets ``renumber_positions``).
    """

    keep: int | float = 0.25
    variant: str = "default"

    def validate(self) -> None:
        check_keep("keep", self.keep)
        check_choice("variant", self.variant, VARIANTS)
        if self.variant == "reference":
            self.renumber_positions = True


def reference_count(keep: int | float, total: int) -> int:
    """Tokens the official code keeps out of ``total``: ``round(keep * total)`` for a fraction (at least
    one, where the official would keep none), a count as given (at most ``total``)."""
    if total <= 0:
        return 0
    count = keep if isinstance(keep, int) else round(keep * total)
    return max(1, min(total, count))


def max_min_diversity(x: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min selection of ``k`` rows of ``x`` under cosine distance; indices in selection order."""
    n = x.shape[0]
    if k >= n:
        return torch.arange(n, device=x.device)
    dist = 1.0 - kernels.pairwise_similarity(x[None].float())[0]
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    nearest = dist.masked_fill(eye, float("inf")).min(dim=0).values
    # Indices stay on the device (0-dim tensors): the loop never waits for it.
    chosen = [torch.argmax(nearest).view(1)]
    closest = dist.index_select(0, chosen[0])[0]
    taken = torch.zeros(n, dtype=torch.bool, device=x.device).index_fill_(0, chosen[0], True)
    for _ in range(k - 1):
        j = torch.argmax(closest.masked_fill(taken, float("-inf"))).view(1)
        chosen.append(j)
        taken.index_fill_(0, j, True)
        closest = torch.minimum(closest, dist.index_select(0, j)[0])
    return torch.cat(chosen)


@register_method("divprune", config_cls=DivPruneConfig)
class DivPruneMethod(ProjectorMethod):
    """Max-min diverse subset of the visual tokens (DivPrune)."""

    def reduce(self, features: torch.Tensor, context: ReduceContext) -> Reduction:
        with host_only():  # layout tables, built on the host
            candidates = torch.ones(context.layout.num_tokens, dtype=torch.bool)
            candidates[newline_slots(context.layout, lone=True)] = False
            candidates = candidates.nonzero().flatten()
        candidates = candidates.to(features.device)
        count = reference_count if self.config.variant == "reference" else resolve_keep
        k = count(self.config.keep, candidates.numel())
        kept = candidates[max_min_diversity(features[candidates], k)].sort().values
        assignment = slots_of(kept, features.shape[0])
        sources, outputs, assignment = add_newline_slots(context.layout, features, kept, features[kept], assignment)
        return Reduction(sources=sources, features=outputs, assignment=assignment)
