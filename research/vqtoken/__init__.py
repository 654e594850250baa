"""VQToken experiments: the synthetic video table (``python -m research.vqtoken.evaluate``)."""
