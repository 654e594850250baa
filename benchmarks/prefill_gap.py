"""Where a pruned prefill's time goes against the unwrapped model, decoder layer by decoder layer.

The ``tokenreduce bench`` model (0.4B LM, 576 visual + 40 text tokens, bf16 where the CPU has it). For each
method: the wrapped prefill's host CPU time per decoder layer (pre/post hooks, ``time.thread_time``, torch
on one thread, so other jobs on the machine skew it little), against the unwrapped model fed a prompt of
each length the method's layers see, timed in the same rounds (medians). A layer after a pruning layer
should cost what the unwrapped layer costs at that length; what a pruning layer costs more is the reducer
(it runs in that layer's pre-hook); what lies outside the layers is the embedding, the scatter back and
the head. Prints, per method, the wrapped time against the direct row at the layer mean (one prompt of
the mean length) and the per-layer direct row ``tokenreduce bench`` uses, and the excess per layer.

    python benchmarks/prefill_gap.py
    python benchmarks/prefill_gap.py --methods atp-25% atp-heads --rounds 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import tokenreduce as tr
from tokenreduce.core.config import build_config
from tokenreduce.eval import bench

METHODS = {
    "pool-64": lambda layers: build_config("pool", keep=64),
    "fastv-K2-64": lambda layers: build_config("fastv", layer=2, keep=64),
    "fastv-K2-50%": lambda layers: build_config("fastv", layer=2, keep=0.5),
    "pdrop-25%": lambda layers: build_config("pdrop", **bench._pdrop(layers)),
    "atp-25%": lambda layers: bench._atp(layers),
    "atp-heads": lambda layers: bench._atp_heads(layers),
}


class LayerClock:
    """Host CPU time of each decoder layer's forward in the last call (hooks; pruning runs in a pre-hook
    registered later, so it falls inside its layer's time)."""

    def __init__(self, layers):
        self.times: dict[int, float] = {}
        self.handles = []
        for i, layer in enumerate(layers):
            self.handles.append(layer.register_forward_pre_hook(self._start(i), prepend=True))
            self.handles.append(layer.register_forward_hook(self._stop(i)))

    def _start(self, i):
        def hook(module, args):
            self.times[i] = -time.thread_time()
        return hook

    def _stop(self, i):
        def hook(module, args, output):
            self.times[i] += time.thread_time()
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=["fastv-K2-64", "atp-25%", "atp-heads"])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (one warm-up round more)")
    parser.add_argument("--llm", default="0.4b", choices=["quick", "0.4b"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dtype = torch.bfloat16 if bench._cpu_has_bf16() else torch.float32
    model = bench.build_model(args.llm, dtype, "cpu")
    layers = model.model.language_model.layers
    n_layers = len(layers)
    batch = bench.inputs(model, "cpu", dtype)
    clock = LayerClock(layers)

    def run(b) -> tuple[float, list[float]]:
        start = time.thread_time()
        model(**bench.fresh(b), use_cache=True, logits_to_keep=1)
        return time.thread_time() - start, [clock.times[i] for i in range(n_layers)]

    try:
        with torch.no_grad():
            for name in args.methods:
                config = METHODS[name](n_layers)
                counts = bench.visual_tokens_per_layer(model, batch, config)
                mean = round(sum(counts) / n_layers)
                prompts = {n: bench.inputs(model, "cpu", dtype, visual=n) for n in sorted(set(counts) | {mean})}
                wrapped, direct = [], {n: [] for n in prompts}
                for round_ in range(args.rounds + 1):
                    for n, prompt in prompts.items():
                        result = run(prompt)
                        if round_:
                            direct[n].append(result)
                    tr.wrap(model, config)
                    try:
                        result = run(batch)
                    finally:
                        tr.unwrap(model)
                    if round_:
                        wrapped.append(result)
                med = statistics.median
                w_total = med(t for t, _ in wrapped)
                w_layer = [med(per[i] for _, per in wrapped) for i in range(n_layers)]
                d_total = {n: med(t for t, _ in runs) for n, runs in direct.items()}
                d_layer = {n: [med(per[i] for _, per in runs) for i in range(n_layers)] for n, runs in direct.items()}
                per_layer_direct = (d_total[mean] - sum(d_layer[mean])) + sum(d_layer[counts[i]][i] for i in range(n_layers))
                print(f"== {name}: visual tokens per layer {counts}")
                print(f"wrapped {w_total * 1e3:.1f} ms | direct at the mean ({mean}) {d_total[mean] * 1e3:.1f} ms: "
                      f"{d_total[mean] / w_total:.1%} | per-layer direct {per_layer_direct * 1e3:.1f} ms: "
                      f"{per_layer_direct / w_total:.1%}")
                print(f"outside the layers: wrapped {(w_total - sum(w_layer)) * 1e3:.1f} ms, unwrapped at the mean "
                      f"{(d_total[mean] - sum(d_layer[mean])) * 1e3:.1f} ms")
                print("per layer, wrapped - unwrapped at its length (ms): " + " ".join(
                    f"{i}:{(w_layer[i] - d_layer[counts[i]][i]) * 1e3:+.1f}" for i in range(n_layers)))
    finally:
        clock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
