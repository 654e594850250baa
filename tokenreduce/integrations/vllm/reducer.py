"""The reduction a vLLM engine runs: parsed from ``hf_config.tokenreduce``, applied per item.

vLLM fixes the number of placeholder tokens of every image and video when the prompt is processed,
before the vision encoder runs. A method can therefore run inside vLLM only if its output count is a
function of the item's token layout alone; those are listed in :data:`SUPPORTED`, with the conditions
that make the count fixed (:data:`FIXED_COUNT`, :data:`TOWER_FAMILIES`). Everything else (in-LLM methods,
data-dependent budgets, methods that read the prompt's text or merge inside the tower) is refused when the
engine starts, with an error naming the method and the ones that work.

Methods that read the vision tower's attention (``visionzip``, ``doc_correlation``) get their signals
from :class:`tokenreduce.core.vision.VisionStage` on vLLM's own tower (see
:mod:`tokenreduce.integrations.vllm.models`), turned into per-token signals by the method's
``tower_signals`` and the family adapter's ``token_signals``: the code the transformers path runs.

This module does not import vLLM: it is the bridge between the engine's per-item features and the
registered method's own ``reduce`` (the same code the transformers path runs).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch

from tokenreduce.adapters import adapter_class
from tokenreduce.core.config import STACK_SEPARATOR, MethodConfig, build_config, resolve_keep
from tokenreduce.core.layout import TokenLayout
from tokenreduce.core.reduction import Method, ReduceContext, Reduction
from tokenreduce.core.registry import get_method, list_methods

logger = logging.getLogger(__name__)

# Methods whose output count depends on the item's layout only (checked on every item at run time).
SUPPORTED = ("divprune", "doc_correlation", "pool", "random", "tome_projector", "visionzip", "vqtoken")
# Options without which a supported method's count depends on the data: option -> why.
FIXED_COUNT = {
    "doc_correlation": ("keep", "with `keep` unset every crop keeps as many tokens as its density says; set "
                                "`keep` (a fraction of each image's tokens)"),
    "vqtoken": ("keep", "with `keep` unset each video picks its own K; set `keep` (codes per video)"),
}
# Tower-reading methods run where vLLM's tower is a CLIP / SigLIP ViT whose rows the layouts map: LLaVA-1.5
# images (one tower grid) and LLaVA-OneVision videos (one grid per frame); the tower pass of an anyres
# image (one row per crop) is not captured (see ANYRES_TOWER_METHODS).
TOWER_FAMILIES = ("llava", "llava_onevision")
# Families whose images are anyres canvases with a newline slot ending every row.
ANYRES_FAMILIES = ("llava_next", "llava_onevision")
# Tower-reading methods of a TOWER_FAMILIES family with anyres images: their counts are fixed (the newline
# slots follow from the budget and the layout), but the crops' tower signals are not captured in vLLM.
# With `modalities` unset they reduce the family's videos only.
ANYRES_TOWER_METHODS = ("doc_correlation", "visionzip")
# Why the others cannot run in vLLM, by the stage or property that rules them out.
_WHY = {
    "vision": "acts inside the vision tower (merging or data-dependent counts), which vLLM's fixed "
              "placeholder counts cannot follow",
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
class TowerShape:
    """What a count probe needs of a family's vision tower: heads, head width, prefix tokens, patches."""

    heads: int
    head_dim: int
    num_prefix: int
    patches: int
    scale: float
    num_layers: int = 0  # the checkpoint's tower layers
    built_layers: int = 0  # the layers vLLM builds (up to the feature layer LLaVA reads)

    def check_layer(self, method: str, layer: int) -> None:
        """A one-line error unless the tower layer ``layer`` (counted as transformers counts) is built."""
        index = layer if layer >= 0 else self.num_layers + layer
        if not 0 <= index < self.built_layers:
            raise ValueError(
                f"tokenreduce: tower layer {layer} of {method} is not built by vLLM, which runs the first "
                f"{self.built_layers} of the tower's {self.num_layers} layers (up to the feature layer); "
                f"accepted: 0..{self.built_layers - 1} or {-self.num_layers}..{self.built_layers - self.num_layers - 1}"
            )


