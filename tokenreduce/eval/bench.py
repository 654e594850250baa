"""Prefill and decode speed of reduced vs full visual tokens at LLaVA-1.5 geometry, measured in one run.

Shared by ``tokenreduce bench`` and ``benchmarks/prefill.py``. A random-weight
LlavaForConditionalGeneration with a ~0.4B-parameter Llama LM (hidden 1024, 24 layers; ``--llm 7b``: LLaVA-1.5-7B's
Vicuna-7B geometry, hidden 4096, 32 layers, built directly on the device) reads 576 visual tokens (24x24, as CLIP
ViT-L/14@336) plus ~40 text tokens. On a GPU the 0.4B LM's prefill is bound by kernel launches, not arithmetic, so
it measures the methods' overhead; the 7B LM shows the speedup a served model gets. Visual features are computed once and passed
as ``mm_encoder_outputs`` so every timing covers what token reduction changes: the reducer and the LLM
prefill. For each method it prints the measured speedup over the full prefill, the ideal speedup from
analytic FLOPs, and their ratio; decode ms/token and KV-cache bytes; the reducer's own share of a
full prefill; and a "direct" row: the unwrapped model fed, layer by layer, as many visual tokens as the
method's layers see (its prefill at each of those lengths, weighted by the share of layers at it), the cost
of the same sequence without the reducer and the bookkeeping. Absolute times on shared CPUs are noisy: read the ratios.

    tokenreduce bench                 # CPU (bf16 where the CPU has it natively, else fp32)
    tokenreduce bench --device cuda   # on a GPU
    tokenreduce bench --device cuda --llm 7b
    tokenreduce bench --quick         # small model, for a smoke run
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import tokenreduce as tr
from tokenreduce.core.config import build_config
from tokenreduce.eval.measure import cache_bytes
from tokenreduce.plugins.atp import ATPConfig, ThresholdHeads
from tokenreduce.plugins.baselines.pdrop import PDropConfig

RESULTS = Path("benchmarks") / "results"
WARMUP = 2
METHODS = ("full", "pool-64", "fastv-K2-64", "dart-K2-64", "fastv-K2-50%", "pdrop-25%", "atp-25%", "atp-heads")
IMAGE_TOKEN = 32000
FULL_VISUAL = 576  # visual tokens per prompt (24 x 24, CLIP ViT-L/14@336)


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# Language-model sizes (``quick`` for smoke runs); the vocabulary, positions and vision stub are shared.
LLM_SIZES = {
    "quick": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=4),
    "0.4b": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
}


def build_model(size: str, dtype: torch.dtype, device: str):
    """The random-weight LLaVA-1.5-geometry model with the language model of ``size`` (:data:`LLM_SIZES`),
    initialised on ``device`` (a 7B model initialised on the CPU first would take minutes)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    text = dict(model_type="llama", vocab_size=32064, max_position_embeddings=4096, **LLM_SIZES[size])
    text["num_key_value_heads"] = text["num_attention_heads"]
    vision = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, image_size=336, patch_size=14)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def inputs(model, device: str, dtype: torch.dtype, text_tokens: int = 40, batch: int = 1, visual: int = 576) -> dict:
    """``batch`` prompts of ``visual`` visual (precomputed features) and ``text_tokens`` text tokens each.

    The text is the same whatever ``visual`` is, so a prompt of fewer visual tokens is the "direct" input a
    reduction would produce: what the unwrapped model costs on the reduced sequence (per layer, for
    methods that prune inside the LLM: :func:`direct_mix`).
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    g = torch.Generator().manual_seed(1)
    before = torch.randint(3, 32000, (batch, 5), generator=g)
    after = torch.randint(3, 32000, (batch, text_tokens - 5), generator=g)
    ids = torch.cat([before, torch.full((batch, visual), IMAGE_TOKEN), after], dim=1).to(device)
    hidden = model.config.text_config.hidden_size
    feats = [torch.randn(visual, hidden, generator=g).to(device=device, dtype=dtype) for _ in range(batch)]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=feats)}}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fresh(batch: dict) -> dict:
    # mm_encoder_outputs is consumed per call: hand each call its own dict
    return {**batch, "mm_encoder_outputs": dict(batch["mm_encoder_outputs"])}


def kv_bytes(cache) -> int:
    """Bytes of a cache's keys and values (all layers)."""
    return cache_bytes(cache)


