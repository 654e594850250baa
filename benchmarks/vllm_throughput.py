"""Serving throughput of reduced prompts in vLLM, measured side by side in one run.

A random-weight Qwen2-VL with a Qwen2-0.5B-shaped language model (24 layers x 896, head_dim 64, MLP 4864;
a 1000-word vocabulary) gets ``N`` prompts of one image each, every image different (no prefix or
encoder cache hits), and writes ``max_tokens`` new tokens per prompt:

- ``full``: 672 x 672 images, 576 visual tokens per prompt;
- ``pool`` and ``divprune`` at 64 tokens through the tokenreduce plugin (the same images);
- ``direct``: 224 x 224 images, whose prompts hold 64 visual tokens to begin with;
- ``direct_embeds``: 64 precomputed image embeddings per prompt (a 16 x 16 patch grid, fed through
  vLLM's embedding input, ``enable_mm_embeds``): no preprocessing and no encoder at all. To it the image
  work a reduced run paid for the full images (its own preprocessing and encoder seconds) is added, which
  gives the direct run that pays the same encoder: the reference that isolates the plugin's own overhead.

Every run is timed end to end (``llm.generate`` over the N prompts, after a 2-prompt warm-up), and inside
the engine (in this process) the image work is summed: the model runner's encoder steps
(``_execute_mm_encoder``: batching the images' inputs, vLLM's tower and merger, the encoder cache) less
the plugin's own work in them (the method's ``reduce`` and the position channels, reported as
``reducer``), and the front-end's HF processor on each image (``preprocess``). Comparisons with the
direct run follow:

- **as served** (requests/s of the run as a whole): a reducer after the tower still pays the full
  image's encoder (2304 patches against the direct run's 256), which the plugin does not control;
- **as served against direct with the full image work** (the goal's measure: reduced >= 95 %): a reduced
  run's requests/s against N / (``direct_embeds`` seconds + that reduced run's preprocessing and encoder
  seconds);
- **without image work** (what the plugin controls): requests / (run seconds - preprocess - encoder
  seconds), the plugin's own reducer time staying in, against the ``direct`` run's less its own (small)
  image work: the strictest view of the plugin's overhead. The same ratio is also given in the process's CPU time (generate's CPU seconds less the image work's,
  all threads), which other jobs on a shared machine disturb less than wall time. The
  ratio with only the encoder taken out is reported too.

    python benchmarks/vllm_throughput.py                 # in .venv-vllm (make vllm-setup)
    python benchmarks/vllm_throughput.py --quick         # small model and N, a smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
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


def embeds(n: int, hidden: int, seed: int) -> list[dict]:
    """Precomputed image embeddings of ``KEEP`` tokens each (a 16 x 16 patch grid merged 2 x 2), as vLLM's
    Qwen2-VL embedding input takes them; random values (the run's cost does not depend on them)."""
    import torch

    side = 2 * int(KEEP**0.5)
    generator = torch.Generator().manual_seed(seed)
    return [{"image_embeds": torch.randn(KEEP, hidden, generator=generator), "image_grid_thw": torch.tensor([[1, side, side]])}
            for _ in range(n)]


def images(n: int, side: int, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


# Seconds summed per run (the engine runs in this process): "step", the model runner's encoder step
# (batching the items' inputs, the model's embed_multimodal, the encoder cache); inside it "total", the
# plugin's embed_multimodal, and inside that "tower", vLLM's own (tower and merger); "preprocess", the HF
# processor vLLM's front-end calls on each image (resizing, patchifying).
# Each also as process CPU time ("<key>_cpu"; all threads: the engine is synchronous in this process).
KEYS = ("step", "tower", "total", "preprocess")
TIMES = {"calls": 0, **{k: 0.0 for k in KEYS}, **{f"{k}_cpu": 0.0 for k in KEYS}}


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def install_timers() -> None:
    """Time vLLM's own ``embed_multimodal`` (the tower), the plugin's around it (tower + reduction) and
    the front-end's HF processor calls."""
    from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration
    from vllm.multimodal.processing.processor import BaseMultiModalProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from tokenreduce.integrations.vllm.models import Qwen2VLReduced

    def timed(fn, key):
        def wrapper(self, *args, **kwargs):
            _synchronize()
            start, cpu = time.perf_counter(), time.process_time()
            out = fn(self, *args, **kwargs)
            _synchronize()
            TIMES[key] += time.perf_counter() - start
            TIMES[f"{key}_cpu"] += time.process_time() - cpu
            TIMES["calls"] += key == "total"
            return out

        return wrapper

    Qwen2VLForConditionalGeneration.embed_multimodal = timed(Qwen2VLForConditionalGeneration.embed_multimodal, "tower")
    Qwen2VLReduced.embed_multimodal = timed(Qwen2VLReduced.embed_multimodal, "total")
    BaseMultiModalProcessor._call_hf_processor = timed(BaseMultiModalProcessor._call_hf_processor, "preprocess")
    GPUModelRunner._execute_mm_encoder = timed(GPUModelRunner._execute_mm_encoder, "step")


def run_engine(path: Path, imgs, reduction: dict | None, max_tokens: int, warm: list | None = None,
               **engine) -> dict:
    from vllm import LLM, SamplingParams

    overrides = None if reduction is None else {"tokenreduce": reduction}
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=2048, max_num_seqs=16,
              hf_overrides=overrides, seed=0, distributed_executor_backend="uni",
              limit_mm_per_prompt={"image": 1, "video": 0}, **engine)
    try:
        prompt = "<s> w5 w6 <|vision_start|> <|image_pad|> <|vision_end|> w7 w8 w9 w10"
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        warm = warm or images(2, imgs[0].size[0], 999)
        llm.generate([{"prompt": prompt, "multi_modal_data": {"image": im}} for im in warm], params, use_tqdm=False)
        TIMES.update({k: 0 for k in TIMES})
        inputs = [{"prompt": prompt, "multi_modal_data": {"image": im}} for im in imgs]
        start, cpu = time.perf_counter(), time.process_time()
        outs = llm.generate(inputs, params, use_tqdm=False)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    if TIMES["calls"] == 0:
        raise RuntimeError("the encoder timers saw no call: the engine did not run in this process")
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    reducer = TIMES["total"] - TIMES["tower"]
    encoder, preprocess = TIMES["step"] - reducer, TIMES["preprocess"]
    image_cpu = TIMES["step_cpu"] - (TIMES["total_cpu"] - TIMES["tower_cpu"]) + TIMES["preprocess_cpu"]
    return {
        "seconds": seconds, "requests_per_s": len(outs) / seconds, "prompt_tokens_per_s": prompt_tokens / seconds,
        "prompt_tokens_per_request": prompt_tokens / len(outs), "encoder_s": encoder,
        "tower_s": TIMES["tower"], "reducer_s": reducer, "preprocess_s": preprocess, "encoder_calls": TIMES["calls"],
        "requests_per_s_without_encoder": len(outs) / (seconds - encoder),
        "requests_per_s_without_image_work": len(outs) / (seconds - encoder - preprocess),
        "cpu_s": cpu_seconds, "image_work_cpu_s": image_cpu,
        "requests_per_cpu_s_without_image_work": len(outs) / (cpu_seconds - image_cpu),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32, help="prompts per run")
    parser.add_argument("--max-tokens", type=int, default=8, help="new tokens per prompt")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "vllm_throughput_cpu.md"))
    args = parser.parse_args()
    n = 4 if args.quick else args.n

    import torch
    import transformers as T
    import vllm

    install_timers()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(Path(tmp) / "qwen2_vl", args.quick)
        config = T.AutoConfig.from_pretrained(path)
        full_imgs, direct_imgs = images(n, FULL_SIDE, 0), images(n, DIRECT_SIDE, 1)
        hidden = config.text_config.hidden_size
        runs = {
            "full": run_engine(path, full_imgs, None, args.max_tokens),
            "pool": run_engine(path, full_imgs, {"method": "pool", "keep": KEEP}, args.max_tokens),
            "divprune": run_engine(path, full_imgs, {"method": "divprune", "keep": KEEP}, args.max_tokens),
            "direct": run_engine(path, direct_imgs, None, args.max_tokens),
            "direct_embeds": run_engine(path, embeds(n, hidden, 1), None, args.max_tokens,
                                        warm=embeds(2, hidden, 999), enable_mm_embeds=True),
        }
        params = sum(p.numel() for p in T.Qwen2VLForConditionalGeneration.from_pretrained(path).parameters())
    text, vis = config.text_config, config.vision_config
    shape = (f"LM {text.num_hidden_layers} x {text.hidden_size}, head_dim {text.head_dim}, MLP {text.intermediate_size}; vision tower "
             f"{vis.depth} x {vis.embed_dim}")
    direct = runs["direct"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or platform.machine())
    report = {
        "device": device, "threads": torch.get_num_threads(), "vllm": vllm.__version__, "torch": torch.__version__,
        "n": n, "max_tokens": args.max_tokens, "params": params, "model": shape, "runs": runs,
    }
    command = f"python benchmarks/vllm_throughput.py{' --quick' if args.quick else f' --n {n}'}"
    if args.max_tokens != 8:
        command += f" --max-tokens {args.max_tokens}"
    lines = [
        f"# vLLM throughput with tokenreduce ({'GPU' if torch.cuda.is_available() else 'CPU'})",
        "",
        f"`{command}`: vllm {vllm.__version__}, torch {torch.__version__}, fp32, enforce_eager, engine in-process, "
        f"{n} prompts of one image each (all different), {args.max_tokens} new tokens each, on {device} "
        f"({torch.get_num_threads()} threads). Model: random-weight Qwen2-VL, {params / 1e6:.0f}M parameters ({shape}).",
        "",
        "As served: each run timed end to end. The image work that grows with the image and that the plugin "
        "does not control is summed inside the run: the front-end's HF processor on each image (preprocess) and "
        "the model runner's encoder steps (batching the image inputs, vLLM's tower and merger, the encoder cache) "
        "less the plugin's reduction in them (encoder). Without image work: requests / (run seconds - preprocess "
        "- encoder); the plugin's reduction (reducer) stays in.",
        "",
        "| run | prompt tokens / request | requests/s | prompt tokens/s | vs full | vs direct | preprocess s | "
        "encoder s | reducer s | requests/s without image work | vs direct without image work | "
        "same in CPU time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    key, cpu_key = "requests_per_s_without_image_work", "requests_per_cpu_s_without_image_work"
    for name, r in runs.items():
        lines.append(
            f"| {name} | {r['prompt_tokens_per_request']:.0f} | {r['requests_per_s']:.3f} | "
            f"{r['prompt_tokens_per_s']:.1f} | {r['requests_per_s'] / runs['full']['requests_per_s']:.2f}x | "
            f"{r['requests_per_s'] / direct['requests_per_s']:.0%} | {r['preprocess_s']:.2f} | {r['encoder_s']:.2f} | "
            f"{r['reducer_s']:.3f} | {r[key]:.3f} | {r[key] / direct[key]:.0%} | {r[cpu_key] / direct[cpu_key]:.0%} |"
        )
    ratios = {m: runs[m][key] / direct[key] for m in ("pool", "divprune")}
    cpu_ratios = {m: runs[m][cpu_key] / direct[cpu_key] for m in ("pool", "divprune")}
    tower = {m: runs[m]["requests_per_s_without_encoder"] / direct["requests_per_s_without_encoder"]
             for m in ("pool", "divprune")}
    served = {m: runs[m]["requests_per_s"] / direct["requests_per_s"] for m in ("pool", "divprune")}
    # The direct run that pays the same image work: direct_embeds plus this reduced run's preprocessing and encoder.
    paid = {m: runs["direct_embeds"]["seconds"] + runs[m]["encoder_s"] + runs[m]["preprocess_s"]
            for m in ("pool", "divprune")}
    same_work = {m: paid[m] / runs[m]["seconds"] for m in ("pool", "divprune")}
    report["direct_embeds_with_image_work_s"] = paid
    per_request = {k: (runs["pool"][k] / n * 1e3, direct[k] / n * 1e3) for k in ("preprocess_s", "encoder_s")}
    lines += [
        "",
        f"Goal (reduced >= 95 % of direct), as served against the direct run that pays the same image work "
        f"(`direct_embeds`, {runs['direct_embeds']['seconds']:.2f} s, plus the reduced run's own preprocessing "
        f"and encoder seconds: pool {paid['pool']:.2f} s, divprune {paid['divprune']:.2f} s): "
        f"pool {same_work['pool']:.0%}, divprune {same_work['divprune']:.0%}.",
        "",
        f"Without image work on both sides (the reduced run less its preprocessing and encoder, against `direct` "
        f"less its own): pool {ratios['pool']:.0%}, "
        f"divprune {ratios['divprune']:.0%} in wall time; in the process's CPU time (less sensitive to other "
        f"jobs on the machine) pool {cpu_ratios['pool']:.0%}, divprune {cpu_ratios['divprune']:.0%}. Without the encoder only (preprocessing left in): pool "
        f"{tower['pool']:.0%}, divprune {tower['divprune']:.0%}. As served: pool {served['pool']:.0%}, "
        f"divprune {served['divprune']:.0%} of direct; per request the full image costs "
        f"{per_request['preprocess_s'][0]:.0f} ms of preprocessing and {per_request['encoder_s'][0]:.0f} ms of "
        f"encoder against the direct run's {per_request['preprocess_s'][1]:.0f} ms and "
        f"{per_request['encoder_s'][1]:.0f} ms.",
        "",
        "```json",
        json.dumps(report, indent=2),
        "```",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines[:-4]))


if __name__ == "__main__":
    sys.exit(main())
