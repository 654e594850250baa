"""The reduction a vLLM engine runs: parsed from ``hf_config.tokenreduce``, applied per item.

vLLM fixes the number of placeholder tokens of every image and video when the prompt is processed,
before the vision encoder runs. A method can therefore run inside vLLM only if its output count is a
function of the item's token layout alone; those are listed in :data:`SUPPORTED`. Everything else
(in-LLM methods, data-dependent budgets, methods that read the tower's attention or the prompt's text)
is refused when the engine starts, with an error naming the method and the ones that work.

This module does not import vLLM: it is the bridge between the engine's per-item features and the
registered method's own ``reduce`` (the same code the transformers path runs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch

from tokenreduce.core.config import MethodConfig, build_config
from tokenreduce.core.layout import TokenLayout
from tokenreduce.core.reduction import ReduceContext, Reduction
from tokenreduce.core.registry import get_method, list_methods

# Methods whose output count depends on the item's layout only (checked on every item at run time).
SUPPORTED = ("divprune", "pool", "random", "tome_projector")
# Why the others cannot run in vLLM, by the stage or property that rules them out.
_WHY = {
    "vision": "acts inside the vision tower (attention signals or merging), which vLLM gives no hook for",
    "llm": "acts inside the language model, which vLLM gives no hook for",
    "decode": "acts on generation, not on the prompt's visual tokens",
}
HF_CONFIG_KEY = "tokenreduce"


def _refusal(name: str, reason: str) -> ValueError:
    return ValueError(
        f"tokenreduce: method {name!r} cannot run in vLLM ({reason}); "
        f"methods that can: {', '.join(SUPPORTED)}"
    )


@dataclasses.dataclass(frozen=True)
class EngineReducer:
    """One engine's reduction: the method's config, and the method object that reduces each item."""

    config: MethodConfig
    modalities: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.config.method

    @property
    def renumber(self) -> bool:
        return bool(self.config.renumber_positions)

    def acts_on(self, modality: str) -> bool:
        return modality in self.modalities

    def count(self, layout: TokenLayout) -> int:
        """Tokens the method leaves of an item with ``layout`` (what the prompt's placeholders become)."""
        if not self.acts_on(layout.modality):
            return layout.num_tokens
        return _probe_count(self.config.to_json(), layout)

    def reduce(self, features: torch.Tensor, layout: TokenLayout) -> Reduction:
        """Run the method on one item's ``[N, D]`` features, as the transformers path does; the result's
        sources are sorted and its count is checked against :meth:`count`."""
        n = features.shape[0]
        if n != layout.num_tokens:
            raise RuntimeError(
                f"tokenreduce: the encoder gave {n} tokens for a {layout.modality} whose layout has "
                f"{layout.num_tokens}"
            )
        if not self.acts_on(layout.modality):
            return Reduction(sources=torch.arange(n, device=features.device))
        red = _run(self.config, features, layout)
        expected = self.count(layout)
        if red.num_tokens != expected:
            raise RuntimeError(
                f"tokenreduce: method {self.name!r} returned {red.num_tokens} tokens for a {layout.modality} "
                f"whose prompt holds {expected} placeholders; its count depends on the data, which vLLM "
                "cannot serve"
            )
        return red


def _run(config: MethodConfig, features: torch.Tensor, layout: TokenLayout) -> Reduction:
    method = _method(config.to_json())
    seed = getattr(config, "seed", None)
    generator = None if seed is None else torch.Generator().manual_seed(int(seed))
    ctx = ReduceContext(layout=layout, modality=layout.modality, row=0, item=0, generator=generator)
    red = method.reduce(features, ctx).sorted()
    sources = red.sources
    if sources.dim() != 1 or (sources.numel() and (int(sources.min()) < 0 or int(sources.max()) >= features.shape[0])):
        raise RuntimeError(f"tokenreduce: method {config.method!r} returned source indices outside [0, {features.shape[0]})")
    return red


@lru_cache(maxsize=64)
def _method(config_json: str):
    config = MethodConfig.from_dict(_loads(config_json))
    return get_method(config.method).method_cls(config)


@lru_cache(maxsize=4096)
def _probe_count(config_json: str, layout: TokenLayout) -> int:
    # The count of a supported method depends on the layout only: run it once on seeded features.
    config = MethodConfig.from_dict(_loads(config_json))
    probe = torch.randn(layout.num_tokens, 16, generator=torch.Generator().manual_seed(0))
    return _run(config, probe, layout).num_tokens


def _loads(text: str) -> dict[str, Any]:
    import json

    return json.loads(text)


def parse_reducer(options: Any, family: str) -> EngineReducer | None:
    """The engine's reducer from ``hf_config.tokenreduce`` (None when absent), or a one-line error.

    ``options`` is ``{"method": name, **method options}``, e.g. ``{"method": "divprune", "keep": 64}``.
    As with ``tr.wrap``, kept tokens keep their original positions (Qwen: t/h/w M-RoPE ids) unless
    ``renumber_positions`` is True.
    """
    if options is None:
        return None
    if isinstance(options, str):
        options = {"method": options}
    if not isinstance(options, Mapping) or not isinstance(options.get("method"), str):
        raise ValueError(
            f"tokenreduce: hf_overrides['{HF_CONFIG_KEY}'] must be a dict with a 'method' name, e.g. "
            f'{{"method": "divprune", "keep": 64}}; got {options!r}'
        )
    options = dict(options)
    name = options.pop("method")
    if name not in list_methods():
        raise ValueError(f"tokenreduce: unknown method {name!r}; methods that can run in vLLM: {', '.join(SUPPORTED)}")
    spec = get_method(name)
    if name not in SUPPORTED:
        stage = next((s for s in ("llm", "decode", "vision") if s in spec.stages), None)
        reason = _WHY.get(stage, "its number of output tokens depends on the data, not only on the image size")
        raise _refusal(name, reason)
    config = build_config(name, **options)
    modalities = tuple(config.modalities or spec.modalities)
    if family == "llava_onevision":
        # Its anyres image layouts (unpadding, downsampling, newline slots) are not wired into vLLM yet.
        if config.modalities is not None and "image" in config.modalities:
            raise ValueError(
                f"tokenreduce: `modalities` for llava_onevision in vLLM must be ('video',) (its images are not "
                f"reduced there yet), got {config.modalities!r}"
            )
        modalities = ("video",)
    return EngineReducer(config=config, modalities=modalities)
