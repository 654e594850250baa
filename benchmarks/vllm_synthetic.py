"""The shipped synthetic image model scored through vLLM and through ``tr.wrap``, on the same test samples.

For full tokens and for ``pool`` / ``divprune`` at 25 % of the visual tokens: accuracy on the first ``N``
samples of the synthetic image benchmark's test split through vLLM (tokenreduce plugin) and through the
transformers path (``tr.wrap``), with the same options (kept tokens at their original positions), and
how many answers agree.

    python benchmarks/vllm_synthetic.py            # in .venv-vllm (make vllm-setup); N = 200
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "assets" / "models" / "synthetic-llava-image"
RESULTS = Path(__file__).parent / "results"
CONFIGS = {
    "full": None,
    "pool 25 %": {"method": "pool", "keep": 0.25},
    "divprune 25 %": {"method": "divprune", "keep": 0.25},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--out", default=str(RESULTS / "vllm_synthetic_cpu.md"))
    args = parser.parse_args()

    import vllm

    from tokenreduce.eval.synthetic import load_synthetic
    from tokenreduce.integrations.vllm.synthetic import accuracy, hf_answers, vllm_answers

    samples = load_synthetic("image", "test", args.n)
    rows = []
    for name, reduction in CONFIGS.items():
        start = time.perf_counter()
        served = vllm_answers(str(MODEL), samples, reduction, distributed_executor_backend="uni")
        wrapped = hf_answers(str(MODEL), samples, reduction)
        rows.append({
            "config": name, "vllm": accuracy(samples, served), "hf": accuracy(samples, wrapped),
            "agree": sum(a == b for a, b in zip(served, wrapped)), "seconds": time.perf_counter() - start,
        })
        print(rows[-1], flush=True)

    lines = [
        "# The shipped synthetic image model through vLLM vs tr.wrap (CPU)",
        "",
        f"`python benchmarks/vllm_synthetic.py --n {args.n}`: `assets/models/synthetic-llava-image` (LLaVA-1.5 "
        f"class, saved by transformers 5.24, loaded by vllm-cpu {vllm.__version__} through the plugin's weight-name "
        f"mapping), the first {args.n} samples of the synthetic image benchmark's test split, greedy one-word "
        "answers, exact match; the same method options on both sides (kept tokens at their original positions).",
        "",
        "| config | vLLM accuracy | transformers accuracy | difference (points) | answers that agree |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['vllm']:.1f} % | {r['hf']:.1f} % | {r['vllm'] - r['hf']:+.1f} | "
            f"{r['agree']} / {args.n} |"
        )
    lines += ["", "```json", json.dumps(rows, indent=2), "```", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines[:10 + len(rows)]))


if __name__ == "__main__":
    sys.exit(main())
