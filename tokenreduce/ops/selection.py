"""Selection rules on token scores shared by methods."""

from __future__ import annotations

import torch


def iqr_outliers(scores: torch.Tensor, factor: float) -> torch.Tensor:
    """Boolean mask of scores above ``Q3 + factor * IQR``."""
    q1, q3 = torch.quantile(scores.float(), torch.tensor([0.25, 0.75], device=scores.device))
    return scores > q3 + factor * (q3 - q1)
