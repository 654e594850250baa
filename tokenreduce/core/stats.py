"""Per-sample statistics of a wrapped model: tokens in and out, per item and per layer, time in reducers."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenreduce.core.flops import Geometry


class Elapsed:
    """Milliseconds a timed block took, read when asked.

    On CUDA the block is bracketed by two events; reading the value waits for the end event, so timing a
    reducer never stalls the forward that runs it, only whoever reads the stats. ``share(k)`` is a
    ``1/k`` share of it, as lazy.
    """

    __slots__ = ("_events", "_ms", "_parent", "_scale")

    def __init__(self, ms: float = 0.0, events: tuple[Any, Any] | None = None,
                 parent: Elapsed | None = None, scale: float = 1.0):
        self._ms, self._events, self._parent, self._scale = ms, events, parent, scale

    def __float__(self) -> float:
        if self._parent is not None:
            return float(self._parent) * self._scale
        if self._events is not None:
            start, end = self._events
            end.synchronize()
            self._ms, self._events = start.elapsed_time(end), None
        return self._ms * self._scale

    def share(self, parts: int) -> Elapsed:
        return Elapsed(parent=self, scale=1.0 / max(1, parts))

    def __repr__(self) -> str:
        return f"Elapsed({float(self):.3f} ms)"

    def __deepcopy__(self, memo: dict) -> Elapsed:
        return Elapsed(float(self))

    def __reduce__(self):
        return Elapsed, (float(self),)


def _ms(value: Any) -> float:
    return float(value)


class LazyCount:
    """The real tokens (non-zero entries) of a one-row attention mask plus ``offset``, counted when read:
    recording it queues no op and waits for no device."""

    __slots__ = ("mask", "offset")

    def __init__(self, mask: torch.Tensor, offset: int = 0):
        self.mask, self.offset = mask, offset

    def __int__(self) -> int:
        return int((self.mask != 0).sum()) + self.offset


def _lazy_int(value: Any) -> int:
    return int(value) if torch.is_tensor(value) or isinstance(value, LazyCount) else value


@dataclass
class ItemStats:
    """One image or video of one sample (``elapsed``: the reducer's time, ``reducer_ms`` once read)."""

    modality: str
    tokens_in: int
    tokens_out: int
    elapsed: float | Elapsed
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def reducer_ms(self) -> float:
        return _ms(self.elapsed)

    def __repr__(self) -> str:
        info = f", info keys {sorted(self.info)}" if self.info else ""
        return f"ItemStats({self.modality} {self.tokens_in} -> {self.tokens_out} tokens, {self.reducer_ms:.2f} ms{info})"


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
    # Time in the in-LLM reducer, one entry per pruning layer (read lazily, see Elapsed).
    llm_elapsed: list[float | Elapsed] = field(default_factory=list)
    # Text tokens of the row (everything but visual tokens; a 0-dim tensor until first read, so recording
    # it never waits for the device) and the LLM's geometry, for FLOPs.
    text_count: int | torch.Tensor | LazyCount = 0
    geometry: Geometry | None = None

    @property
    def text_tokens(self) -> int:
        self.text_count = _lazy_int(self.text_count)
        return self.text_count

    @text_tokens.setter
    def text_tokens(self, value: int | torch.Tensor | LazyCount) -> None:
        self.text_count = value

    @property
    def llm_reducer_ms(self) -> float:
        return sum(_ms(e) for e in self.llm_elapsed)

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

    def __repr__(self) -> str:
        items = ", ".join(f"{i.modality} {i.tokens_in} -> {i.tokens_out}" for i in self.items) or "no visual items"
        layers = f"; in the LLM {_layer_runs(self.layers)}" if self.layers else ""
        return (f"SampleStats(call {self.call} row {self.row}: {items}{layers}; layer mean "
                f"{self.visual_tokens_layer_mean:.1f}, reducer {self.reducer_ms:.2f} ms)")

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
            **({"extra": {k: _ms(v) if isinstance(v, Elapsed) else v for k, v in self.extra.items()}}
               if self.extra else {}),
        }


