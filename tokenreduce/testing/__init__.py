"""Tiny models and batches for tests, benchmarks and the demo."""
