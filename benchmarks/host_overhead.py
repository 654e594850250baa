"""Host time a wrapped forward adds, on the tiny models (where the model's own compute is negligible).

For each family x method: the median host CPU time (``time.thread_time``, torch on one thread) of one prefill ``forward`` of the wrapped model (25% of
the visual tokens, ``at_budget(0.25)``) minus the median of the unwrapped model on the same batch (one
row, one image), and the host-device sync points the wrapped forward adds
(:class:`tokenreduce.testing.syncs.SyncCounter`). On a GPU at batch 1 a forward is bound by host work, so
these milliseconds are what a reduction must win back before it saves anything; the targets are <= 0.3 ms
for fixed-budget methods and <= 1 ms for ATP. The wrapped model is a wrapped deep copy of the unwrapped one,
wrapped once and warmed up as a user's model is (what a handle caches across calls is warm); calls of the
two alternate, so load drift on a shared machine hits both alike.

    python benchmarks/host_overhead.py
    python benchmarks/host_overhead.py --families llava --methods pool fastv atp --calls 50
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

import tokenreduce as tr
from tokenreduce.core.registry import get_method
from tokenreduce.testing.syncs import SyncCounter
from tokenreduce.testing.tiny import default_rows, tiny_batch, tiny_model

FAMILIES = ("llava", "llava_onevision", "qwen2_5_vl")
METHODS = ("random", "pool", "divprune", "tome_projector", "visionzip", "fastv", "pdrop", "atp")
LAYERS = 8  # deep enough for every in-LLM method to reach 25% averaged over the layers


def _ms(fn) -> float:
    # CPU time of this thread (torch runs on it alone): what the host spends, unaffected by other
    # processes on a shared machine, which wall time is not.
    start = time.thread_time()
    fn()
    return (time.thread_time() - start) * 1e3


def measure(family: str, method: str, calls: int) -> dict | None:
    """Wrapped and unwrapped median ms of one forward, and the sync points wrapping adds."""
    spec = get_method(method)
    if spec.families is not None and family not in spec.families:
        return None
    model = tiny_model(family, num_layers=LAYERS)
    batch = tiny_batch(model, default_rows(family, n=1))
    config = spec.config_cls.at_budget(0.25, num_layers=LAYERS)

    wrapped, plain = [], []
    with torch.no_grad():
        with SyncCounter(trace=False) as base:
            model(**batch)
        reduced = tr.wrap(copy.deepcopy(model), config)
        with SyncCounter(trace=False) as syncs:
            reduced(**batch)
        for _ in range(3):
            model(**batch)
            reduced(**batch)
        for _ in range(calls):
            plain.append(_ms(lambda: model(**batch)))
            wrapped.append(_ms(lambda: reduced(**batch)))
    w, p = statistics.median(wrapped), statistics.median(plain)
    # Each wrapped call minus the unwrapped call just before it: on a loaded machine, the median of these
    # pairs is steadier than the difference of the two medians.
    paired = statistics.median(a - b for a, b in zip(wrapped, plain))
    return {"family": family, "method": method, "wrapped_ms": w, "unwrapped_ms": p, "added_ms": w - p,
            "added_paired_ms": paired, "added_syncs": syncs.count - base.count}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--calls", type=int, default=30, help="timed calls of each (medians)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = ["| family | method | unwrapped ms | wrapped ms | added ms | added ms (paired) | added syncs |",
             "|---|---|---|---|---|---|---|"]
    print(lines[0])
    print(lines[1])
    for family in args.families:
        for method in args.methods:
            row = measure(family, method, args.calls)
            if row is None:
                continue
            line = (f"| {family} | {method} | {row['unwrapped_ms']:.2f} | {row['wrapped_ms']:.2f} | "
                    f"{row['added_ms']:+.2f} | {row['added_paired_ms']:+.2f} | {row['added_syncs']:+d} |")
            lines.append(line)
            print(line, flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
