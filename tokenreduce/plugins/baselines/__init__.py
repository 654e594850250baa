"""Baseline methods the field compares against."""

from tokenreduce.plugins.baselines import (  # noqa: F401
    cdpruner,
    dart,
    divprune,
    evs,
    fastv,
    pdrop,
    pool,
    prumerge,
    random,
    tome,
    visionzip,
    vispruner,
)
