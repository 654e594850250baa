"""VisPruner: [CLS]-important plus diverse tokens before the LLM (pure selection in :mod:`.select`, the method in
:mod:`.method`)."""

from tokenreduce.plugins.baselines.vispruner.method import VisPrunerConfig, VisPrunerMethod

__all__ = ["VisPrunerConfig", "VisPrunerMethod"]