class Stats:
    """What a wrapped model has done since it was wrapped (or last reset)."""

    #: A run misses its budget when the achieved layer-mean share is off by more than this share of it.
    BUDGET_TOLERANCE = 0.10

    def __init__(self) -> None:
        self.samples: list[SampleStats] = []
        self.calls = 0
        self._last: list[SampleStats] = []
        #: The budget the model was wrapped with (``tr.wrap(..., budget=)``), or None.
        self.budget: float | None = None
        #: The stages the wrapped method (or stack) acts in, for :meth:`stage_summary`.
        self.stages: tuple[str, ...] = ()

    def new_call(self, batch_size: int) -> list[SampleStats]:
        self.calls += 1
        rows = [SampleStats(call=self.calls, row=r) for r in range(batch_size)]
        self.samples.extend(rows)
        self._last = rows
        return rows

    def reset(self) -> None:
        self.samples.clear()
        self.calls = 0
        self._last = []

    @property
    def last(self) -> list[SampleStats]:
        """Rows of the most recent call (kept aside: no scan of every sample so far)."""
        last = self.__dict__.get("_last")
        if last and last[0].call == self.calls and self.samples and self.samples[-1] is last[-1]:
            return list(last)
        return [s for s in self.samples if s.call == self.calls]

    def summary(self) -> dict[str, float]:
        n = len(self.samples)
        if n == 0:
            return {"samples": 0}
        tin = sum(s.visual_tokens_in for s in self.samples)
        tout = sum(s.visual_tokens_out for s in self.samples)
        flops = sum(s.prefill_flops for s in self.samples)
        flops_full = sum(s.prefill_flops_full for s in self.samples)
        out = {
            "samples": n,
            "visual_tokens_in": tin / n,
            "visual_tokens_out": tout / n,
            "keep_ratio": tout / tin if tin else 1.0,
            "layer_mean_keep_ratio": sum(s.visual_tokens_layer_mean for s in self.samples) / tin if tin else 1.0,
            "reducer_ms": sum(s.reducer_ms for s in self.samples) / n,
            "prefill_flops_ratio": flops / flops_full if flops_full else 1.0,
        }
        if self.budget is not None:
            out["budget"] = self.budget
            out["budget_missed"] = budget_missed(self.budget, out["layer_mean_keep_ratio"])
        return out

    def stage_summary(self) -> dict[str, Any]:
        """Per stage the wrapped method (or stack) acts in, means per sample: visual tokens in and out and
        milliseconds in the stage's reducer (in-LLM: also the tokens after each pruning layer); decode: the
        generated tokens its records hold. ``prefill_flops_ratio`` is the whole stack's."""
        samples, n = self.samples, len(self.samples)
        out: dict[str, Any] = {}
        if not n:
            return out
        stages = getattr(self, "stages", ())
        before = [s for s in stages if s in ("vision", "projector")]
        if before:
            first, second = [], []
            for s in samples:
                for i in s.items:
                    split = i.info.get("projector_stage")  # a vision-only member then a projector member
                    if split is None:
                        first.append((i.tokens_in, i.tokens_out, i.reducer_ms))
                        continue
                    ms = _ms(split["reducer_ms"])
                    first.append((i.tokens_in, split["tokens_in"], i.reducer_ms - ms))
                    second.append((split["tokens_in"], i.tokens_out, ms))
            names = [before[-1]] if not second else ["vision", "projector"]
            for name, rows in zip(names, [first, second]):
                out[name] = {"tokens_in": sum(r[0] for r in rows) / n, "tokens_out": sum(r[1] for r in rows) / n,
                             "reducer_ms": sum(r[2] for r in rows) / n}
        if "llm" in stages:
            layers: dict[int, float] = {}
            for s in samples:
                for k, v in s.layers.items():
                    layers[k] = layers.get(k, 0.0) + v / n
            out["llm"] = {
                "tokens_in": sum(s.visual_tokens_llm_input for s in samples) / n,
                "tokens_out": sum(s.visual_tokens_out for s in samples) / n,
                "layers": dict(sorted(layers.items())),
                "reducer_ms": sum(s.llm_reducer_ms for s in samples) / n,
            }
        if "decode" in stages:
            records = [r for s in samples for r in s.extra.values()
                       if isinstance(r, dict) and "generated_tokens" in r]
            out["decode"] = {"records": len(records),
                             "generated_tokens": sum(r["generated_tokens"] for r in records) / max(1, len(records))}
        out["prefill_flops_ratio"] = self.summary()["prefill_flops_ratio"]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "stages": self.stage_summary(),
                "samples": [s.to_dict() for s in self.samples]}

    def __repr__(self) -> str:
        """A few lines: tokens at each stage and over the LLM's layers (means per sample), the budget asked
        beside the layer-mean share achieved, the prefill FLOPs ratio, the time in the reducer."""
        s = self.summary()
        if not s["samples"]:
            return "Stats(no samples)"
        n, tin = s["samples"], s["visual_tokens_in"]

        def share(tokens: float) -> str:
            return f"{tokens:.1f} ({100 * tokens / tin:.1f}%)" if tin else f"{tokens:.1f}"

        modalities: dict[str, list[int]] = {}
        for sample in self.samples:
            for item in sample.items:
                modalities.setdefault(item.modality, []).append(item.tokens_in)
        kinds = ", ".join(f"{len(v)} {k}(s)" for k, v in modalities.items())
        llm_input = sum(x.visual_tokens_llm_input for x in self.samples) / n
        lines = [f"Stats(samples={n}, calls={self.calls}{', ' + kinds if kinds else ''})",
                 f"  visual tokens in      {tin:.1f} -> {share(s['visual_tokens_out'])} at the deepest layer",
                 f"  at the LLM input      {share(llm_input)}"]
        per_layer = self._visual_per_layer()
        if per_layer and len(set(per_layer)) > 1:
            lines.append(f"  per LLM layer         {_layer_runs(dict(enumerate(per_layer)), full=True)}")
        lines.append(f"  layer mean            {share(s['layer_mean_keep_ratio'] * tin)}")
        if "budget" in s:
            verdict = (f"MISSED by more than {100 * self.BUDGET_TOLERANCE:.0f}%" if s["budget_missed"]
                       else f"within {100 * self.BUDGET_TOLERANCE:.0f}%")
            lines.append(f"  budget                {100 * s['budget']:.1f}% asked, "
                         f"{100 * s['layer_mean_keep_ratio']:.1f}% achieved (layer mean): {verdict}")
        lines.append(f"  prefill FLOPs ratio   {s['prefill_flops_ratio']:.3f}")
        in_llm = sum(x.llm_reducer_ms for x in self.samples) / n
        split = f" ({s['reducer_ms'] - in_llm:.2f} before the LLM, {in_llm:.2f} in it)" if in_llm else ""
        lines.append(f"  reducer time          {s['reducer_ms']:.2f} ms/sample{split}")
        return "\n".join(lines)

    def _visual_per_layer(self) -> list[float]:
        """Mean visual tokens each decoder layer sees in prefill (empty without the LLM's geometry)."""
        rows = [[t - x.text_tokens for t in x.tokens_per_layer()] for x in self.samples]
        if not rows or any(not r for r in rows) or len({len(r) for r in rows}) != 1:
            return []
        return [sum(col) / len(col) for col in zip(*rows)]


