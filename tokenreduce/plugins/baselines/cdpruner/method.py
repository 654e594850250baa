"""``cdpruner``: keep the visual tokens of maximal conditional diversity (CDPruner, NeurIPS'25).

"Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs" (Zhang et
al.): before the LLM, the visual tokens' cosine similarity, weighted by each token's relevance to the
instruction, is the kernel of a determinantal point process, and its greedy MAP picks the budget: tokens
relevant to the question and unlike each other. The selection costs ``keep`` matrix-vector products of the
projected tokens (no attention, no ``N x N`` matrix); kept tokens keep their order and positions.

The official LLaVA code scores relevance with CLIP's text tower on the question against CLIP's image
embeddings; LLaVA checkpoints in transformers ship no text tower, so relevance here reads the projected
tokens against the LLM's input embeddings of the row's text (as the ports to Qwen2-VL do). Similarity and
the DPP are the official ones on the projected tokens. Newline slots are not candidates and all stay, as in
the official LLaVA-NeXT code (the count is known from the budget).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenreduce.core.config import MethodConfig, check_keep, check_range, resolve_keep
from tokenreduce.core.hostsync import host_only
from tokenreduce.core.reduction import ProjectorMethod, ReduceContext, Reduction, slots_of
from tokenreduce.core.registry import register_method
from tokenreduce.ops.vision import add_newline_slots

from .select import conditional_dpp, relevance


@dataclass
class CDPrunerConfig(MethodConfig):
    """Options of ``cdpruner``.

    Attributes:
        keep: content tokens kept per item: a count (int >= 1) or a fraction (float in (0, 1]).
        theta: relevance against diversity, in (0, 1]: 1 (the official LLaVA code) weighs the kernel by
            the normalised relevance itself, smaller values by ``exp(theta / (2 (1 - theta)) * r)``.
    """

    keep: int | float = 0.25
    theta: float = 1.0

    def validate(self) -> None:
        check_keep("keep", self.keep)
        check_range("theta", self.theta, 0.0, 1.0, low_open=True)


@register_method("cdpruner", config_cls=CDPrunerConfig)
class CDPrunerMethod(ProjectorMethod):
    """Conditional-DPP subset of the visual tokens (CDPruner)."""

    uses_text = True

    def reduce(self, features: torch.Tensor, context: ReduceContext) -> Reduction:
        with host_only():  # a layout table, built on the host
            content = (~context.layout.is_newline).nonzero().flatten()
        content = content.to(features.device)
        k = resolve_keep(self.config.keep, content.numel())
        x = features[content]
        if context.text_embeds is None:  # nothing to condition on: every token equally relevant
            weight = torch.ones(x.shape[0], device=x.device)
        else:
            text, mask = context.text_embeds.to(x.device), context.text_mask.to(x.device)
            # a row without text: every token equally relevant (no host read decides it)
            weight = torch.where(mask.any(), relevance(x, text, mask, self.config.theta), 1.0)
        kept = content[conditional_dpp(x, weight, k)].sort().values
        assignment = slots_of(kept, features.shape[0])
        sources, outputs, assignment = add_newline_slots(context.layout, features, kept, features[kept], assignment,
                                                         rows=True)
        return Reduction(sources=sources, features=outputs, assignment=assignment)
