"""LangDC experiments: the synthetic video table (``python -m research.langdc.evaluate``)."""
