"""tokenreduce: make existing vision-language models read fewer tokens.

    import tokenreduce as tr
    tr.wrap(model, "pool", keep=0.25)     # in place; model(**inputs) and model.generate(**inputs) unchanged
    tr.stats(model)                        # visual tokens in/out per sample, time in the reducer
    tr.unwrap(model)                       # back to the exact original model
"""

# Importing the plugins package registers every built-in method (core/registry.py imports no method).
import tokenreduce.plugins  # noqa: F401
from tokenreduce.adapters import list_adapters
from tokenreduce.core.api import disabled, from_pretrained, stats, unwrap, wrap
from tokenreduce.core.config import MethodConfig
from tokenreduce.core.registry import list_methods
from tokenreduce.core.stack import StackConfig
from tokenreduce.plugins.ares.config import AresConfig
from tokenreduce.plugins.atp import ATPConfig
from tokenreduce.plugins.baselines.cdpruner import CDPrunerConfig
from tokenreduce.plugins.baselines.dart import DARTConfig
from tokenreduce.plugins.baselines.divprune import DivPruneConfig
from tokenreduce.plugins.baselines.evs import EVSConfig
from tokenreduce.plugins.baselines.fastv import FastVConfig
from tokenreduce.plugins.baselines.pdrop import PDropConfig
from tokenreduce.plugins.baselines.pool import PoolConfig
from tokenreduce.plugins.baselines.prumerge import PruMergeConfig, PruMergePlusConfig
from tokenreduce.plugins.baselines.random import RandomConfig
from tokenreduce.plugins.baselines.tome import ToMeConfig
from tokenreduce.plugins.baselines.visionzip import VisionZipConfig
from tokenreduce.plugins.baselines.vispruner import VisPrunerConfig
from tokenreduce.plugins.doc_correlation import DocCorrelationConfig
from tokenreduce.plugins.langdc import LangDCConfig
from tokenreduce.plugins.vqtoken.method import VQTokenCodebookConfig, VQTokenConfig

__version__ = "0.1.0"

__all__ = [
    "ATPConfig",
    "AresConfig",
    "CDPrunerConfig",
    "DARTConfig",
    "DivPruneConfig",
    "DocCorrelationConfig",
    "EVSConfig",
    "FastVConfig",
    "LangDCConfig",
    "MethodConfig",
    "PDropConfig",
    "PoolConfig",
    "PruMergeConfig",
    "PruMergePlusConfig",
    "RandomConfig",
    "StackConfig",
    "ToMeConfig",
    "VQTokenCodebookConfig",
    "VQTokenConfig",
    "VisPrunerConfig",
    "VisionZipConfig",
    "__version__",
    "disabled",
    "from_pretrained",
    "list_adapters",
    "list_methods",
    "stats",
    "unwrap",
    "wrap",
]
