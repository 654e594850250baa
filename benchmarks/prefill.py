"""Prefill and decode speed of reduced vs full visual tokens at LLaVA-1.5 geometry, measured in one run.

The benchmark lives in :mod:`tokenreduce.eval.bench` (also ``tokenreduce bench``); this script keeps the
old entry point and writes to ``benchmarks/results/`` next to it.

    python benchmarks/prefill.py                 # CPU, bf16
    python benchmarks/prefill.py --device cuda   # on a GPU
    python benchmarks/prefill.py --quick         # small model, for a smoke run
"""

from __future__ import annotations

import sys
from pathlib import Path

from tokenreduce.eval.bench import main

if __name__ == "__main__":
    sys.exit(main(results_dir=Path(__file__).parent / "results"))
