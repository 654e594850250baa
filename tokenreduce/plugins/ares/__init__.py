"""ARES entropy-shaped reasoning (arXiv 2510.08457, ICLR 2026; shawn0728/ARES): output-side reduction.

Fewer reasoning tokens on easy problems, exploration where it matters.

* Generation time, method ``ares`` (``decode`` stage): token and window entropy tracked during ``generate``,
  high-window-entropy (HWE) positions per sample in ``tr.stats(model)``, and an optional difficulty-aware
  reasoning-budget controller (tokenreduce's extension; ARES itself decodes plainly)::

      tr.wrap(model, "ares", budgets={"easy": 256, "hard": 2048}, end_ids=end_sequence_ids(tok, "</think>"))
      model.generate(**inputs)
      ares_records(model)            # per-sample entropy, window entropy, HWE positions, budget outcome

* Training pieces (:mod:`tokenreduce.plugins.ares.training`): HWE counting (paper and released-code
  variants), difficulty buckets from pass@k, the hierarchical entropy reward (both versions), the dynamic
  KL controllers and the adaptive cold-start length filter; :mod:`tokenreduce.plugins.ares.grpo` wires them
  into TRL's ``GRPOTrainer`` (imported lazily: TRL is an optional extra).
"""

from tokenreduce.plugins.ares.config import BUCKETS, AresConfig
from tokenreduce.plugins.ares.generation import (
    AresMethod,
    BudgetStop,
    EntropyController,
    ares_records,
    difficulty_labels,
    end_sequence_ids,
)
from tokenreduce.plugins.ares.plot import plot_entropy, save_entropy_plots
from tokenreduce.plugins.ares.signals import (
    calibrate_threshold,
    hwe_mask,
    row_quantile,
    trajectory_thresholds,
)

__all__ = [
    "BUCKETS",
    "AresConfig",
    "AresMethod",
    "BudgetStop",
    "EntropyController",
    "ares_records",
    "calibrate_threshold",
    "difficulty_labels",
    "end_sequence_ids",
    "hwe_mask",
    "plot_entropy",
    "row_quantile",
    "save_entropy_plots",
    "trajectory_thresholds",
]
