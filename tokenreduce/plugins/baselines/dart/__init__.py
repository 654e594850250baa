"""DART: duplication-aware pruning inside the LLM (pure selection in :mod:`.select`, the method in :mod:`.method`)."""

from tokenreduce.plugins.baselines.dart.method import DARTConfig, DARTMethod

__all__ = ["DARTConfig", "DARTMethod"]