@dataclasses.dataclass(frozen=True)
class EngineReducer:
    """One engine's reduction: the method's config, the modalities it acts on and, for methods that read
    the tower, the family and its tower's shape (for the count probe)."""

    config: MethodConfig
    modalities: tuple[str, ...]
    family: str = ""
    tower: TowerShape | None = None

    @property
    def name(self) -> str:
        return self.config.method

    @property
    def renumber(self) -> bool:
        return bool(self.config.renumber_positions)

    @property
    def reads_tower(self) -> bool:
        return "vision" in get_method(self.name).stages

    def acts_on(self, modality: str) -> bool:
        return modality in self.modalities

    def new_method(self, handle: Any = None) -> Method:
        """A fresh instance of the registered method, attached to ``handle`` (a view the method reads its
        family, tower and vision stage from) when given."""
        method = get_method(self.name).method_cls(self.config)
        if handle is not None:
            method.attach(handle)
        return method

    def count(self, layout: TokenLayout) -> int:
        """Tokens the method leaves of an item with ``layout`` (what the prompt's placeholders become)."""
        if not self.acts_on(layout.modality):
            return layout.num_tokens
        return _probe_count(self, layout)

    def reduce(self, features: torch.Tensor, layout: TokenLayout, method: Method | None = None,
               signals: dict[str, torch.Tensor] | None = None) -> Reduction:
        """Run the method on one item's ``[N, D]`` features (with its tower ``signals``), as the
        transformers path does; the result's sources are sorted and its count is checked against
        :meth:`count`. ``vqtoken`` may feed fewer codes than ``keep`` (a code no token uses, or fewer
        distinct tokens than codes); the missing slots then repeat its last output token (logged)."""
        n = features.shape[0]
        if n != layout.num_tokens:
            raise RuntimeError(
                f"tokenreduce: the encoder gave {n} tokens for a {layout.modality} whose layout has "
                f"{layout.num_tokens}"
            )
        if not self.acts_on(layout.modality):
            return Reduction(sources=torch.arange(n, device=features.device))
        red = _run(method or _method(self), features, layout, signals or {})
        expected = self.count(layout)
        if self.name == "vqtoken" and 0 < red.num_tokens < expected:
            red = _repeat_last(red, features, expected)
        if red.num_tokens != expected:
            raise RuntimeError(
                f"tokenreduce: method {self.name!r} returned {red.num_tokens} tokens for a {layout.modality} "
                f"whose prompt holds {expected} placeholders; its count depends on the data, which vLLM "
                "cannot serve"
            )
        return red


def _repeat_last(red: Reduction, features: torch.Tensor, expected: int) -> Reduction:
    missing = expected - red.num_tokens
    logger.warning("tokenreduce: vqtoken fed %d tokens for %d placeholders; its last token fills the other %d "
                   "placeholders", red.num_tokens, expected, missing)
    out = red.output_features(features)
    sources = torch.cat([red.sources, red.sources[-1:].expand(missing)])
    return Reduction(sources=sources, features=torch.cat([out, out[-1:].expand(missing, -1)]))


def _run(method: Method, features: torch.Tensor, layout: TokenLayout, signals: dict[str, torch.Tensor]) -> Reduction:
    config = method.config
    seed = getattr(config, "seed", None)
    generator = None if seed is None else torch.Generator().manual_seed(int(seed))
    ctx = ReduceContext(layout=layout, modality=layout.modality, row=0, item=0, generator=generator, signals=signals)
    red = method.reduce(features, ctx).sorted()
    sources = red.sources
    if sources.dim() != 1 or (sources.numel() and (int(sources.min()) < 0 or int(sources.max()) >= features.shape[0])):
        raise RuntimeError(f"tokenreduce: method {config.method!r} returned source indices outside [0, {features.shape[0]})")
    return red


class _FamilyView:
    """What ``Method.attach`` reads of a handle when a count is probed: the family's name."""

    def __init__(self, family: str):
        self.adapter = type("AdapterName", (), {"name": family})()


def _method(reducer: EngineReducer) -> Method:
    """The reducer's shared method instance (counts, and items reduced without a model's own instance)."""
    return _method_for(reducer.config.to_json(), reducer.family, reducer.tower)


@lru_cache(maxsize=64)
def _method_for(config_json: str, family: str, tower: TowerShape | None) -> Method:
    config = MethodConfig.from_dict(_loads(config_json))
    reducer = EngineReducer(config=config, modalities=(), family=family, tower=tower)
    return reducer.new_method(_FamilyView(family) if reducer.reads_tower else None)


def _probe_count(reducer: EngineReducer, layout: TokenLayout) -> int:
    return _probe_count_for(reducer.config.to_json(), reducer.family, reducer.tower, layout)


@lru_cache(maxsize=4096)
def _probe_count_for(config_json: str, family: str, tower: TowerShape | None, layout: TokenLayout) -> int:
    # The count of a supported method depends on the layout only: run it once on seeded features (and,
    # for a tower-reading method, seeded queries and keys of its layers, mapped by the method's own code).
    config = MethodConfig.from_dict(_loads(config_json))
    if config.method == "vqtoken":
        return _vqtoken_count(config, layout)
    reducer = EngineReducer(config=config, modalities=(), family=family, tower=tower)
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(layout.num_tokens, 16, generator=generator)
    method = _method(reducer)
    signals = probe_signals(method, tower, layout, generator, family) if reducer.reads_tower else {}
    return _run(method, probe, layout, signals).num_tokens


def _vqtoken_count(config: MethodConfig, layout: TokenLayout) -> int:
    # As many codes as asked (at most one per content token; k-means places K codes among distinct
    # tokens), plus the lone newline slots ``keep_newline`` adds. Fewer used codes: see ``reduce``.
    lone = sum(1 for s in layout.segments if s.cols == 0 and s.newline) if config.keep_newline else 0
    return resolve_keep(config.keep, int(layout.content_mask.sum())) + lone


