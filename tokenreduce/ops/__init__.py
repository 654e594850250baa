"""Shared pure pieces methods are built from: selection, pooling, tower signals, in-LLM budgets.

Methods import these, never each other's modules (``tests/test_imports.py`` checks it). Each piece works
on tensors and layouts only (no model, no handle):

* :mod:`tokenreduce.ops.vision`: [CLS] attention and keys from captured tower queries / keys, the crop /
  frame groups of a layout, its newline slots, a per-crop reduction driver;
* :mod:`tokenreduce.ops.pooling`: spatial average pooling of a layout segment's grid;
* :mod:`tokenreduce.ops.selection`: selection rules on token scores (IQR outliers);
* :mod:`tokenreduce.ops.llm`: pruning-layer checks, budgets averaged over depth, top-k by attention score.

The heavy numerical work they call (similarities, attention scores, matching) runs through
:mod:`tokenreduce.kernels`.
"""

from tokenreduce.ops.llm import average_keep, check_layers, scores_for, top_visual
from tokenreduce.ops.pooling import pool_segment, pooled_grid
from tokenreduce.ops.selection import iqr_outliers
from tokenreduce.ops.vision import (
    add_newline_slots,
    attention_and_keys,
    content_groups,
    count,
    reduce_per_crop,
)

__all__ = [
    "add_newline_slots",
    "attention_and_keys",
    "average_keep",
    "check_layers",
    "content_groups",
    "count",
    "iqr_outliers",
    "pool_segment",
    "pooled_grid",
    "reduce_per_crop",
    "scores_for",
    "top_visual",
]
