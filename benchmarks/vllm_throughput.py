"""Serving throughput of reduced prompts in vLLM, measured side by side in one run.

A random-weight Qwen2-VL with a Qwen2-0.5B-shaped language model (24 layers x 896, head_dim 64, MLP 4864;
a 1000-word vocabulary) gets
``N`` prompts of one image each, every image different (no prefix or encoder cache hits):

- ``full``: 672 x 672 images, 576 visual tokens per prompt;
- ``pool`` and ``divprune`` at 64 tokens through the tokenreduce plugin (same images);
- ``direct``: 224 x 224 images, whose prompts hold 64 visual tokens to begin with.

A reducer runs after the vision tower, so it still pays the full image's encoder: the most it can reach
is the direct run plus the encoder time difference between the two image sizes (measured here on the
same tower, transformers, one image at a time). That limit is reported next to the runs.

    python benchmarks/vllm_throughput.py                 # in .venv-vllm (make vllm-setup)
    python benchmarks/vllm_throughput.py --quick         # small model and N, a smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

RESULTS = Path(__file__).parent / "results"
KEEP = 64
VISION_LAYERS, VISION_WIDTH = 4, 256
FULL_SIDE, DIRECT_SIDE = 672, 224


def build_model(directory: Path, quick: bool) -> Path:
    from tokenreduce.testing.tiny_vllm import save_vllm_model

    pixels = FULL_SIDE * FULL_SIDE
    if quick:
        return save_vllm_model("qwen2_vl", directory, max_pixels=pixels, num_layers=2, heads=2, head_dim=64)
    return save_vllm_model("qwen2_vl", directory, max_pixels=pixels, num_layers=24, heads=14, head_dim=64,
                           intermediate=4864, vision_layers=VISION_LAYERS, vision_width=VISION_WIDTH)


def images(n: int, side: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def run_engine(path: Path, imgs, reduction: dict | None, max_tokens: int) -> dict:
    from vllm import LLM, SamplingParams

    overrides = None if reduction is None else {"tokenreduce": reduction}
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=2048, max_num_seqs=16,
              hf_overrides=overrides, seed=0,
              limit_mm_per_prompt={"image": 1, "video": 0})
    try:
        prompt = "<s> w5 w6 <|vision_start|> <|image_pad|> <|vision_end|> w7 w8 w9 w10"
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        warm = images(2, DIRECT_SIDE, 999)
        llm.generate([{"prompt": prompt, "multi_modal_data": {"image": im}} for im in warm], params, use_tqdm=False)
        inputs = [{"prompt": prompt, "multi_modal_data": {"image": im}} for im in imgs]
        start = time.perf_counter()
        outs = llm.generate(inputs, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    return {
        "seconds": seconds, "requests_per_s": len(outs) / seconds, "prompt_tokens_per_s": prompt_tokens / seconds,
        "prompt_tokens_per_request": prompt_tokens / len(outs),
    }


def encoder_ms(path: Path, side: int, repeats: int) -> float:
    """Median ms of the transformers vision tower (patch embed to merger) on one ``side`` x ``side`` image."""
    import torch
    import transformers as T

    processor = T.AutoProcessor.from_pretrained(path)
    model = T.Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    px = processor.image_processor(images(1, side, 7), return_tensors="pt")
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model.model.get_image_features(px["pixel_values"], px["image_grid_thw"])
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32, help="prompts per run")
    parser.add_argument("--max-tokens", type=int, default=8, help="new tokens per prompt")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "vllm_throughput_cpu.md"))
    args = parser.parse_args()
    n = 4 if args.quick else args.n

    import torch
    import vllm

    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(Path(tmp) / "qwen2_vl", args.quick)
        full_imgs, direct_imgs = images(n, FULL_SIDE, 0), images(n, DIRECT_SIDE, 1)
        runs = {
            "full": run_engine(path, full_imgs, None, args.max_tokens),
            "pool": run_engine(path, full_imgs, {"method": "pool", "keep": KEEP}, args.max_tokens),
            "divprune": run_engine(path, full_imgs, {"method": "divprune", "keep": KEEP}, args.max_tokens),
            "direct": run_engine(path, direct_imgs, None, args.max_tokens),
        }
        enc = {"full": encoder_ms(path, FULL_SIDE, 5), "direct": encoder_ms(path, DIRECT_SIDE, 5)}
        import transformers as T

        config = T.AutoConfig.from_pretrained(path)
        params = sum(p.numel() for p in T.Qwen2VLForConditionalGeneration.from_pretrained(path).parameters())
    text, vis = config.text_config, config.vision_config
    shape = (f"LM {text.num_hidden_layers} x {text.hidden_size}, head_dim {text.head_dim}, MLP {text.intermediate_size}; vision tower "
             f"{vis.depth} x {vis.embed_dim}")

    direct_s_per_req = runs["direct"]["seconds"] / n
    limit_rps = 1.0 / (direct_s_per_req + (enc["full"] - enc["direct"]) / 1e3)
    report = {
        "device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "vllm": vllm.__version__, "torch": torch.__version__, "n": n, "max_tokens": args.max_tokens,
        "params": params, "model": shape, "runs": runs, "encoder_ms": enc, "limit_requests_per_s": limit_rps,
    }
    lines = [
        "# vLLM throughput with tokenreduce (CPU)",
        "",
        f"`python benchmarks/vllm_throughput.py{' --quick' if args.quick else ''}`: vllm-cpu {vllm.__version__}, "
        f"torch {torch.__version__}, fp32, enforce_eager, engine in-process, {n} prompts of one image each "
        f"(all different), {args.max_tokens} new tokens each. Model: random-weight Qwen2-VL, {params / 1e6:.0f}M "
        f"parameters ({shape}).",
        "",
        "| run | prompt tokens / request | requests/s | prompt tokens/s | vs full | vs direct |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        lines.append(
            f"| {name} | {r['prompt_tokens_per_request']:.0f} | {r['requests_per_s']:.3f} | "
            f"{r['prompt_tokens_per_s']:.1f} | {r['requests_per_s'] / runs['full']['requests_per_s']:.2f}x | "
            f"{r['requests_per_s'] / runs['direct']['requests_per_s']:.0%} |"
        )
    lines += [
        "",
        f"Vision encoder (transformers, same weights, one image): {enc['full']:.1f} ms at {FULL_SIDE}x{FULL_SIDE} "
        f"({(FULL_SIDE // 14) ** 2} patches), {enc['direct']:.1f} ms at {DIRECT_SIDE}x{DIRECT_SIDE} "
        f"({(DIRECT_SIDE // 14) ** 2} patches).",
        f"Limit for a reducer after the tower (direct run + the encoder difference per request): "
        f"{limit_rps:.3f} requests/s; pool reaches {runs['pool']['requests_per_s'] / limit_rps:.0%} of it, "
        f"divprune {runs['divprune']['requests_per_s'] / limit_rps:.0%}.",
        "",
        "```json",
        json.dumps(report, indent=2),
        "```",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines[:14]))


if __name__ == "__main__":
    sys.exit(main())
