"""VQToken's cost against what it saves: codebook build + assignment per video vs the LLM prefill saved.

For each geometry, one video's projected tokens are built as a video would give them: a static per-patch
texture repeated over the frames, a few moving objects, and per-token noise. We then measure:

* ``build_ms``: the FAISS cosine k-means codebook (k-means++ seeding included), at fixed ``K`` and, where
  asked, in adaptive mode (elbow over ``K`` in [12, 32], one k-means per candidate);
* ``assign_ms``: the nearest-codeword assignment alone (``tokenreduce.kernels.codebook_assign``);
* ``method_ms``: the whole ``vqtoken`` reduce (codebook, token hash, code tokens), codebook only;
* ``prefill_full_ms`` / ``prefill_vq_ms``: the LLM prefill of the visual tokens plus the text tokens, full
  vs ``K`` code tokens. That is the whole decoder where it fits, or one decoder layer of the real
  geometry times the depth where a full-depth run would take minutes on the CPU (``prefill_scaled``).
  Every layer has the same shape, so the compute scales exactly; embedding and LM head are excluded, as
  they are the same both ways. Videos of more than ``--prefill-max-tokens`` tokens are clustered and
  timed, but their prefill is not run (minutes per layer, gigabytes of attention scores on the CPU);
  for every row the analytic prefill FLOPs (:class:`tokenreduce.core.flops.Geometry`) give the saving too.

Geometries: LLaVA-OneVision-0.5B (SigLIP 27x27 = 729 tokens per frame, Qwen2-0.5B LM of 24 layers, width
896) at a few frame counts, and the synthetic benchmark's tiny video model (16 frames x 6x6 tokens, its LM
geometry read from :data:`tokenreduce.eval.synthetic.models.TEXT`). Results go to ``benchmarks/results/vqtoken_<device>.json`` and ``.csv``.

On a GPU the tokens, the assignment and the decoder live on the device (decoder in bf16, every prefill
run at full depth). ``--kmeans`` picks where the k-means runs (``kmeans`` in the output says where it
ran): ``auto`` is FAISS for CPU tokens and with faiss-gpu, Lloyd's iterations in torch for GPU tokens
otherwise; ``faiss`` on a GPU without faiss-gpu clusters host copies with faiss-cpu.

    python benchmarks/vqtoken.py                 # CPU
    python benchmarks/vqtoken.py --device cuda   # GPU
    python benchmarks/vqtoken.py --quick         # small frame counts, for a smoke run
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
from pathlib import Path

import torch

from tokenreduce.eval.bench import median_ms
from tokenreduce.eval.synthetic.models import TEXT

RESULTS = Path(__file__).parent / "results"

# (name, tokens per frame side, width, LM layers, heads, kv heads, intermediate, frame counts)
GEOMETRIES = {
    "llava-onevision-0.5b": dict(side=27, dim=896, layers=24, heads=14, kv_heads=2, intermediate=4864),
    "synthetic-video-tiny": dict(side=6, dim=TEXT["hidden_size"], layers=TEXT["num_hidden_layers"],
                                 heads=TEXT["num_attention_heads"], kv_heads=TEXT["num_key_value_heads"],
                                 intermediate=TEXT["intermediate_size"]),
}


def video_tokens(
    frames: int, side: int, dim: int, objects: int = 4, noise: float = 0.3, seed: int = 0
) -> torch.Tensor:
    """``[frames * side * side, dim]`` tokens: a static per-patch texture, ``objects`` moving objects,
    per-token noise."""
    g = torch.Generator().manual_seed(seed)
    texture = torch.randn(side * side, dim, generator=g)
    looks = torch.randn(objects, dim, generator=g) * 2.0
    x = texture.repeat(frames, 1).view(frames, side, side, dim).clone()
    size = max(1, side // 6)
    for j in range(objects):
        row = int(torch.randint(0, side - size + 1, (1,), generator=g))
        for t in range(frames):
            col = (j * side // max(1, objects) + t) % (side - size + 1)
            x[t, row : row + size, col : col + size] = looks[j]
    x = x.view(-1, dim)
    return x + noise * torch.randn(x.shape, generator=g)


def _decoder(geometry: dict, layers: int, device: str, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2Model

    config = Qwen2Config(
        hidden_size=geometry["dim"],
        intermediate_size=geometry["intermediate"],
        num_hidden_layers=layers,
        num_attention_heads=geometry["heads"],
        num_key_value_heads=geometry["kv_heads"],
        vocab_size=1000,
        max_position_embeddings=65536,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Qwen2Model(config).eval().to(device=device, dtype=dtype)


def prefill_ms(decoder, tokens: int, dim: int, repeats: int) -> float:
    x = torch.randn(1, tokens, dim).to(decoder.device, decoder.dtype)

    def run():
        with torch.no_grad():
            decoder(inputs_embeds=x, use_cache=False)

    return median_ms(run, repeats, device=str(decoder.device))


def method_ms(x: torch.Tensor, frames: int, side: int, k: int, repeats: int, kmeans: str) -> float:
    from tokenreduce.core.layout import Segment, TokenLayout
    from tokenreduce.core.reduction import ReduceContext
    from tokenreduce.plugins.vqtoken import VQTokenConfig, VQTokenMethod

    layout = TokenLayout("video", tuple(Segment("frame", side, side, time=t) for t in range(frames)))
    method = VQTokenMethod(VQTokenConfig(keep=k, kmeans=kmeans))
    ctx = ReduceContext(layout=layout, modality="video", row=0, item=0)
    return median_ms(lambda: method.reduce(x, ctx), repeats, device=x.device.type)


def run(
    quick: bool,
    repeats: int,
    adaptive_max_tokens: int,
    text_tokens: int,
    k: int,
    prefill_max_tokens: int,
    device: str = "cpu",
    kmeans: str = "auto",
) -> list[dict]:
    from tokenreduce import kernels
    from tokenreduce.core.flops import Geometry
    from tokenreduce.eval.bench import once_ms
    from tokenreduce.plugins.vqtoken.clustering import build_codebook, kmeans_backend, normalize

    cuda = device.startswith("cuda")

    frame_counts = {
        "llava-onevision-0.5b": (2, 4) if quick else (2, 4, 8, 16, 32),
        "synthetic-video-tiny": (16,),
    }
    rows = []
    for name, geometry in GEOMETRIES.items():
        side, dim, depth = geometry["side"], geometry["dim"], geometry["layers"]
        # where a full-depth prefill of the longest video stays quick (always on a GPU), run the whole decoder
        scaled = not cuda and side * side * max(frame_counts[name]) * depth > 20_000
        flops = Geometry(
            hidden=dim,
            heads=geometry["heads"],
            kv_heads=geometry["kv_heads"],
            head_dim=dim // geometry["heads"],
            intermediate=geometry["intermediate"],
            layers=depth,
        )
        decoder = _decoder(geometry, 1 if scaled else depth, device, torch.bfloat16 if cuda else torch.float32)
        factor = depth if scaled else 1
        for frames in frame_counts[name]:
            x = video_tokens(frames, side, dim).to(device)
            n = x.shape[0]
            row = {
                "geometry": name,
                "frames": frames,
                "visual_tokens": n,
                "dim": dim,
                "k": k,
                "text_tokens": text_tokens,
                "llm_layers": depth,
                "prefill_scaled": scaled,
                "kmeans": kmeans_backend(x, kmeans),
            }
            book = build_codebook(x, k, kmeans=kmeans)
            row["codes_used"] = int(torch.unique(book.codes).numel())
            row["build_ms"] = median_ms(lambda x=x: build_codebook(x, k, kmeans=kmeans), repeats, device=device)
            unit, centroids = normalize(x), book.centroids
            row["assign_ms"] = median_ms(
                lambda u=unit, c=centroids: kernels.codebook_assign(u, c, "cosine"), repeats, device=device
            )
            row["method_ms"] = method_ms(x, frames, side, k, repeats, kmeans)
            if n <= adaptive_max_tokens:
                found = {}

                def adaptive(x=x, found=found):
                    found["book"] = build_codebook(x, None, adaptive="elbow", k_min=12, k_max=32, kmeans=kmeans)

                row["adaptive_build_ms"] = once_ms(adaptive, device)
                row["adaptive_k"] = found["book"].k
            row["prefill_tflops_full"] = flops.prefill_flops([n + text_tokens] * depth) / 1e12
            row["prefill_tflops_vq"] = flops.prefill_flops([row["codes_used"] + text_tokens] * depth) / 1e12
            if n <= prefill_max_tokens:
                row["prefill_full_ms"] = factor * prefill_ms(decoder, n + text_tokens, dim, repeats)
                row["prefill_vq_ms"] = factor * prefill_ms(
                    decoder, row["codes_used"] + text_tokens, dim, repeats
                )
                row["prefill_saved_ms"] = row["prefill_full_ms"] - row["prefill_vq_ms"]
                row["method_over_saved"] = row["method_ms"] / row["prefill_saved_ms"]
                row["net_speedup"] = row["prefill_full_ms"] / (row["prefill_vq_ms"] + row["method_ms"])
            rows.append(row)
            print(
                json.dumps({k2: round(v, 3) if isinstance(v, float) else v for k2, v in row.items()}),
                flush=True,
            )
        del decoder
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on shared cores)")
    parser.add_argument("--k", type=int, default=32, help="fixed codebook size")
    parser.add_argument("--text-tokens", type=int, default=40)
    parser.add_argument(
        "--adaptive-max-tokens",
        type=int,
        default=3000,
        help="run the adaptive (elbow) build only for videos up to this many tokens",
    )
    parser.add_argument(
        "--prefill-max-tokens",
        type=int,
        default=None,
        help="time the LLM prefill only for videos of up to this many visual tokens (default: 6000 on the "
        "CPU, all on a GPU)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--kmeans", default="auto", choices=["auto", "faiss", "torch"], help="where the k-means runs")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is visible; use --device cpu")
    torch.set_num_threads(args.threads)
    rows = run(
        args.quick,
        args.repeats,
        args.adaptive_max_tokens,
        args.text_tokens,
        args.k,
        args.prefill_max_tokens or (1 << 30 if args.device.startswith("cuda") else 6000),
        args.device,
        args.kmeans,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kind = args.device.split(":")[0]
    stem = f"vqtoken{'_quick' if args.quick else ''}{'' if args.kmeans == 'auto' else '_' + args.kmeans}_{kind}"
    meta = {
        "device": torch.cuda.get_device_name() if kind == "cuda" else "cpu",
        "threads": args.threads,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "processor": platform.processor(),
        "repeats": args.repeats,
        "note": "medians; prefill_scaled: one decoder layer timed x depth"
        + ("" if kind == "cuda" else "; shared CPU, read the ratios"),
    }
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with (out / f"{stem}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out / stem}.json and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
