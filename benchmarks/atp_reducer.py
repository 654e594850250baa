"""Where ATP's reducer spends its time in a prefill of the ``tokenreduce bench`` model, part by part.

The 0.4B LM (24 layers, 576 visual + 40 text tokens, bf16 where the CPU has it), ``atp-25%`` and
``atp-heads`` as ``tokenreduce bench`` configures them. Host CPU time of the calling thread
(``time.thread_time``, torch on one thread: other jobs on the machine skew it little), medians over
rounds, of: the whole reduction stage (``LLMStage._prune``, what ``tr.stats`` and the bench's reducer
column time), layer K's projections for ``score_layer="current"`` (``at_current_layer``; layer K then takes
over the kept tokens' rows instead of projecting them), the queries' and keys' rotary embeddings, the
score kernel (``attention_importance``), the thresholds, and the scatter back of dropped states after the
LM (outside ``generate``). The full prefill is timed in the same process for the shares.

    python benchmarks/atp_reducer.py
    python benchmarks/atp_reducer.py --methods atp-heads --rounds 5
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time

import torch

import tokenreduce as tr
from tokenreduce.core import llm as core_llm
from tokenreduce.eval import bench
from tokenreduce.plugins.atp import method as atp_method

METHODS = {"atp-25%": bench._atp, "atp-heads": bench._atp_heads}
PARTS = [  # (owner, attribute, label)
    (core_llm.LLMStage, "_prune", "stage (reducer)"),
    (core_llm.LLMContext, "at_current_layer", "layer K projections"),
    (core_llm.AttentionCapture, "query_states", "query states (gather, RoPE)"),
    (core_llm.AttentionCapture, "key_states", "key states (RoPE)"),
    (core_llm.kernels, "attention_importance", "score kernel"),
    (atp_method.ATPMethod, "thresholds", "thresholds"),
    (core_llm.LLMStage, "_after_lm", "after the LM (scatter back)"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds (one warm-up round more)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dtype = torch.bfloat16 if bench._cpu_has_bf16() else torch.float32
    model = bench.build_model("0.4b", dtype, "cpu")
    batch = bench.inputs(model, "cpu", dtype)
    spent: dict[str, float] = collections.defaultdict(float)
    originals = []
    for owner, name, label in PARTS:
        original = getattr(owner, name)
        originals.append((owner, name, original))

        def timed(*a, _original=original, _label=label, **k):
            start = time.thread_time()
            try:
                return _original(*a, **k)
            finally:
                spent[_label] += time.thread_time() - start

        setattr(owner, name, timed)

    def run() -> float:
        spent.clear()
        start = time.thread_time()
        model(**bench.fresh(batch), use_cache=True, logits_to_keep=1)
        return time.thread_time() - start

    try:
        with torch.no_grad():
            full = statistics.median([run() for _ in range(args.rounds + 1)][1:])
            print(f"full prefill {full * 1e3:.0f} ms (thread CPU time, torch on 1 thread)")
            for name in args.methods:
                tr.wrap(model, METHODS[name](len(model.model.language_model.layers)))
                try:
                    totals, parts = [], collections.defaultdict(list)
                    for round_ in range(args.rounds + 1):
                        total = run()
                        if round_:
                            totals.append(total)
                            for _, _, label in PARTS:
                                parts[label].append(spent.get(label, 0.0))
                finally:
                    tr.unwrap(model)
                print(f"== {name}: prefill {statistics.median(totals) * 1e3:.0f} ms")
                for _, _, label in PARTS:
                    ms = statistics.median(parts[label]) * 1e3
                    print(f"  {label:30s} {ms:7.1f} ms  {ms / (full * 1e3):6.2%} of the full prefill")
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
    return 0


if __name__ == "__main__":
    sys.exit(main())
