"""LangDC: language-aware dynamic token compression for video (after arXiv 2509.00969, EMNLP 2025).

A small causal LM (the "CapPruner", :class:`Captioner`) turns each segment of frames into a caption; the
hidden states of the caption positions at a middle layer, projected into the VLM's embedding space,
replace the segment's visual tokens as "soft caption tokens". Richer segments get longer captions and so
more tokens: the compression ratio is decided by when the captioner emits end-of-sequence. A pooled
base branch (the paper's BasePruner) can be added. See :mod:`.method` for positions and statistics,
:mod:`.captioner` for the captioner, :mod:`.training` for semantic-density supervision (captions of the
synthetic benchmark, whose length follows content) and the alignment (post-projector, optional low-rank
adapters hooked into the VLM's LLM while wrapped). The synthetic video table is research code, made in a
checkout by ``python -m research.langdc.evaluate``.

    tr.wrap(model, "langdc", captioner="assets/langdc/synthetic-onevision-video")
    tr.wrap(model, tr.LangDCConfig(captioner="user/repo", base=False))      # caption tokens only

Where this differs from the paper and its code (NIneeeeeem/LangDC):

* the captioner reads the VLM's projected visual tokens (the projector stage's view), pooled per frame,
  not a separate video encoder's features; no context-image tokens;
* the VLM's weights stay as they are: the post-projector, and optionally low-rank adapters that are hooked
  into the LLM only while the model is wrapped, are trained so that the VLM answers with the soft tokens
  (the paper fine-tunes the LLM with LoRA r=128 in SFT);
* optionally the captioner also reads each token's difference from the frame before (and its
  neighbours'): a segment's events are what changed, which a small LM otherwise fails to find;
* the post-projector is a 2-layer MLP by default (the paper's is linear; ``post_projector="linear"`` in
  training gives it);
* soft caption tokens keep the original positions of the segment's last tokens (see :mod:`.method`).
"""

from .captioner import Captioner, CaptionerConfig, Captions
from .method import LangDCConfig, LangDCMethod

__all__ = ["Captioner", "CaptionerConfig", "Captions", "LangDCConfig", "LangDCMethod"]
