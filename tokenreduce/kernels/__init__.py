"""Fused kernels behind tokenreduce's scoring, selection, merging, quantisation and decoding steps.

Every op has a Triton kernel (``<op>/triton.py``) and a pure-torch twin (``<op>/naive.py``) that is both
the CPU fallback and the test oracle; the functions here validate inputs and dispatch (see
:mod:`tokenreduce.kernels._backend`): Triton for CUDA tensors when it is installed, torch otherwise,
``TOKENREDUCE_KERNELS=torch|triton`` or :func:`use_backend` to force one. Triton is imported only when its
path is taken, so ``import tokenreduce`` works without it. The rest of tokenreduce calls these ops only
through this module.

Ops:
    pairwise_similarity, neighbor_count      cosine / Pearson similarity of token sets
    attention_importance, cls_attention      softmax attention of selected queries, reduced per key
    topk_select, threshold_select            per-row selection in original order (``Selection``)
    codebook_assign                          nearest codeword, fused distance + arg-min
    bipartite_matching                       ToMe A/B best matches
    token_entropy, window_entropy            streaming softmax entropy (differentiable), window mean
"""

from tokenreduce.kernels._backend import (
    ENV_VAR,
    interpreter_enabled,
    requested_backend,
    select_backend,
    triton_available,
    use_backend,
)
from tokenreduce.kernels.attention import attention_importance, cls_attention
from tokenreduce.kernels.codebook import codebook_assign
from tokenreduce.kernels.entropy import token_entropy, window_entropy
from tokenreduce.kernels.matching import bipartite_matching
from tokenreduce.kernels.select import Selection, threshold_select, topk_select
from tokenreduce.kernels.similarity import neighbor_count, pairwise_similarity

__all__ = [
    "ENV_VAR",
    "Selection",
    "attention_importance",
    "bipartite_matching",
    "cls_attention",
    "codebook_assign",
    "interpreter_enabled",
    "neighbor_count",
    "pairwise_similarity",
    "requested_backend",
    "select_backend",
    "threshold_select",
    "token_entropy",
    "topk_select",
    "triton_available",
    "use_backend",
    "window_entropy",
]
