"""VisPruner's selection, pure: important tokens by [CLS] attention, then diverse ones by removing duplicates.

For one crop / frame: the ``important`` share of the budget goes to the tokens the [CLS] query attends to
most; the rest of the budget is filled from the remaining tokens by repeated bipartite matching (the
remaining tokens, in attention order, split into alternate halves; the tokens of the first half most
similar to some token of the second are removed, at most 8 at a time) until as many are left as the budget
allows. Every size follows from the group's size and the budget: no host read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Tokens removed per matching round, as the official code does.
ROUND = 8


def vispruner_select(features: torch.Tensor, attention: torch.Tensor, keep: int, important: float) -> torch.Tensor:
    """Indices (ascending) into ``features`` ``[n, D]`` / ``attention`` ``[n]`` of the ``keep`` tokens kept."""
    n_important = int(keep * important)
    diverse = keep - n_important
    order = torch.sort(attention, descending=True, stable=True).indices
    residual = order[n_important:]
    if diverse == 0:
        residual = residual[:0]
    unit = F.normalize(features.float(), dim=-1)
    while residual.numel() > diverse:
        r = min(ROUND, residual.numel() - diverse)
        first, second = residual[::2], residual[1::2]
        duplication = (unit[first] @ unit[second].T).max(dim=-1).values
        distinct = torch.sort(duplication, descending=True, stable=True).indices[r:]
        residual = torch.cat([first[distinct], second])
    kept = torch.cat([order[:n_important], residual])
    return kept.sort().values
