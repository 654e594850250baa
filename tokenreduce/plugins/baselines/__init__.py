"""Baseline methods the field compares against."""

from tokenreduce.plugins.baselines import fastv, pdrop, pool, random  # noqa: F401
