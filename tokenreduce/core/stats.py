"""Per-sample statistics of a wrapped model: tokens in and out, per item and per layer, time in reducers."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenreduce.core.flops import Geometry


@dataclass
class ItemStats:
    """One image or video of one sample."""

    modality: str
    tokens_in: int
    tokens_out: int
    reducer_ms: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class SampleStats:
    """One batch row of one call (``forward`` or ``generate``)."""

    call: int
    row: int
    items: list[ItemStats] = field(default_factory=list)
    # In-LLM methods: tokens the row holds after each pruning layer, {layer: visual tokens kept}.
    layers: dict[int, int] = field(default_factory=dict)
    # Extra per-sample records (e.g. decode-stage entropy traces).
    extra: dict[str, Any] = field(default_factory=dict)
    llm_reducer_ms: float = 0.0
    # Text tokens of the row (everything but visual tokens) and the LLM's geometry, for FLOPs.
    text_tokens: int = 0
    geometry: Geometry | None = None

    @property
    def visual_tokens_in(self) -> int:
        return sum(i.tokens_in for i in self.items)

    @property
    def visual_tokens_out(self) -> int:
        """Visual tokens the deepest layer sees (after in-LLM pruning when there is any)."""
        if self.layers:
            return self.layers[max(self.layers)]
        return sum(i.tokens_out for i in self.items)

    @property
    def visual_tokens_llm_input(self) -> int:
        """Visual tokens at the LLM input (after vision/projector-stage reduction)."""
        return sum(i.tokens_out for i in self.items)

    @property
    def reducer_ms(self) -> float:
        return sum(i.reducer_ms for i in self.items) + self.llm_reducer_ms

    def tokens_per_layer(self) -> list[int]:
        """Tokens (text + visual) each decoder layer processes in prefill."""
        if self.geometry is None:
            return []
        visual = self.visual_tokens_llm_input
        out = []
        for i in range(self.geometry.layers):
            if i in self.layers:
                visual = self.layers[i]
            out.append(self.text_tokens + visual)
        return out

    @property
    def visual_tokens_layer_mean(self) -> float:
        """Visual tokens averaged over the decoder layers (what in-LLM budgets are stated in)."""
        per_layer = self.tokens_per_layer()
        if not per_layer:
            return float(self.visual_tokens_out)
        return sum(per_layer) / len(per_layer) - self.text_tokens

    @property
    def prefill_flops(self) -> float:
        """Analytic LLM prefill FLOPs of this row as run."""
        return self.geometry.prefill_flops(self.tokens_per_layer()) if self.geometry else 0.0

    @property
    def prefill_flops_full(self) -> float:
        """Analytic LLM prefill FLOPs of this row without any reduction."""
        if self.geometry is None:
            return 0.0
        return self.geometry.prefill_flops([self.text_tokens + self.visual_tokens_in] * self.geometry.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "call": self.call,
            "row": self.row,
            "visual_tokens_in": self.visual_tokens_in,
            "visual_tokens_llm_input": self.visual_tokens_llm_input,
            "visual_tokens_out": self.visual_tokens_out,
            "visual_tokens_layer_mean": self.visual_tokens_layer_mean,
            "reducer_ms": self.reducer_ms,
            "text_tokens": self.text_tokens,
            "prefill_flops": self.prefill_flops,
            "prefill_flops_full": self.prefill_flops_full,
            "layers": {str(k): v for k, v in self.layers.items()},
            "items": [
                {"modality": i.modality, "tokens_in": i.tokens_in, "tokens_out": i.tokens_out,
                 "reducer_ms": i.reducer_ms, **({"info": i.info} if i.info else {})}
                for i in self.items
            ],
            **({"extra": self.extra} if self.extra else {}),
        }


class Stats:
    """What a wrapped model has done since it was wrapped (or last reset)."""

    def __init__(self) -> None:
        self.samples: list[SampleStats] = []
        self.calls = 0

    def new_call(self, batch_size: int) -> list[SampleStats]:
        self.calls += 1
        rows = [SampleStats(call=self.calls, row=r) for r in range(batch_size)]
        self.samples.extend(rows)
        return rows

    def reset(self) -> None:
        self.samples.clear()
        self.calls = 0

    @property
    def last(self) -> list[SampleStats]:
        """Rows of the most recent call."""
        return [s for s in self.samples if s.call == self.calls]

    def summary(self) -> dict[str, float]:
        n = len(self.samples)
        if n == 0:
            return {"samples": 0}
        tin = sum(s.visual_tokens_in for s in self.samples)
        tout = sum(s.visual_tokens_out for s in self.samples)
        flops = sum(s.prefill_flops for s in self.samples)
        flops_full = sum(s.prefill_flops_full for s in self.samples)
        return {
            "samples": n,
            "visual_tokens_in": tin / n,
            "visual_tokens_out": tout / n,
            "keep_ratio": tout / tin if tin else 1.0,
            "layer_mean_keep_ratio": sum(s.visual_tokens_layer_mean for s in self.samples) / tin if tin else 1.0,
            "reducer_ms": sum(s.reducer_ms for s in self.samples) / n,
            "prefill_flops_ratio": flops / flops_full if flops_full else 1.0,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "samples": [s.to_dict() for s in self.samples]}

    def __repr__(self) -> str:
        s = self.summary()
        if not s["samples"]:
            return "Stats(no samples)"
        return (
            f"Stats(samples={s['samples']}, visual tokens {s['visual_tokens_in']:.1f} -> "
            f"{s['visual_tokens_out']:.1f} ({100 * s['keep_ratio']:.1f}%), reducer {s['reducer_ms']:.2f} ms/sample)"
        )


@contextmanager
def timer(device: torch.device | None = None):
    """Wall time in milliseconds of the block, synchronising CUDA before reading the clock."""
    box = {"ms": 0.0}
    sync = device is not None and device.type == "cuda"
    if sync:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        yield box
    finally:
        if sync:
            torch.cuda.synchronize(device)
        box["ms"] = (time.perf_counter() - start) * 1e3
