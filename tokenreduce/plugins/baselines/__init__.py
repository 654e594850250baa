"""Baseline methods the field compares against."""

from tokenreduce.plugins.baselines import divprune, fastv, pdrop, pool, prumerge, random, tome, visionzip  # noqa: F401
