"""Every Triton kernel compiles for sm_90 with the block sizes its launcher picks for a GPU.

The interpreter checks the kernels' arithmetic but not what only the GPU compiler sees (``tl.dot``
operand shapes, layouts, loop-carried types, shared memory). One specialisation per kernel is compiled
here, in a subprocess without ``TRITON_INTERPRET``; ``python -m tests.kernels.aot_compile`` compiles all
of them and prints registers and spills.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenreduce.kernels import triton_available

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_compile_for_sm90():
    if not triton_available():
        pytest.skip("Triton is not installed")
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton build has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-m", "tests.kernels.aot_compile", "--one-per-kernel"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "FAIL" not in out.stdout
    assert "compiled for sm_90" in out.stdout
