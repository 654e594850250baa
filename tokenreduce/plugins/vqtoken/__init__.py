"""VQToken: extreme video token reduction by adaptive vector quantisation (Zhang et al., NeurIPS'25).

A video's projected tokens are clustered with cosine k-means (FAISS, k-means++ seeding), with a fixed ``K``
or one chosen per video. The LLM reads one token per code instead of the ``T x H x W`` grid. The token
hash (the ``T x H x W`` map of code ids) is kept with the output in ``Reduction.info["index_map"]``. With
trained VQ-attention, each code token also attends over an embedding of that map, so where and when a
code occurs reaches the LLM. ::

    tr.wrap(model, "vqtoken")                                  # adaptive K (elbow), codebook only
    tr.wrap(model, "vqtoken", keep=32)                         # fixed K = 32
    tr.wrap(model, "vqtoken", keep=5, attention="runs/vqattn") # trained VQ-attention (dir or hub id)
    tr.stats(model).last[0].items[0].info["index_map"]         # [T, H, W] code ids

Modules: :mod:`.clustering` (codebooks, adaptive K), :mod:`.hashing` (index map, anchors, occupancy),
:mod:`.attention` (VQ-attention), :mod:`.method` (the registered methods), :mod:`.training` (training
VQ-attention on the synthetic video split); the benchmark table is research code, made in a checkout by
``python -m research.vqtoken.evaluate``. FAISS is imported only when a video is clustered
(``pip install 'tokenreduce[vq]'``).
"""

from .attention import VQAttention, VQAttentionConfig
from .method import VQTokenCodebookConfig, VQTokenCodebookMethod, VQTokenConfig, VQTokenMethod

__all__ = [
    "VQAttention",
    "VQAttentionConfig",
    "VQTokenCodebookConfig",
    "VQTokenCodebookMethod",
    "VQTokenConfig",
    "VQTokenMethod",
]
