"""Counting the ops that make the host wait for the device, on any device (the CPU included).

On a GPU, an op whose result size or value the host must know (``.item()``, ``nonzero``, a boolean-mask
index, ``.tolist()``...) blocks Python until every kernel queued before it has run: the host can no longer
run ahead of the device, and a small model's forward becomes as slow as its launch overhead.
``torch.cuda.set_sync_debug_mode`` only sees them on a GPU; this counter sees the same ops on the CPU, at
the torch level, so tests can pin how many a wrapped forward adds::

    with SyncCounter() as syncs:
        model(**batch)
    syncs.count, syncs.by_op()

Two interception layers: a ``TorchDispatchMode`` sees the aten ops (``_local_scalar_dense`` behind
``.item()`` / ``int()`` / ``bool()`` / ``float()``, ``nonzero``, ``masked_select``, ``unique*``,
``repeat_interleave`` without ``output_size``, ``bincount``, ``equal``, indexing with a boolean mask),
and a ``TorchFunctionMode`` sees the Python-level reads that dispatch nothing on a CPU tensor
(``.tolist()``, ``.cpu()``, ``.numpy()``). Counts are strict: an op on a tensor that would stay on the
host on a GPU counts too. Code that deliberately reads host-only tensors (layouts built from Python ints)
marks the block with :func:`~tokenreduce.core.hostsync.host_only`; the GPU check under
``set_sync_debug_mode`` is what confirms such a block touches no device tensor.
"""

from __future__ import annotations

import os
import traceback
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from tokenreduce.core.hostsync import HOST_ONLY, host_only

__all__ = ["SyncCounter", "SyncEvent", "classify", "count_syncs", "host_only"]

aten = torch.ops.aten

# aten ops that always need the host to read device memory (result value or size).
_ALWAYS = {
    aten._local_scalar_dense.default: "item",
    aten.nonzero.default: "nonzero",
    aten.nonzero.out: "nonzero",
    aten.masked_select.default: "masked_select",
    aten.equal.default: "equal",
    aten.bincount.default: "bincount",
}
_UNIQUE_PREFIXES = ("unique", "_unique")
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_REPEAT = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
_HOST_READS = {"tolist", "cpu", "numpy"}

@dataclass
class SyncEvent:
    """One counted op: its name and the first frame outside torch / this module that issued it."""

    op: str
    where: str


def _caller() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    for frame in reversed(traceback.extract_stack(limit=40)[:-3]):
        path = os.path.abspath(frame.filename)
        if "/torch/" in path or path.startswith(here):
            continue
        inside = path.startswith(os.getcwd() + os.sep)
        return f"{os.path.relpath(path) if inside else os.path.basename(path)}:{frame.lineno}"
    return "?"


def _is_bool_index(indices) -> bool:
    return any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in (indices or ()) if i is not None)


def classify(func, args, kwargs) -> str | None:
    """The sync an aten op implies (a short name), or ``None`` when it lets the host run ahead."""
    if func in _ALWAYS:
        return _ALWAYS[func]
    name = func._schema.name.split("::")[-1]
    if name.startswith(_UNIQUE_PREFIXES):
        return "unique"
    if func in _INDEX_OPS and _is_bool_index(args[1] if len(args) > 1 else kwargs.get("indices")):
        return "bool_index"
    if func in _REPEAT:
        output_size = kwargs.get("output_size", args[3] if len(args) > 3 else None)
        if output_size is None:
            return "repeat_interleave"
    return None


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = classify(func, args, kwargs)
        if kind is not None:
            self.counter._record(kind)
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _HOST_READS and args and torch.is_tensor(args[0]) and getattr(func, "__self__", None) is None:
            self.counter._record(name)
        return func(*args, **(kwargs or {}))


@dataclass
class SyncCounter:
    """Context manager counting host-device sync points of the ops run inside it (see the module doc).

    Attributes:
        events: every counted op, in order, with the line that issued it.
        trace: record the issuing line (slower); counts are the same either way.
    """

    trace: bool = True
    events: list[SyncEvent] = field(default_factory=list)

    def _record(self, op: str) -> None:
        if HOST_ONLY.get():
            return
        self.events.append(SyncEvent(op, _caller() if self.trace else ""))

    @property
    def count(self) -> int:
        return len(self.events)

    def by_op(self) -> Counter:
        return Counter(e.op for e in self.events)

    def by_line(self) -> Counter:
        return Counter(f"{e.op} @ {e.where}" for e in self.events)

    def __enter__(self) -> SyncCounter:
        self.events.clear()
        self._modes = [_Function(self), _Dispatch(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def count_syncs(fn, *args, trace: bool = False, **kwargs) -> tuple[int, SyncCounter]:
    """Run ``fn(*args, **kwargs)`` under a :class:`SyncCounter`; return the count and the counter."""
    with SyncCounter(trace=trace) as counter:
        fn(*args, **kwargs)
    return counter.count, counter
