"""``iqr_outliers`` (PruMerge's outlier rule) against quartiles worked out by hand.

With five scores the quartiles fall on data points (linear interpolation at positions 1 and 3 of the
sorted scores), so the bound ``Q3 + factor * IQR`` is known exactly and a score equal to it is tested.
"""

from __future__ import annotations

import torch

from tokenreduce.ops.selection import iqr_outliers


def test_iqr_outliers_are_strictly_above_q3_plus_factor_iqr():
    scores = torch.tensor([4.0, 1.0, 10.0, 3.0, 2.0])  # sorted 1 2 3 4 10: Q1 = 2, Q3 = 4, IQR = 2
    # factor 0: the bound is Q3 = 4 itself, which is not above it
    assert iqr_outliers(scores, 0.0).tolist() == [False, False, True, False, False]
    # factor 1: bound 6; factor 3: bound 10, equal to the largest score, so nothing
    assert iqr_outliers(scores, 1.0).tolist() == [False, False, True, False, False]
    assert not iqr_outliers(scores, 3.0).any()
    # half-precision scores are compared on their float32 quartiles
    assert iqr_outliers(scores.half(), 2.5).tolist() == [False, False, True, False, False]
