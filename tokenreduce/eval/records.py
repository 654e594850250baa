"""Reading a run's records: the JSON lines the runner writes, one per (model, method, budget, sample).

Apart from the runner so that the report, the CLI and the benchmarks read runs without the runner.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_records(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every record of a run (all rank files), by key; the first complete line of a key wins.

    A line cut short by an interruption is ignored, so its sample is simply run again.
    """
    out: dict[str, dict[str, Any]] = {}
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("records*.jsonl"))
    for path in files:
        with path.open() as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "key" in rec:
                    out.setdefault(rec["key"], rec)
    return out