def once_ms(fn, device: str = "cpu") -> float:
    """Milliseconds of one call of ``fn`` (CUDA synchronised on both sides)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def median_ms(fn, repeats: int, warmup: int = 1, device: str = "cpu") -> float:
    """Median of ``repeats`` timed calls of ``fn`` after ``warmup`` untimed ones, in milliseconds."""
    for _ in range(warmup):
        fn()
    return statistics.median(once_ms(fn, device) for _ in range(repeats))


def visual_tokens_per_layer(model, batch, config) -> list[int]:
    """Visual tokens each decoder layer of the wrapped model sees in prefill (rounded mean over the batch's
    rows): the lengths its "direct" row feeds the unwrapped model."""
    tr.wrap(model, config)
    try:
        with torch.no_grad():
            tr.stats(model, reset=True)
            model(**fresh(batch), use_cache=True, logits_to_keep=1)
            samples = tr.stats(model).samples
        per_row = [[n - s.text_tokens for n in s.tokens_per_layer()] for s in samples]
        return [max(1, round(sum(col) / len(col))) for col in zip(*per_row)]
    finally:
        tr.unwrap(model)


def direct_mix(per_layer: list[int]) -> dict[int, float]:
    """``{visual tokens: share of the layers that see that many}`` of a method's per-layer counts.

    The direct row of a method is the unwrapped model's prefill at each of these lengths, weighted by its
    share: what the method's layers would cost if nothing but their lengths changed. A prompt of the mean
    length instead is cheaper than the method's own layers (attention grows with the square of the length,
    and short sequences use the hardware less well), so it would charge an in-LLM method for both.
    """
    mix: dict[int, float] = {}
    for n in per_layer:
        mix[n] = mix.get(n, 0.0) + 1.0 / len(per_layer)
    return mix


def measure_interleaved(model, batch, device: str, methods: list, repeats: int, decode_tokens: int,
                        direct: dict | None = None, direct_inputs: dict | None = None) -> list[dict]:
    """Time every method in rounds (one prefill and one decode measurement of each per round).

    On a shared machine load drifts over minutes; interleaving puts every method under the same load, and
    each speedup is the median of per-round ratios against the full prefill of the same round. ``direct``
    maps a method to its :func:`direct_mix` (visual tokens -> share of the layers), ``direct_inputs`` a
    visual-token count to the unwrapped model's prompt of that many; each length is timed once per round
    (the full length is the full row's own prefill), a method's direct time is the mix's weighted sum of
    its round, and the row's ``of_direct`` is the median per-round ratio of that time to the method's
    prefill. ``decode_tokens=0`` skips the decode measurement.
    """
    direct = direct or {}
    direct_inputs = direct_inputs or {}
    full_visual = int(batch["input_ids"].eq(IMAGE_TOKEN).sum(1)[0])

    def prefill(b):
        return model(**fresh(b), use_cache=True, logits_to_keep=1)

    def decode_ms():
        if decode_tokens <= 0:
            return float("nan")
        one = once_ms(lambda: model.generate(**fresh(batch), max_new_tokens=1, do_sample=False), device)
        many = once_ms(lambda: model.generate(**fresh(batch), max_new_tokens=1 + decode_tokens, do_sample=False),
                        device)
        return (many - one) / decode_tokens

    times = {name: {"prefill": [], "decode": [], "direct": []} for name, _ in methods}
    extra: dict[str, dict] = {}
    with torch.no_grad():
        for round_ in range(WARMUP + repeats):
            lengths: dict[int, float] = {}  # this round's unwrapped prefill ms per visual-token count
            for name, config in methods:
                for n in direct.get(name, {}):
                    if n not in lengths:  # (the full length: the full row, timed first, holds it)
                        lengths[n] = once_ms(functools.partial(prefill, direct_inputs[n]), device)
                if config is not None:
                    tr.wrap(model, config)
                try:
                    p_ms = once_ms(lambda: prefill(batch), device)
                    d_ms = decode_ms()
                    if config is None:
                        lengths[full_visual] = p_ms
                    if round_ >= WARMUP:
                        times[name]["prefill"].append(p_ms)
                        times[name]["decode"].append(d_ms)
                        if name in direct:
                            times[name]["direct"].append(sum(w * lengths[n] for n, w in direct[name].items()))
                    if name not in extra:
                        tr.stats(model, reset=True) if config is not None else None
                        out = prefill(batch)
                        extra[name] = {"kv_cache_bytes": kv_bytes(out.cache)}
                        if config is not None:
                            sample = tr.stats(model).samples[-1]
                            extra[name].update(
                                reducer_ms=sample.reducer_ms, flops=sample.prefill_flops,
                                flops_full=sample.prefill_flops_full,
                                visual_tokens_layer_mean=sample.visual_tokens_layer_mean,
                            )
                finally:
                    if config is not None:
                        tr.unwrap(model)
    full = times[methods[0][0]]
    rows = []
    for name, _ in methods:
        t = times[name]
        row = {"method": name, "prefill_ms": statistics.median(t["prefill"]),
               "decode_ms_per_token": _median_or_none([d for d in t["decode"] if d == d]), **extra[name],
               "speedup": statistics.median(f / m for f, m in zip(full["prefill"], t["prefill"])),
               "decode_speedup": _median_or_none([f / m for f, m in zip(full["decode"], t["decode"]) if m > 0])}
        if t["direct"]:
            mix = direct[name]
            row["direct"] = {"visual_tokens": round(sum(n * w for n, w in mix.items())),
                             "layers_at": {str(n): round(w * _layers(model)) for n, w in sorted(mix.items(), reverse=True)},
                             "prefill_ms": statistics.median(t["direct"]),
                             "speedup": statistics.median(f / d for f, d in zip(full["prefill"], t["direct"]))}
            row["of_direct"] = statistics.median(d / m for d, m in zip(t["direct"], t["prefill"]))
        rows.append(row)
    return rows


def _layers(model) -> int:
    return model.config.text_config.num_hidden_layers


def _median_or_none(values: list[float]) -> float | None:
    """Median, or None when no repeat gave a usable value (a decode too short for the timer to see)."""
    return statistics.median(values) if values else None


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The benchmark's options (added to ``parser`` when given: the CLI's ``bench`` subcommand)."""
    parser = parser or argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the model runs (default cuda when there is a GPU, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="auto: bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX), else "
                             "float32 (emulated bf16 matmuls are several times slower than fp32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per row; medians over the rounds (default 5)")
    parser.add_argument("--decode-tokens", type=int, default=8, help="0: no decode measurement")
    parser.add_argument("--no-direct", action="store_true",
                        help="skip the direct rows (the unwrapped model fed, layer by layer, as many visual tokens as "
                             "each method's layers see)")
    parser.add_argument("--quick", action="store_true", help="small model for a smoke run")
    parser.add_argument("--batch", type=int, default=1, help="prompts per prefill (one image each)")
    parser.add_argument("--llm", default="0.4b", choices=["0.4b", "7b"],
                        help="language-model size (7b: LLaVA-1.5-7B's; ~14 GB in bf16, for a GPU)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="rows to measure ('full', the reference, is always measured)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default benchmarks/results/prefill_<device>.json)")
    return parser


def main(argv: list[str] | None = None, results_dir: Path | None = None) -> int:
    """Parse ``argv`` and run the benchmark; results go to ``--out`` or ``results_dir``."""
    return run(build_parser().parse_args(argv), results_dir)


def run(args: argparse.Namespace, results_dir: Path | None = None) -> int:
    """Run the benchmark with parsed ``args``; print the table and write the JSON report."""
    if args.batch < 1:
        raise SystemExit(f"--batch must be >= 1, got {args.batch}")
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") or _cpu_has_bf16() else "float32"
    dtype = getattr(torch, args.dtype)
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 16)))
    size = "quick" if args.quick else args.llm
    model = build_model(size, dtype, args.device)
    batch = inputs(model, args.device, dtype, batch=args.batch)
    layers = model.config.text_config.num_hidden_layers
    configs = {"full": lambda: None, "pool-64": lambda: build_config("pool", keep=64),
               "fastv-K2-64": lambda: build_config("fastv", layer=2, keep=64),
               "dart-K2-64": lambda: build_config("dart", layer=2, keep=64),
               "fastv-K2-50%": lambda: build_config("fastv", layer=2, keep=0.5),
               "pdrop-25%": lambda: build_config("pdrop", **_pdrop(layers)),
               "atp-25%": lambda: _atp(layers), "atp-heads": lambda: _atp_heads(layers)}
    methods = [(name, configs[name]()) for name in METHODS if name == "full" or name in args.methods]
    direct, direct_inputs = {}, {}
    if not args.no_direct:
        for name, config in methods[1:]:
            direct[name] = direct_mix(visual_tokens_per_layer(model, batch, config))
            for n in direct[name]:
                if n != FULL_VISUAL and n not in direct_inputs:
                    direct_inputs[n] = inputs(model, args.device, dtype, batch=args.batch, visual=n)
    rows = measure_interleaved(model, batch, args.device, methods, args.repeats, args.decode_tokens, direct,
                               direct_inputs)
    full = rows[0]
    for row in rows[1:]:
        row["ideal_speedup"] = row["flops_full"] / row["flops"]
        row["of_ideal"] = row["speedup"] / row["ideal_speedup"]
        # What the printed table shows beside the median times: their ratio (``speedup`` is the median of
        # per-round ratios, steadier under drifting load but not the ratio of the two medians printed).
        row["speedup_of_medians"] = full["prefill_ms"] / row["prefill_ms"]
        if "direct" in row:
            row["direct"]["speedup_of_medians"] = full["prefill_ms"] / row["direct"]["prefill_ms"]
        row["reducer_share_of_full_prefill"] = row["reducer_ms"] / full["prefill_ms"]
        row["kv_cache_ratio"] = row["kv_cache_bytes"] / full["kv_cache_bytes"]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    report = {"device": args.device, "device_name": device_name, "dtype": args.dtype, "threads": torch.get_num_threads(),
              "quick": args.quick, "llm": size, "batch": args.batch, "llm_layers": layers, "visual_tokens": 576, "rows": rows}
    stem = {"quick": "quick_", "0.4b": "", "7b": "7b_"}[size]
    stem += f"b{args.batch}_" if args.batch > 1 else ""
    out = args.out or (results_dir or RESULTS) / f"prefill_{stem}{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{device_name} ({args.device}, {args.dtype}, {torch.get_num_threads()} threads), {size} LM of {layers} layers, "
          f"batch {args.batch}, 576 visual + 40 text tokens per prompt")
    print(f"prefill ms: median over {args.repeats} interleaved round(s); speedup: the full row's median over the "
          "row's (the median of per-round ratios is `speedup` in the JSON)"
          + ("; one round: noisy, use --repeats 5 or more" if args.repeats < 3 else ""))
    print(f"{'method':<14}{'vis/layer':>10}{'prefill ms':>12}{'speedup':>9}{'ideal':>8}{'of ideal':>10}"
          f"{'of direct':>11}{'reducer %':>11}{'decode ms/tok':>15}{'KV MiB':>9}")
    for row in rows:
        decode = row["decode_ms_per_token"]
        print(
            f"{row['method']:<14}{row.get('visual_tokens_layer_mean', 576):>10.1f}{row['prefill_ms']:>12.1f}"
            f"{row.get('speedup_of_medians', 1.0):>9.2f}{row.get('ideal_speedup', 1.0):>8.2f}"
            f"{row.get('speedup_of_medians', 1.0) / row.get('ideal_speedup', 1.0):>10.1%}"
            f"{row.get('of_direct', 1.0):>11.1%}{row.get('reducer_share_of_full_prefill', 0.0):>11.2%}"
            f"{'-' if decode is None else f'{decode:.1f}':>15}{row['kv_cache_bytes'] / 2**20:>9.1f}"
        )
        if "direct" in row:
            d = row["direct"]
            label = f"  direct {d['visual_tokens']}"
            mix = " + ".join(f"{n}x{count}" for n, count in d["layers_at"].items()) if len(d["layers_at"]) > 1 else ""
            print(f"{label:<14}{d['visual_tokens']:>10.1f}{d['prefill_ms']:>12.1f}{d['speedup_of_medians']:>9.2f}"
                  f"{row['ideal_speedup']:>8.2f}{d['speedup_of_medians'] / row['ideal_speedup']:>10.1%}"
                  + (f"   visual tokens x layers: {mix}" if mix else ""))
    print(f"written to {out}")
    return 0