def probe_signals(method: Method, tower: TowerShape, layout: TokenLayout, generator: torch.Generator,
                  family: str = "llava") -> dict:
    """Per-token signals of one item from random queries and keys, through the method's ``tower_signals``
    and the family adapter's ``token_signals`` (one tower row per image, one per video frame)."""
    layers = method.vision_layer
    rows = sum(1 for s in layout.segments if s.kind == "frame") if layout.modality == "video" else 1
    shape = (rows, tower.heads, tower.num_prefix + tower.patches, tower.head_dim)
    if isinstance(layers, int):
        q, k = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    else:
        q = {layer: torch.randn(shape, generator=generator) for layer in layers}
        k = {layer: torch.randn(shape, generator=generator) for layer in layers}
    per_patch = method.tower_signals(q, k, scale=tower.scale, num_prefix=tower.num_prefix)
    adapter = adapter_class(family).from_config(None)  # token_signals reads the layouts only
    return {name: adapter.token_signals(layout.modality, [layout], value)[0] for name, value in per_patch.items()}


def _loads(text: str) -> dict[str, Any]:
    import json

    return json.loads(text)


def parse_reducer(options: Any, family: str, tower: TowerShape | None = None) -> EngineReducer | None:
    """The engine's reducer from ``hf_config.tokenreduce`` (None when absent), or a one-line error.

    ``options`` is ``{"method": name, **method options}``, e.g. ``{"method": "divprune", "keep": 64}``.
    As with ``tr.wrap``, kept tokens keep their original positions (Qwen: t/h/w M-RoPE ids) unless
    ``renumber_positions`` is True. ``tower`` is the family's vision tower shape (needed by the methods
    that read the tower).
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
    if STACK_SEPARATOR in name:
        raise _refusal(name, "a stack of methods; vLLM runs one fixed-count method per engine")
    if name not in list_methods():
        raise ValueError(f"tokenreduce: unknown method {name!r}; methods that can run in vLLM: {', '.join(SUPPORTED)}")
    spec = get_method(name)
    if name not in SUPPORTED:
        stage = next((s for s in ("llm", "decode", "vision") if s in spec.stages), None)
        reason = _WHY.get(stage, "its number of output tokens depends on the data, not only on the image size")
        if stage is None and spec.method_cls.uses_text:
            reason = "it reads the prompt's text, which vLLM's encoder does not see"
        raise _refusal(name, reason)
    reads_tower = "vision" in spec.stages
    if reads_tower and family not in TOWER_FAMILIES:
        raise _refusal(name, f"it reads the vision tower's attention, wired in vLLM for llava (images) and "
                             f"llava_onevision (videos), not {family}")
    if spec.families is not None and family not in spec.families:
        raise _refusal(name, f"it does not support {family}; its families: {', '.join(spec.families)}")
    config = build_config(name, **options)
    option, why = FIXED_COUNT.get(name, (None, ""))
    if option is not None and getattr(config, option) is None:
        raise _refusal(name, why)
    if name == "visionzip" and config.variant == "reference":
        raise ValueError("tokenreduce: `variant` for visionzip in vLLM must be 'default' (the reference variant "
                         "feeds the tower's [CLS] token, for which vLLM's LLaVA prompt has no slot), got 'reference'")
    if name == "doc_correlation" and config.similarity == "hidden":
        raise ValueError("tokenreduce: `similarity` for doc_correlation in vLLM must be 'keys' or 'keys_mean' "
                         "(the tower's hidden states are not captured there), got 'hidden'")
    if name == "vqtoken" and config.attention is not None:
        raise ValueError(f"tokenreduce: `attention` for vqtoken in vLLM must be None (trained VQ-attention adds "
                         f"adapters to the language model, which vLLM gives no hook for), got {config.attention!r}")
    modalities = tuple(config.modalities or spec.modalities)
    if name in ANYRES_TOWER_METHODS and family in ANYRES_FAMILIES and "image" in modalities:
        why = (f"on {family}'s anyres images it reads the tower's attention of every crop, which vLLM's "
               "integration captures for videos only")
        videos = family == "llava_onevision" and "video" in spec.modalities
        if config.modalities is not None or not videos:
            raise _refusal(name, why + ("; `modalities: [\"video\"]` reduces the videos only" if videos else ""))
        logger.warning("tokenreduce: %s reduces %s's videos only (%s); its images pass through", name, family, why)
        modalities = tuple(m for m in modalities if m != "image")
    if reads_tower:
        if tower is None:
            raise ValueError(f"tokenreduce: method {name!r} needs the vision tower's shape of {family}; none was given")
        layers = spec.method_cls(config).vision_layer
        for layer in (layers,) if isinstance(layers, int) else layers:
            tower.check_layer(name, layer)
    return EngineReducer(config=config, modalities=modalities, family=family, tower=tower if reads_tower else None)
