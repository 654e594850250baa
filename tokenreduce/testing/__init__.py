"""Tiny models and batches for tests and benchmarks."""
