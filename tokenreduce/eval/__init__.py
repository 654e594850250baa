"""Evaluation: benchmark samples, the synthetic benchmark, and batched greedy prediction."""

from tokenreduce.eval.sample import Sample

__all__ = ["Sample"]
