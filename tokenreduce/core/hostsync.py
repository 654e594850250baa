"""Checks and reads that must not make the host wait for the device on the hot path.

:func:`host_only` marks a block that reads host-resident values only (what
:class:`tokenreduce.testing.syncs.SyncCounter` then leaves out); :func:`require` is a value check that
runs on the device on an accelerator, and on the host where the value already is.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar

import torch

HOST_ONLY: ContextVar[bool] = ContextVar("tokenreduce_host_only", default=False)


@contextmanager
def host_only():
    """Mark a block that reads host-resident tensors only (CPU tensors on a CPU run, layout tables built
    from Python ints): on a GPU such reads are no syncs, so the sync counter does not count them. The GPU
    check (``benchmarks/gpu_check.sh``, under ``torch.cuda.set_sync_debug_mode``) confirms it there."""
    token = HOST_ONLY.set(True)
    try:
        yield
    finally:
        HOST_ONLY.reset(token)


def require(ok: torch.Tensor, message: Callable[[], str], error: type[Exception] = ValueError) -> None:
    """Raise ``error(message())`` unless the 0-dim bool ``ok`` holds.

    On an accelerator the check is queued on the device (``torch._assert_async``), so the host never
    waits for it; a failure then surfaces at the next sync, without the counts of the message. On the
    CPU the value is already on the host: reading it waits for nothing.
    """
    if ok.device.type == "cpu":
        with host_only():
            if not bool(ok):
                raise error(message())
    else:
        torch._assert_async(ok, "tokenreduce: a check on the visual tokens failed (run on the CPU for details)")
