"""The GPU checks of issue 29, in one process per step, results to files (run by ``benchmarks/gpu_check.sh``).

Steps (``--steps``, default all):

* ``syncs``: every fixed-budget method and ATP on the tiny models of three families, on the GPU: sync
  points of one prefill under ``torch.cuda.set_sync_debug_mode("warn")`` (what CUDA itself reports),
  wrapped and unwrapped, and the CPU-side :class:`~tokenreduce.testing.syncs.SyncCounter` count of the
  same call -> ``syncs.json``.
* ``codebook``: VQToken's spherical k-means on one video's tokens with faiss-gpu (the ``vq-gpu`` extra)
  against the torch k-means on the GPU: time and agreement (inertia of each) -> ``codebook.json``.

The kernels and the 7B bench are run by the shell script (pytest, ``tokenreduce bench``). ``--cpu`` runs
the same steps on the CPU (no debug mode, faiss-cpu), to check the script itself where no GPU is lent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

FAMILIES = ("llava", "llava_onevision", "qwen2_5_vl")
METHODS = ("random", "pool", "divprune", "tome_projector", "fastv", "pdrop", "atp")


def sync_step(device: str, out: Path) -> None:
    import tokenreduce as tr
    from tokenreduce.core.registry import get_method
    from tokenreduce.testing.syncs import SyncCounter
    from tokenreduce.testing.tiny import default_rows, tiny_batch, tiny_model

    def count(model, batch) -> dict:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")
            try:
                with SyncCounter() as counter, torch.no_grad():
                    model(**batch)
            finally:
                if device == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        cuda = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
        return {"cuda_syncs": len(cuda), "counter": counter.count, "counter_lines": dict(counter.by_line())}

    rows = []
    for family in FAMILIES:
        model = tiny_model(family, num_layers=8).to(device)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in tiny_batch(model, default_rows(family, n=1)).items()}
        base = count(model, batch)
        for method in METHODS:
            spec = get_method(method)
            if spec.families is not None and family not in spec.families:
                continue
            tr.wrap(model, spec.config_cls.at_budget(0.25, num_layers=8))
            try:
                got = count(model, batch)
            finally:
                tr.unwrap(model)
            row = {"family": family, "method": method, "added_cuda_syncs": got["cuda_syncs"] - base["cuda_syncs"],
                   "added_counter": got["counter"] - base["counter"], "lines": got["counter_lines"]}
            rows.append(row)
            print(f"{family:16} {method:15} cuda syncs {row['added_cuda_syncs']:+d}  counter {row['added_counter']:+d}",
                  flush=True)
    (out / "syncs.json").write_text(json.dumps(rows, indent=2) + "\n")


def codebook_step(device: str, out: Path) -> None:
    from tokenreduce.plugins.vqtoken.clustering import import_faiss, spherical_kmeans

    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(8 * 196, 896), dim=-1).to(device)  # one video, 8 frames
    result = {"device": device, "tokens": x.shape[0]}
    backends = ["torch"]
    try:
        faiss = import_faiss()
        result["faiss_gpus"] = int(getattr(faiss, "get_num_gpus", lambda: 0)())
        backends.insert(0, "faiss")
    except (ImportError, OSError) as error:  # faiss-gpu's CUDA 12 libraries may be missing on the machine
        result["faiss"] = f"unavailable: {error}"
        print(result["faiss"], flush=True)
    for backend in backends:
        times, centroids = [], None
        for _ in range(4):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            centroids = spherical_kmeans(x, 32, generator=torch.Generator().manual_seed(0), kmeans=backend)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        cos = (x.float() @ centroids.to(x.device).float().T).max(dim=1).values
        result[backend] = {"ms_median": statistics.median(times[1:]), "mean_best_cosine": float(cos.mean())}
        print(backend, result[backend], flush=True)
    (out / "codebook.json").write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (checks the script, not the GPU)")
    parser.add_argument("--steps", nargs="+", default=["syncs", "codebook"], choices=["syncs", "codebook"])
    args = parser.parse_args(argv)
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; pass --cpu to check the script on the CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    for step in args.steps:
        {"syncs": sync_step, "codebook": codebook_step}[step](device, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
