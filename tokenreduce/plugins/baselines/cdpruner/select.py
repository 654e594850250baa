"""CDPruner's selection, pure: the greedy MAP of a determinantal point process conditioned on the text.

The kernel ``L[i, j] = r_i * cos(x_i, x_j) * r_j`` weighs the visual tokens' pairwise similarity by each
token's relevance ``r`` to the instruction; the greedy MAP (Chen et al., 2018, as the official code runs it)
picks, one at a time, the token that most increases the determinant of the chosen set's kernel: relevant and
unlike what is already chosen. The kernel's rows are built as they are read (one matrix-vector product per
pick), so no ``N x N`` matrix exists, and every index stays on the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def relevance(image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor, theta: float = 1.0) -> torch.Tensor:
    """``[N]`` relevance of each of the ``image`` tokens ``[N, C]`` to the ``text`` tokens ``[M, C]`` that
    ``mask`` ``[M]`` marks (the others, padding and placeholders, do not count).

    As the official code: the negated cosine similarity averaged over the text tokens, min-max normalised
    over the item; for ``theta < 1``, ``exp(theta / (2 (1 - theta)) * r)`` (the paper's trade-off between
    relevance and diversity; the official LLaVA code runs ``theta = 1``, the plain normalised score).
    """
    weight = mask.float()
    cosine = F.normalize(image.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
    score = -(cosine * weight).sum(dim=-1) / weight.sum()
    score = (score - score.min() + 1e-6) / (score.max() - score.min()).clamp_min(1e-12)
    if theta < 1:
        score = torch.exp(theta / (2 * (1 - theta)) * score)
    return score


# A gain below this share of the largest diagonal entry is rounding: the chosen tokens already span that one.
SPANNED = 1e-5


def conditional_dpp(x: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (in selection order) of ``k`` rows of ``x`` ``[N, D]`` by the greedy MAP of the DPP kernel
    ``weight_i * cos(x_i, x_j) * weight_j``.

    Once the chosen tokens span every other (``k`` beyond the kernel's rank, as when the tokens outnumber
    their dimensions), the gains left are rounding noise: they count as zero, and the rest are taken in
    token order (where the official loop takes square roots of negative noise)."""
    n = x.shape[0]
    unit = F.normalize(x.float(), dim=-1)
    weight = weight.float()
    gains = weight * weight  # the kernel's diagonal: cos(x, x) = 1
    floor = gains.max() * SPANNED
    factors = torch.zeros(k, n, device=x.device)
    chosen = torch.empty(k, dtype=torch.long, device=x.device)
    for i in range(k):
        j = torch.argmax(torch.where(gains > floor, gains, 0.0).masked_fill(gains == float("-inf"), -1.0)).view(1)
        chosen[i : i + 1] = j
        row = weight.index_select(0, j) * (unit @ unit.index_select(0, j)[0]) * weight  # the kernel's row j
        e = (row - factors[:i].index_select(1, j)[:, 0] @ factors[:i]) / torch.sqrt(
            torch.maximum(gains.index_select(0, j), floor))
        factors[i] = e
        gains = (gains - e * e).index_fill(0, j, float("-inf"))
    return chosen
