"""Built-in methods. Importing this package registers them; none imports an optional extra at import time."""

from tokenreduce.plugins import ares, atp, baselines, doc_correlation, langdc, vqtoken  # noqa: F401
