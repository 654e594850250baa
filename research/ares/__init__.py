"""ARES experiments: a GRPO run on a toy task with a tiny causal LM (``python -m research.ares.grpo_tiny``)."""
