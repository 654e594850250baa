"""Time every tokenreduce kernel op against its torch twin at the shapes the methods use.

    python benchmarks/kernels.py            # all shapes; CSV in benchmarks/results/kernels_<device>.csv
    python benchmarks/kernels.py --quick    # one small shape per op, few repeats: a smoke run

Each case runs through the public dispatch (``tokenreduce.kernels``) under ``use_backend("torch")`` and,
on a CUDA device with Triton installed, ``use_backend("triton")``. Timing: warm-up calls (they also
compile the Triton kernels), then the median of repeated calls, each bracketed by CUDA events after a
synchronisation on GPU, or by ``perf_counter`` on CPU. On GPU each row also gets the achieved GB/s and
TFLOP/s and the op's roofline bound: the time the minimum traffic (inputs read once, outputs written
once) or the useful FLOPs would take at the device's peak, whichever is longer; ``pct_of_bound`` is how
close the measured time is to it. Without a GPU only the torch twins are timed: the Triton interpreter
runs kernels on CPU for testing and says nothing about speed.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tokenreduce.kernels as K

RESULTS = Path(__file__).resolve().parent / "results"

# Peak HBM bandwidth (bytes/s) and dense peak FLOP/s: tensor-core fp16/bf16, and plain fp32 (the
# kernels run fp32 inputs as IEEE fp32, not TF32). Matched against the device name; unknown devices get
# achieved numbers but no bound.
PEAKS = {
    "H200": (4.8e12, 989e12, 67e12),
    "H100": (3.35e12, 989e12, 67e12),
    "A100": (2.0e12, 312e12, 19.5e12),
    "L40S": (0.864e12, 362e12, 91.6e12),
    "L4": (0.3e12, 121e12, 30.3e12),
}


@dataclass
class Case:
    """One op at one shape: ``run`` calls the public op; ``nbytes`` / ``flops`` are its minimum work."""

    op: str
    shape: str
    dtype: torch.dtype
    run: Callable[[], object]
    nbytes: float
    flops: float = 0.0


def _size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def build_cases(device: str, quick: bool) -> list[Case]:
    """The benchmark table; ``quick`` keeps the first (smallest) shape of each op."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    half = torch.bfloat16 if device == "cuda" else torch.float32
    cases: list[Case] = []

    def add(op: str, shape: str, dtype: torch.dtype, run: Callable[[], object], nbytes: float, flops: float = 0.0):
        if quick and any(c.op == op for c in cases):
            return
        cases.append(Case(op, shape, dtype, run, nbytes, flops))

    for n, d in ((576, 1024), (2880, 4096)):
        x = randn(1, n, d, dtype=half)
        s = _size(half)
        add("pairwise_similarity", f"B1-N{n}-D{d}", half, lambda x=x: K.pairwise_similarity(x),
            n * d * s + n * n * 4, 2.0 * n * n * d)
        add("pairwise_similarity[correlation]", f"B1-N{n}-D{d}", half,
            lambda x=x: K.pairwise_similarity(x, metric="correlation"), n * d * s + n * n * 4, 2.0 * n * n * d)
        add("neighbor_count", f"B1-N{n}-D{d}", half, lambda x=x: K.neighbor_count(x, 0.5),
            n * d * s + n * 8, 2.0 * n * n * d)

    hq, hkv, s_len, d = 32, 8, 640, 128
    k = randn(1, hkv, s_len, d, dtype=half)
    for q_len in (1, 8, 40):
        q = randn(1, hq, q_len, d, dtype=half)
        add("attention_importance", f"B1-Hq{hq}-Hkv{hkv}-Q{q_len}-S{s_len}-D{d}", half,
            lambda q=q: K.attention_importance(q, k),
            (q.numel() + k.numel()) * _size(half) + s_len * 4, 2.0 * hq * q_len * s_len * d)
    for n, h, d in ((577, 16, 64), (2305, 16, 64)):
        q_cls, kk = randn(4, h, d, dtype=half), randn(4, h, n, d, dtype=half)
        add("cls_attention", f"B4-H{h}-N{n}-D{d}", half, lambda q_cls=q_cls, kk=kk: K.cls_attention(q_cls, kk),
            (q_cls.numel() + kk.numel()) * _size(half) + 4 * n * 4, 2.0 * 4 * h * n * d)

    for b, n in ((8, 576), (8, 2880), (1, 11664)):
        scores = randn(b, n, dtype=torch.float32)
        budget = torch.full((b,), n // 4, device=device)
        add("topk_select", f"B{b}-N{n}-k{n // 4}", torch.float32, lambda s=scores, kb=budget: K.topk_select(s, kb),
            b * n * 4 + b * n + b * (n // 4) * 8)
        add("threshold_select", f"B{b}-N{n}", torch.float32, lambda s=scores: K.threshold_select(s, 0.67),
            b * n * 4 + b * n + b * n * 8)

    for frames, tokens, d, kk in ((1, 729, 1152, 32), (16, 729, 1152, 32), (16, 729, 1152, 1024)):
        x, cb = randn(frames, tokens, d, dtype=half), randn(kk, d, dtype=half)
        for metric in ("l2", "cosine"):
            add(f"codebook_assign[{metric}]", f"F{frames}-N{tokens}-D{d}-K{kk}", half,
                lambda x=x, cb=cb, m=metric: K.codebook_assign(x, cb, m),
                (x.numel() + cb.numel()) * _size(half) + frames * tokens * 12, 2.0 * frames * tokens * kk * d)

    for b, n, d in ((1, 577, 64), (16, 729, 1152)):
        metric = randn(b, n, d, dtype=half)
        na, nb = (n + 1) // 2, n // 2
        add("bipartite_matching", f"B{b}-N{n}-D{d}", half, lambda m=metric: K.bipartite_matching(m, protect_first=True),
            metric.numel() * _size(half) + b * na * 12, 2.0 * b * na * nb * d)

    vocab = 152064
    for rows in (1, 8, 64):
        logits = randn(rows, vocab, dtype=half)
        add("token_entropy", f"R{rows}-V{vocab}", half, lambda z=logits: K.token_entropy(z),
            logits.numel() * _size(half) + rows * 4)
    logits = randn(64, vocab, dtype=half).requires_grad_()
    add("token_entropy[fwd+bwd]", f"R64-V{vocab}", half, lambda z=logits: K.token_entropy(z).sum().backward(),
        3 * logits.numel() * _size(half))
    ent = randn(8, 4096, dtype=torch.float32).abs()
    for mode in ("forward", "next"):
        add(f"window_entropy[{mode}]", "B8-T4096-w4", torch.float32,
            lambda e=ent, m=mode: K.window_entropy(e, 4, mode=m), 2 * ent.numel() * 4)
    return cases


def time_ms(fn: Callable[[], object], cuda: bool, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def _bound_ms(name: str, case: Case) -> float | None:
    peaks = next((p for key, p in PEAKS.items() if key in name.upper()), None)
    if peaks is None:
        return None
    bandwidth, half_flops, fp32_flops = peaks
    flops = fp32_flops if case.dtype == torch.float32 else half_flops
    return max(case.nbytes / bandwidth, case.flops / flops) * 1e3


def triton_skip_reason(device: str) -> str | None:
    if device != "cuda":
        return "no CUDA device: the Triton interpreter is for tests, not a speed measurement"
    if not K.triton_available():
        return f"Triton is not installed ({K._backend.INSTALL_HINT})"
    if K.interpreter_enabled():
        return "TRITON_INTERPRET is set: unset it to time the compiled kernels"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape per op, few repeats (smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 20, quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3, quick 1)")
    parser.add_argument("--ops", default="", help="only ops whose name contains one of these, comma separated")
    parser.add_argument("--out", type=Path, default=None, help="CSV path (default results/kernels_<device>.csv)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine more threads mostly spin-wait)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 20)
    warmup = args.warmup or (1 if args.quick else 3)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = device_name(device)
    if device == "cpu":
        torch.set_num_threads(args.threads)
        name = f"{name}, {args.threads} torch thread{'s' if args.threads > 1 else ''}"
    backends = ["torch"]
    reason = triton_skip_reason(device)
    if reason is None:
        backends.append("triton")
    else:
        print(f"skipping the Triton kernels: {reason}")

    cases = build_cases(device, args.quick)
    if args.ops:
        wanted = [w.strip() for w in args.ops.split(",") if w.strip()]
        cases = [c for c in cases if any(w in c.op for w in wanted)]
    slug = "cpu" if device == "cpu" else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = args.out or RESULTS / f"kernels_{slug}{'_quick' if args.quick else ''}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)

    fields = ["device", "op", "shape", "dtype", "backend", "ms", "gbps", "tflops", "bound_ms", "pct_of_bound"]
    rows = []
    print(f"{'op':34s} {'shape':34s} {'backend':7s} {'ms':>10s} {'GB/s':>8s} {'TFLOP/s':>8s} {'%bound':>7s}")
    for case in cases:
        for backend in backends:
            with K.use_backend(backend):
                ms = time_ms(case.run, device == "cuda", warmup, repeats)
            bound = _bound_ms(name, case) if device == "cuda" else None
            row = {
                "device": name, "op": case.op, "shape": case.shape, "dtype": str(case.dtype).replace("torch.", ""),
                "backend": backend, "ms": f"{ms:.4f}", "gbps": f"{case.nbytes / ms / 1e6:.2f}",
                "tflops": f"{case.flops / ms / 1e9:.4f}" if case.flops else "",
                "bound_ms": f"{bound:.4f}" if bound is not None else "",
                "pct_of_bound": f"{100 * bound / ms:.1f}" if bound is not None else "",
            }
            rows.append(row)
            print(f"{case.op:34s} {case.shape:34s} {backend:7s} {ms:10.3f} {row['gbps']:>8s} "
                  f"{row['tflops'] or '-':>8s} {row['pct_of_bound'] or '-':>7s}", flush=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
