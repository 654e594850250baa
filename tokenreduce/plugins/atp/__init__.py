"""ATP: adaptive token pruning inside the LLM, per layer and per instance (after ATP-LLaVA, CVPR'25).

At each pruning layer K, every visual token gets a redundancy score from the attention of layer K-1
(self-modality: what the visual tokens pay it; cross-modality: what the text tokens pay it), read from
the queries against the cached keys, so SDPA and flash attention keep working. A token survives if its
score passes the instance's redundancy threshold, or if it lies on the uniform spatial grid of spatial
augmented pruning (SAP) and the spatial threshold lets the grid through. Survivors keep their original
positions; each instance keeps its own count at each layer.

What is known of the paper (abstract, project page, summaries): the two score sources, learned
instance- and layer-wise thresholds from threshold heads, soft masks and a budget-constrained loss in
training, SAP, 576 -> 144 tokens on average at -1.9% on LLaVA-1.5-7B. The equations, insertion layers,
temperature, loss weights and SAP rates were not published; the values here follow a public student
reimplementation or are ours, and every one is an option of :class:`ATPConfig` / the training script.

Ours, off by default: ``cross="all_text"`` lets text before the image score it too (question-first
prompts), ``score_layer="current"`` scores with layer K's own attention (at K = 1, layer 0's queries are
bare token embeddings), and the training script's ``--stage-targets`` pull each stage's mean kept share
toward a profile, so the heads vary counts per instance around it.

Training-free mode derives thresholds from each instance's score statistics; trained mode loads
threshold heads (``tr.wrap(model, "atp", heads=path_or_repo_id)``) trained by
``python -m tokenreduce.plugins.atp.training``.
"""

from .heads import ThresholdHeads
from .method import ATPConfig, ATPMethod

__all__ = ["ATPConfig", "ATPMethod", "ThresholdHeads"]
