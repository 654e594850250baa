"""EVS: vLLM's efficient video sampling as a method (pure selection in :mod:`.select`, the method in
:mod:`.method`)."""

from tokenreduce.plugins.baselines.evs.method import EVSConfig, EVSMethod

__all__ = ["EVSConfig", "EVSMethod"]
