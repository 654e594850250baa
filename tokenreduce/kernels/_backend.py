"""Which implementation of a kernel op runs: the Triton kernel or its pure-torch twin.

Order of precedence, read at every call:

1. :func:`use_backend` (a context manager, for tests and benchmarks);
2. the ``TOKENREDUCE_KERNELS`` environment variable: ``torch``, ``triton`` or ``auto`` (default);
3. ``auto``: Triton when every input is a CUDA tensor, Triton imports, and the dtype is one the kernels
   take (float16, bfloat16, float32); the torch twin otherwise.

Forcing ``triton`` never falls back silently: it raises when Triton is missing, when the tensors are on
the CPU and the Triton interpreter is off (``TRITON_INTERPRET=1`` must be set before Triton is imported;
that is how the tests run the kernels on CPU), when the dtype is unsupported, or when autograd would need
a backward the kernel does not have.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

ENV_VAR = "TOKENREDUCE_KERNELS"
BACKENDS = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INSTALL_HINT = "pip install 'tokenreduce[kernels]'"

_override: ContextVar[str | None] = ContextVar("tokenreduce_kernels_backend", default=None)


@functools.cache
def _triton_importable() -> bool:
    if "triton" in sys.modules:
        return sys.modules["triton"] is not None
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (it is not imported here)."""
    return _triton_importable()


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` asks Triton to run kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def _check_name(value: str, source: str) -> str:
    value = value.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {value!r}")
    return value


def requested_backend() -> str:
    """The backend asked for right now: ``use_backend`` if active, else ``$TOKENREDUCE_KERNELS``, else auto."""
    forced = _override.get()
    if forced is not None:
        return forced
    return _check_name(os.environ.get(ENV_VAR, "auto") or "auto", ENV_VAR)


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the kernel ops in this block on ``"torch"``, ``"triton"`` or ``"auto"``, overriding the env var."""
    token = _override.set(_check_name(name, "backend"))
    try:
        yield
    finally:
        _override.reset(token)


def select_backend(
    op: str, *tensors: torch.Tensor | None, differentiable: bool = False, dtypes: tuple = TRITON_DTYPES
) -> str:
    """``"triton"`` or ``"torch"`` for one call of ``op`` on ``tensors`` (``None`` entries are ignored).

    ``differentiable`` says whether the Triton path has a backward; when it has none and autograd needs
    one, auto picks torch and a forced Triton raises.
    """
    requested = requested_backend()
    if requested == "torch":
        return "torch"
    present = [t for t in tensors if t is not None]
    on_gpu = all(t.is_cuda for t in present)
    if requested == "auto" and not on_gpu:  # the common CPU call: nothing else to look at
        return "torch"
    dtype_ok = all(t.dtype in dtypes for t in present if t.is_floating_point())
    needs_grad = (
        not differentiable and torch.is_grad_enabled() and any(t.requires_grad for t in present)
    )
    if requested == "auto":
        return "triton" if on_gpu and dtype_ok and not needs_grad and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError(
            f"tokenreduce.kernels.{op}: the Triton backend was forced ({ENV_VAR}=triton or use_backend) "
            f"but Triton is not installed; install the extra with `{INSTALL_HINT}` or use the torch backend"
        )
    if not on_gpu and not interpreter_enabled():
        raise RuntimeError(
            f"tokenreduce.kernels.{op}: the Triton backend needs CUDA tensors; to run the kernels on CPU "
            "tensors set TRITON_INTERPRET=1 before Triton is first imported"
        )
    if not dtype_ok:
        got = sorted({str(t.dtype) for t in present if t.is_floating_point()})
        raise RuntimeError(f"tokenreduce.kernels.{op}: the Triton kernels take {dtypes}, got {got}")
    if needs_grad:
        raise RuntimeError(
            f"tokenreduce.kernels.{op}: the Triton kernel has no backward; call it under torch.no_grad() "
            "or use the torch backend"
        )
    return "triton"


def check_tensor(op: str, name: str, t: torch.Tensor, ndim: int, floating: bool = True) -> None:
    """Raise a ``ValueError`` naming ``op`` and ``name`` unless ``t`` has ``ndim`` dims (and a float dtype)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{op}: `{name}` must have {ndim} dims, got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise ValueError(f"{op}: `{name}` must be a floating tensor, got {t.dtype}")


def check_mask(
    op: str, name: str, mask: torch.Tensor | None, shape: tuple[int, ...], device: torch.device
) -> None:
    """Raise unless ``mask`` is ``None`` or a boolean tensor of ``shape`` on ``device`` (the data's: a
    kernel cannot read a host mask for device data)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"{op}: `{name}` must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{op}: `{name}` must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{op}: `{name}` is on {mask.device} but the data is on {device}; move it there")


def check_finite(op: str, name: str, t: torch.Tensor) -> None:
    """Raise when ``t`` holds NaN or inf. Costs one host sync; used by ops that return indices.

    Checks ``aminmax`` (NaN propagates into both, an inf shows as an extreme): one reduction pass without
    the bool tensor ``isfinite`` would allocate, about 20x cheaper on CPU.
    """
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)
    if not bool(torch.stack([lo, hi]).isfinite().all()):
        raise ValueError(f"{op}: `{name}` holds NaN or inf values; there is no meaningful index to return")
