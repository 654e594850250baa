"""Honest per-batch measurements around ``generate``: TTFT, decode steps, peak memory, KV-cache bytes.

Clocks are read after a CUDA synchronise; the time to first token covers everything ``generate`` does
before the first new token exists (vision encoder, reducer, prefill); decode latency is the median of
the per-step times. Peak memory is CUDA's ``max_memory_allocated`` on a GPU and the process's peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) on the CPU.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class StepClock:
    """A ``generate`` streamer that timestamps the prompt and every new token (synchronising CUDA)."""

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self.times: list[float] = []

    def _now(self) -> float:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> float:
        self.times = []
        self.t0 = self._now()
        return self.t0

    def put(self, value: Any) -> None:
        self.times.append(self._now())

    def end(self) -> None:
        pass

    @property
    def ttft_ms(self) -> float | None:
        """From the start of ``generate`` to the first new token (``times[0]`` is the prompt)."""
        return (self.times[1] - self.t0) * 1e3 if len(self.times) > 1 else None

    @property
    def step_ms(self) -> list[float]:
        """Durations of the decode steps after the first token."""
        return [(b - a) * 1e3 for a, b in zip(self.times[1:], self.times[2:])]


def _read_status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_memory(device: torch.device) -> str:
    """Start a new peak-memory window; returns how peak memory is measured on ``device``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda_max_allocated"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return "cpu_peak_rss"
    except OSError:
        return "cpu_peak_rss_since_start"


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes since :func:`reset_peak_memory`: CUDA allocations, or the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    value = _read_status("VmHWM")
    if value is None:
        import resource

        value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return value


def cache_bytes(cache: Any) -> int:
    """Bytes held by a (Dynamic) cache's keys and values, all layers, padding included."""
    if cache is None:
        return 0
    layers = getattr(cache, "layers", None)
    total = 0
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if torch.is_tensor(t):
                    total += t.numel() * t.element_size()
        return total
    for pair in cache:  # legacy tuple-of-tuples
        total += sum(t.numel() * t.element_size() for t in pair if torch.is_tensor(t))
    return total


def kv_bytes_per_token(text_config: Any, dtype: torch.dtype) -> int:
    """Bytes one token occupies in ONE layer's KV cache (keys + values)."""
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class BatchTiming:
    """What one timed ``generate`` call measured."""

    ttft_ms: float | None
    step_ms: list[float] = field(default_factory=list)
    peak_memory_bytes: int | None = None
    memory_kind: str = ""
    kv_cache_bytes_batch: int = 0

    @property
    def decode_ms_per_token(self) -> float | None:
        return statistics.median(self.step_ms) if self.step_ms else None


def choose_threads(default: int, cores: int | None = None, load: float | None = None) -> tuple[int, str]:
    """CPU threads for torch that do not oversubscribe a busy machine, and why, in words.

    ``default`` is torch's own choice (one per core); ``cores`` the cores this process may use and ``load``
    the one-minute load average (both read from the OS when None). The cores not already busy,
    ``round(cores - load)``, at least 1, at most ``default``: on a 2-core machine loaded with other work one
    thread is much faster than two competing for the same cores (a tiny model's generate call: 0.03 s
    against 1.4 s measured).
    """
    import os

    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    free = max(1, min(cores, round(cores - load)))
    chosen = max(1, min(default, free))
    return chosen, f"{cores} core(s), load {load:.1f}, {free} free"