def _pdrop(layers: int) -> dict:
    cfg = PDropConfig.at_budget(0.25, num_layers=layers)
    return {"layers": cfg.layers, "keep": cfg.keep}


def _atp(layers: int):
    return ATPConfig.at_budget(0.25, num_layers=layers)  # training-free: the scoring is the overhead


_HEADS_DIRS: list = []  # kept alive (and removed at exit) while a benchmark's model is wrapped


def _atp_heads(layers: int):
    """ATP with threshold heads and the recorded recipe's scoring (layer K's own attention, every text
    token). The heads are untrained (thresholds at uniform importance): the row measures what the heads and
    that scoring cost; its kept share is its own, and its ideal speedup follows it."""
    import tempfile
    from dataclasses import replace

    cfg = ATPConfig.at_budget(0.25, num_layers=layers)
    _HEADS_DIRS.append(tempfile.TemporaryDirectory(prefix="atp-heads-"))
    ThresholdHeads(list(cfg.layers), spatial_rates=cfg.spatial_rates, spatial_score_scale=cfg.spatial_score_scale,
                   cross="all_text", score_layer="current").save_pretrained(_HEADS_DIRS[-1].name)
    return replace(cfg, heads=_HEADS_DIRS[-1].name, cross="all_text", score_layer="current")


if __name__ == "__main__":
    sys.exit(main())
