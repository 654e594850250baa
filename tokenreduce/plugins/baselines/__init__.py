"""Baseline methods the field compares against."""

from tokenreduce.plugins.baselines import pool, random  # noqa: F401
