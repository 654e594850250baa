"""Correlation-guided document compression for cropping VLMs (``doc_correlation``, after TCC)."""

from tokenreduce.plugins.doc_correlation import method  # noqa: F401
from tokenreduce.plugins.doc_correlation.method import DocCorrelationConfig, DocCorrelationMethod

__all__ = ["DocCorrelationConfig", "DocCorrelationMethod"]
