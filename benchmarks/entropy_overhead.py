"""Overhead of ``ares`` entropy tracking per generated token: wrapped vs unwrapped ``generate``, one run.

A random-weight Qwen2-VL with a small LM (hidden 512, 4 layers by default) and Qwen's real vocabulary
(152,064 ids) decodes text-only prompts greedily. Each configuration is timed in interleaved repetitions
(unwrapped, tracking only, tracking + budget controller) so load changes on shared CPUs hit all of them
alike; the script reports median ms per decode step, the wrapped/unwrapped ratios, the time spent inside
the ares logits processor per step (measured in place, less sensitive to load swings than the difference
of two end-to-end timings), and the isolated cost of the entropy op on one step's ``[B, V]`` scores. The tracked run must produce the same tokens as the
unwrapped one (checked).

    python benchmarks/entropy_overhead.py                    # CPU, 1 thread, batch 1 and 4
    python benchmarks/entropy_overhead.py --threads 2 --batch 1 8 --tokens 64
    python benchmarks/entropy_overhead.py --device cuda

Results go to ``benchmarks/results/entropy_overhead_<device>.json`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import tokenreduce as tr
from tokenreduce.kernels import token_entropy

RESULTS = Path(__file__).parent / "results"


def build_model(vocab: int, hidden: int, layers: int, device: str, dtype: torch.dtype):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [8, 12, 12]}  # head_dim 64
    text = dict(model_type="qwen2_vl_text", vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2, rope_parameters=rope,
                max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(depth=1, embed_dim=32, hidden_size=hidden, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=vocab - 3,
                           video_token_id=vocab - 4, vision_start_token_id=vocab - 5, vision_end_token_id=vocab - 6)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).to(device=device, dtype=dtype).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def timed_generate(model, inputs, tokens: int, device: str) -> tuple[float, torch.Tensor]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3, out


class ProcessorClock:
    """Wall time spent inside the ares logits processor (the per-step tracking work), summed."""

    def __init__(self) -> None:
        from tokenreduce.plugins.ares.generation import EntropyController

        self.cls, self.original, self.seconds = EntropyController, EntropyController.__call__, 0.0
        clock = self

        def timed(controller, input_ids, scores):
            start = time.perf_counter()
            try:
                return clock.original(controller, input_ids, scores)
            finally:
                clock.seconds += time.perf_counter() - start

        EntropyController.__call__ = timed

    def close(self) -> None:
        self.cls.__call__ = self.original


def entropy_op_ms(batch: int, vocab: int, device: str, repeats: int = 50) -> float:
    scores = torch.randn(batch, vocab, device=device)
    for _ in range(3):
        token_entropy(scores)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        token_entropy(scores)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1)")
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--tokens", type=int, default=48, help="generated tokens per run")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions per configuration")
    parser.add_argument("--out", default=None, help="results stem (default results/entropy_overhead_<device>)")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    model = build_model(args.vocab, args.hidden, args.layers, args.device, dtype)
    params = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    configs = {
        "unwrapped": None,
        "tracking": {},
        "tracking+budget": {"budgets": {"easy": 16, "medium": 24, "hard": 32}, "probe_tokens": 8,
                            "end_ids": (5, 6)},
    }
    rows = []
    for batch in args.batch:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(10, args.vocab - 10, (batch, args.prompt), generator=g).to(args.device)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        timed_generate(model, inputs, 4, args.device)  # warm-up
        times: dict[str, list[float]] = {name: [] for name in configs}
        inside: dict[str, list[float]] = {name: [] for name in configs}
        outputs: dict[str, torch.Tensor] = {}
        clock = ProcessorClock()
        try:
            for _ in range(args.repeats):
                for name, options in configs.items():
                    if options is not None:
                        tr.wrap(model, "ares", **options)
                    clock.seconds = 0.0
                    try:
                        ms, out = timed_generate(model, inputs, args.tokens, args.device)
                    finally:
                        if options is not None:
                            tr.unwrap(model)
                    times[name].append(ms / args.tokens)
                    inside[name].append(clock.seconds * 1e3 / args.tokens)
                    outputs[name] = out
        finally:
            clock.close()
        same = bool(torch.equal(outputs["tracking"], outputs["unwrapped"]))
        op = entropy_op_ms(batch, args.vocab, args.device)
        base = statistics.median(times["unwrapped"])
        for name, values in times.items():
            median = statistics.median(values)
            rows.append({
                "batch": batch, "config": name, "ms_per_token": round(median, 4),
                "ms_per_token_min": round(min(values), 4), "ratio_vs_unwrapped": round(median / base, 4),
                "overhead_ms_per_token": round(median - base, 4),
                "processor_ms_per_token": round(statistics.median(inside[name]), 4),
                "entropy_op_ms": round(op, 4),
                "tokens_identical_to_unwrapped": same if name == "tracking" else None,
            })
        print(f"batch {batch}: unwrapped {base:.3f} ms/token; " + "; ".join(
            f"{r['config']} {r['ms_per_token']:.3f} ms/token (x{r['ratio_vs_unwrapped']:.3f}, "
            f"{r['processor_ms_per_token']:.3f} ms in the processor)"
            for r in rows if r["batch"] == batch and r["config"] != "unwrapped")
            + f"; entropy op {op:.3f} ms/step; tokens identical: {same}")
    meta = {
        "device": args.device, "threads": torch.get_num_threads() if args.device == "cpu" else None,
        "dtype": str(dtype), "vocab": args.vocab, "hidden": args.hidden, "layers": args.layers,
        "lm_parameters": params, "prompt_tokens": args.prompt, "generated_tokens": args.tokens,
        "repeats": args.repeats, "torch": torch.__version__, "python": sys.version.split()[0],
        "platform": platform.platform(), "processor": platform.processor(),
    }
    stem = Path(args.out) if args.out else RESULTS / f"entropy_overhead_{args.device}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"results: {stem.with_suffix('.json')} and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