def _layer_runs(tokens: dict[int, float], full: bool = False) -> str:
    """``layers 0-1: 256, 2-5: 128``: runs of layers holding the same visual-token count (``full``: ``tokens``
    gives every layer; else only the layers where a count starts, ``from layer 2: 128``)."""
    def num(value: float) -> str:
        return f"{value:g}" if float(value).is_integer() else f"{value:.1f}"

    if not full:
        return ", ".join(f"from layer {k}: {num(v)}" for k, v in sorted(tokens.items()))
    runs: list[tuple[int, int, float]] = []
    for layer, value in sorted(tokens.items()):
        if runs and runs[-1][2] == value:
            runs[-1] = (runs[-1][0], layer, value)
        else:
            runs.append((layer, layer, value))
    return "layers " + ", ".join(f"{a}: {num(v)}" if a == b else f"{a}-{b}: {num(v)}" for a, b, v in runs)


def budget_missed(budget: float, achieved: float, tolerance: float = Stats.BUDGET_TOLERANCE) -> bool:
    """Whether the achieved layer-mean share misses ``budget`` by more than ``tolerance`` of it."""
    return abs(achieved - budget) > tolerance * budget


@contextmanager
def timer(device: torch.device | None = None):
    """Time of the block as an :class:`Elapsed`: CUDA events on a CUDA device (nothing waits for the
    device here), wall time on the host otherwise."""
    if device is not None and device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        elapsed = Elapsed(events=(start, end))
        start.record()
        try:
            yield elapsed
        finally:
            end.record()
        return
    elapsed = Elapsed()
    begin = time.perf_counter()
    try:
        yield elapsed
    finally:
        elapsed._ms = (time.perf_counter() - begin) * 1e3
