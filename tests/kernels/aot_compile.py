"""Compile every Triton kernel for a GPU target without a GPU (``python -m tests.kernels.aot_compile``).

The interpreter runs the kernels' logic on CPU but checks none of what only a GPU compile checks:
``tl.dot`` operand shapes, layouts, loop-carried types, shared-memory use. This script runs each
launcher with the block sizes it picks for CUDA tensors (``FORCE_GPU_CONFIG``), intercepts the launches,
and compiles each distinct kernel specialisation to a cubin for sm_90 with Triton's bundled ``ptxas``,
printing registers, spills and shared memory. It must run WITHOUT ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import torch

TARGET_ARCH = 90
SMEM_LIMIT = 232448  # bytes of shared memory per block on sm_90

_TYPES = {
    torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
    torch.int64: "*i64", torch.int32: "*i32", torch.uint8: "*u8", torch.bool: "*i1",
}


def _arg_type(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def capture_launches() -> list[tuple]:
    """Run every launcher on CPU tensors with GPU block sizes; return the distinct launches."""
    from tokenreduce.kernels import _triton_utils as tu
    from tokenreduce.kernels.attention import triton as att
    from tokenreduce.kernels.codebook import triton as cb
    from tokenreduce.kernels.entropy import triton as ent
    from tokenreduce.kernels.matching import triton as mt
    from tokenreduce.kernels.select import triton as sel
    from tokenreduce.kernels.similarity import triton as sim

    seen: dict[tuple, tuple] = {}

    def hook(kernel, grid, args, constexprs, num_warps, num_stages):
        names = kernel.arg_names
        runtime = [n for n, p in zip(names, kernel.params) if not p.is_constexpr]
        signature = dict(zip(runtime, (_arg_type(a) for a in args)))
        for n, p in zip(names, kernel.params):
            if p.is_constexpr:
                signature[n] = "constexpr"
        key = (kernel.fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())),
               num_warps, num_stages)
        seen.setdefault(key, (kernel, signature, dict(constexprs), num_warps, num_stages))

    tu.LAUNCH_HOOK, tu.FORCE_GPU_CONFIG = hook, True
    try:
        e = torch.empty
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            x, y = e(2, 577, 1024, dtype=dt), e(2, 64, 1024, dtype=dt)
            mask = torch.ones(2, 577, dtype=torch.bool)
            for metric in ("cosine", "correlation"):
                sim.pairwise_similarity(x, y, metric=metric, mask=mask, y_mask=torch.ones(2, 64, dtype=torch.bool))
                sim.pairwise_similarity(x, metric=metric)
                sim.neighbor_count(x, 0.5, mask=mask, metric=metric)
            q, k = e(1, 32, 40, 128, dtype=dt), e(1, 8, 640, 128, dtype=dt)
            att.attention_importance(q, k, scale=0.1, key_mask=torch.ones(1, 640, dtype=torch.bool))
            att.attention_importance(q[:, :, :1], k, scale=0.1)
            for metric in ("l2", "cosine"):
                cb.codebook_assign(e(11664, 1152, dtype=dt), e(32, 1152, dtype=dt), metric)
            mt.bipartite_matching(x, torch.zeros(2, 577, dtype=torch.bool))
            mt.bipartite_matching(x, None)
            scores = e(2, 2880, dtype=dt)
            sel.topk_select(scores, torch.tensor([100, 200]), torch.ones(2, 2880, dtype=torch.bool), 200)
            sel.topk_select(scores, torch.tensor([100, 200]), None, 200)
            sel.threshold_select(scores, torch.zeros(2), None)
            logits = e(4, 152064, dtype=dt)
            _, lse, mz = ent.entropy_forward(logits, 1.0)
            ent.entropy_backward(logits, e(4), lse, mz, 1.0)
            ent.entropy_forward(e(64, 152064, dtype=dt), 1.0)
            ent.window_entropy(e(4, 300, dtype=dt), 4, torch.ones(4, 300, dtype=torch.bool), "next")
    finally:
        tu.LAUNCH_HOOK, tu.FORCE_GPU_CONFIG = None, False
    return list(seen.values())


def _ptxas_stats(ptx: str) -> str:
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{TARGET_ARCH}a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores", out)
    return f"regs={regs.group(1) if regs else '?'} spill_stores={spills.group(1) if spills else '?'}"


def main(argv: list[str] | None = None) -> int:
    """Compile the captured launches; ``--one-per-kernel`` keeps the first specialisation of each kernel."""
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the kernels must be real JIT functions to compile", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", TARGET_ARCH, 32)
    failures = 0
    launches = capture_launches()
    if "--one-per-kernel" in argv:
        firsts: dict[str, tuple] = {}
        for launch in launches:
            firsts.setdefault(launch[0].fn.__name__, launch)
        launches = list(firsts.values())
    for kernel, signature, constexprs, num_warps, num_stages in launches:
        label = f"{kernel.fn.__name__} {constexprs} warps={num_warps} stages={num_stages}"
        try:
            src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            compiled = triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
            shared = compiled.metadata.shared
            if shared > SMEM_LIMIT:
                raise RuntimeError(f"uses {shared} bytes of shared memory > {SMEM_LIMIT}")
            print(f"ok   {label} shared={shared} {_ptxas_stats(compiled.asm['ptx'])}")
        except Exception as exc:  # report every failing kernel, not just the first
            failures += 1
            print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[:2000]}")
    print(f"{len(launches) - failures}/{len(launches)} kernel specialisations compiled for sm_{TARGET_ARCH}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
