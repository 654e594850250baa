"""CDPruner: conditional-DPP token selection before the LLM (pure selection in :mod:`.select`, the method in
:mod:`.method`)."""

from tokenreduce.plugins.baselines.cdpruner.method import CDPrunerConfig, CDPrunerMethod

__all__ = ["CDPrunerConfig", "CDPrunerMethod"]
