"""Backend choice: env var, use_backend, auto rules, and the errors when Triton cannot run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import tokenreduce.kernels as K
from tokenreduce.kernels import _backend
from tokenreduce.kernels.similarity import naive as sim_naive

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def calls(monkeypatch):
    """Records calls reaching the torch twin of pairwise_similarity."""
    seen = []
    real = sim_naive.pairwise_similarity

    def spy(*args, **kwargs):
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sim_naive, "pairwise_similarity", spy)
    return seen


def _fake_cuda(dtype=torch.float16, requires_grad=False):
    return SimpleNamespace(is_cuda=True, dtype=dtype, requires_grad=requires_grad, is_floating_point=lambda: True)


def test_cpu_default_is_torch(monkeypatch, calls):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert K.requested_backend() == "auto"
    assert K.select_backend("op", torch.randn(2)) == "torch"
    K.pairwise_similarity(torch.randn(1, 4, 3))
    assert calls == [1]


def test_auto_picks_triton_for_cuda_tensors(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.setattr(_backend, "triton_available", lambda: True)
    assert K.select_backend("op", _fake_cuda()) == "triton"
    assert K.select_backend("op", _fake_cuda(torch.float64)) == "torch"  # dtype the kernels do not take
    assert K.select_backend("op", _fake_cuda(requires_grad=True)) == "torch"  # needs a backward
    assert K.select_backend("op", _fake_cuda(requires_grad=True), differentiable=True) == "triton"
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    assert K.select_backend("op", _fake_cuda()) == "torch"


def test_env_var_forces_backend_at_call_time(monkeypatch, calls):
    x = torch.randn(1, 4, 3)
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    if K.triton_available() and K.interpreter_enabled():
        K.pairwise_similarity(x)
        assert calls == []
    monkeypatch.setenv(_backend.ENV_VAR, "torch")
    K.pairwise_similarity(x)
    assert calls == [1]
    monkeypatch.setenv(_backend.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="TOKENREDUCE_KERNELS"):
        K.pairwise_similarity(x)


def test_use_backend_overrides_env_and_nests(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    with K.use_backend("torch"):
        assert K.requested_backend() == "torch"
        with K.use_backend("auto"):
            assert K.requested_backend() == "auto"
        assert K.requested_backend() == "torch"
    assert K.requested_backend() == "triton"
    with pytest.raises(ValueError, match="backend"), K.use_backend("numpy"):
        pass


def test_forced_triton_without_triton_names_the_extra(monkeypatch):
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    with K.use_backend("triton"), pytest.raises(RuntimeError, match=r"tokenreduce\[kernels\]"):
        K.pairwise_similarity(torch.randn(1, 4, 3))


def test_forced_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(_backend, "triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with K.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.token_entropy(torch.randn(2, 5))


def test_forced_triton_refuses_float64_and_missing_backward(monkeypatch):
    monkeypatch.setattr(_backend, "triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with K.use_backend("triton"):
        with pytest.raises(RuntimeError, match="float64"):
            K.pairwise_similarity(torch.randn(1, 4, 3, dtype=torch.float64))
        with pytest.raises(RuntimeError, match="no backward"):
            K.pairwise_similarity(torch.randn(1, 4, 3, requires_grad=True))
        with torch.no_grad():  # without autograd the same call is fine
            assert K.select_backend("pairwise_similarity", torch.randn(1, 4, 3, requires_grad=True)) == "triton"


def test_import_and_cpu_path_work_without_triton():
    # A fresh interpreter where `import triton` fails: tokenreduce and the torch paths must still work,
    # and forcing Triton must say how to get it.
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None
        import torch, tokenreduce, tokenreduce.kernels as K
        assert not K.triton_available()
        x = torch.randn(2, 5, 3)
        K.pairwise_similarity(x); K.neighbor_count(x, 0.1); K.topk_select(x[..., 0], 2)
        K.token_entropy(x).sum()
        try:
            with K.use_backend("triton"):
                K.pairwise_similarity(x)
        except RuntimeError as err:
            assert "tokenreduce[kernels]" in str(err), err
        else:
            raise AssertionError("forcing triton without triton must raise")
        assert sys.modules["triton"] is None
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENREDUCE_KERNELS": "auto"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_grid_limit_is_reported(device):
    from tokenreduce.kernels.attention import triton as att

    # 70000 batch rows exceed CUDA's 65535 programs on grid axis 2: a clear error, before any launch.
    q, k = torch.empty(70000, 1, 1, 16), torch.empty(70000, 1, 1, 16)
    with pytest.raises(ValueError, match="65535"):
        att.attention_importance(q, k, scale=1.0)
