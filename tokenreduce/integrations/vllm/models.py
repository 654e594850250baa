"""vLLM model classes that reduce visual tokens: vLLM's own classes plus two hooks.

Each class subclasses vLLM's model of its family and is registered under the same architecture name,
so an engine built with ``hf_overrides={"tokenreduce": {...}}`` loads it; without that entry it is the
unchanged vLLM model.

- The multimodal processor (the family's own, wrapped) writes the reduced number of placeholder tokens
  for every image or video: the count the method leaves of the item's layout.
- ``embed_multimodal`` runs the family's vision tower and projector, then the registered method's
  ``reduce`` on each item's features: the same code the transformers path runs. For methods that read
  the tower (LLaVA-1.5 images, LLaVA-OneVision videos), the core's
  :class:`~tokenreduce.core.vision.VisionStage` captures q and k of their layers on vLLM's own tower
  (:class:`VllmTower`) while it runs, and hands the method its signals.
- Anyres images (LLaVA-NeXT, LLaVA-OneVision) get their layouts from the family adapter's own anyres
  code, run on transformers' ``pack_image_features`` with the config alone (:func:`anyres_image_layout`).
- Kept tokens keep their original positions (unless ``renumber_positions``), Qwen's t/h/w M-RoPE ids
  included: ``get_mrope_input_positions`` gives the prompt's text its original positions and every
  placeholder the item's origin; ``embed_multimodal`` appends each kept token's offset (exact small
  integers) to its embedding; ``embed_input_ids`` strips them and ``forward`` adds them to the
  placeholders' positions of the same step. The 1-D families (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision) go
  through vLLM's M-RoPE path with three identical rows (:func:`enable_position_ids`), which equals 1-D RoPE.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel
from vllm.model_executor.models.llava import LlavaForConditionalGeneration, _get_num_hidden_layers
from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration
from vllm.model_executor.models.llava_onevision import LlavaOnevisionForConditionalGeneration
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY

from tokenreduce.adapters.llava import LlavaAdapter
from tokenreduce.adapters.llava_next import LlavaNextAdapter
from tokenreduce.adapters.llava_onevision import LlavaOnevisionAdapter
from tokenreduce.adapters.qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter
from tokenreduce.adapters.towers import BlockParts, Tower
from tokenreduce.core.hostsync import require
from tokenreduce.core.layout import TokenLayout
from tokenreduce.core.vision import VisionStage

from .reducer import HF_CONFIG_KEY, TOWER_FAMILIES, EngineReducer, TowerShape, parse_reducer

# Digits (base 256) per M-RoPE coordinate appended to an embedding: exact in fp32, fp16 and bf16.
_DIGITS = 2
_BASE = 256
POSITION_CHANNELS = 3 * _DIGITS


def engine_reducer(hf_config: Any, family: str) -> EngineReducer | None:
    """The reducer configured on ``hf_config`` (``hf_overrides={"tokenreduce": ...}``), or None."""
    return parse_reducer(getattr(hf_config, HF_CONFIG_KEY, None), family, tower_shape(hf_config, family))


def tower_shape(hf_config: Any, family: str) -> TowerShape | None:
    """The CLIP / SigLIP tower's shape of a :data:`TOWER_FAMILIES` config (what a count probe needs)."""
    if family not in TOWER_FAMILIES:
        return None
    vision = hf_config.vision_config
    heads = int(vision.num_attention_heads)
    head_dim = int(vision.hidden_size) // heads
    side = int(vision.image_size) // int(vision.patch_size)
    prefix = int(getattr(vision, "model_type", "") == "clip_vision_model")
    return TowerShape(heads=heads, head_dim=head_dim, num_prefix=prefix, patches=side * side, scale=head_dim**-0.5,
                      num_layers=int(vision.num_hidden_layers), built_layers=_get_num_hidden_layers(hf_config))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class VllmTower(Tower):
    """vLLM's CLIP / SigLIP vision model as a :class:`~tokenreduce.adapters.towers.Tower`, for the core's
    :class:`~tokenreduce.core.vision.VisionStage`: q and k are read from each layer's fused ``qkv_proj``.

    vLLM builds the tower only up to the layer LLaVA reads its features from; a layer index counts from
    the checkpoint's ``num_hidden_layers`` (as transformers does), and a layer vLLM does not build is an error.
    """

    kind = "vllm"

    def __init__(self, module: torch.nn.Module, num_layers: int):
        super().__init__(module)
        self.num_layers = num_layers

    @property
    def blocks(self):
        return list(self.module.vision_model.encoder.layers)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if hasattr(self.module.vision_model.embeddings, "class_embedding") else 0

    def parts(self, block):
        attn = block.self_attn
        heads = attn.num_heads_per_partition

        def split(x):
            b, n, _ = x.shape
            return x.view(b, n, heads, -1).transpose(1, 2)

        def qkv(h):
            q, k, v = attn.qkv_proj(h)[0].chunk(3, dim=-1)
            return split(q), split(k), split(v)

        def out(o):
            return attn.out_proj(o)[0]

        return BlockParts(block.layer_norm1, qkv, out, _identity, block.layer_norm2, block.mlp, _identity, attn.scale)

    def attention_input_module(self, block):
        return block.self_attn

    def block_index(self, layer: int) -> int:
        index = layer if layer >= 0 else self.num_layers + layer
        built = len(self.blocks)
        if not 0 <= index < built:
            raise ValueError(
                f"tokenreduce: tower layer {layer} (index {index} of {self.num_layers}) is not built by vLLM, which "
                f"runs the tower's first {built} layers only (up to LLaVA's feature layer); choose a layer in "
                f"[{-self.num_layers}, {built - self.num_layers - 1}] or [0, {built - 1}]"
            )
        return index


class _HandleView:
    """What the core's vision stage and a method's ``attach`` read of a tokenreduce handle."""

    def __init__(self, adapter: Any, method: Any):
        self.adapter, self.method, self.vision_stage, self.hooks = adapter, method, None, []

    def register_hook(self, hook) -> None:
        self.hooks.append(hook)


def _adapter_view(cls: type, hf_config: Any, tower: Tower):
    """An instance of the family's adapter class over a config and a tower, without a transformers model
    (for its ``token_signals`` and ``name``)."""
    view_cls = type(f"Vllm{cls.__name__}", (cls,), {"tower": None})
    view = object.__new__(view_cls)
    view.config, view.tower = hf_config, tower
    return view


def encode_positions(offsets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[M, 3]`` non-negative integer offsets as ``[M, 6]`` base-256 digits in ``dtype`` (exact)."""
    limit = _BASE**_DIGITS
    if offsets.numel() and (int(offsets.min()) < 0 or int(offsets.max()) >= limit):
        raise ValueError(f"tokenreduce: M-RoPE offsets must be in [0, {limit}), got {offsets.min()}..{offsets.max()}")
    digits = [(offsets // _BASE**d) % _BASE for d in range(_DIGITS)]
    return torch.stack(digits, dim=-1).reshape(offsets.shape[0], POSITION_CHANNELS).to(dtype)


def decode_positions(channels: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_positions`: ``[M, 6]`` -> ``[M, 3]`` long."""
    digits = channels.round().long().reshape(channels.shape[0], 3, _DIGITS)
    scale = torch.tensor([_BASE**d for d in range(_DIGITS)], device=channels.device)
    return (digits * scale).sum(-1)


def _reducing_processor(base_factory):
    """A processor factory building the family's own processor, with its prompt updates reduced."""

    def build(info, dummy_inputs, *args, **kwargs):
        processor = base_factory(info, dummy_inputs, *args, **kwargs)
        original = processor._get_prompt_updates
        # Built in the front-end process before the engine core starts: a bad config fails here, with
        # its own message, instead of as a failed engine core.
        hf_config = info.get_hf_config()
        reducer = engine_reducer(hf_config, _family_of(hf_config))
        if _family_of(hf_config) in ONE_DIM_FAMILIES:
            enable_position_ids(hf_config)

        def get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
            updates = original(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
            if reducer is None:
                return updates
            return [_reduced_update(u, reducer, hf_config, out_mm_kwargs) for u in updates]

        processor._get_prompt_updates = get_prompt_updates
        return processor

    return build


def _family_of(hf_config: Any) -> str:
    return str(getattr(hf_config, "model_type", ""))


def _reduced_update(update, reducer: EngineReducer, hf_config, out_mm_kwargs):
    original = update.replacement
    modality = update.modality

    def replacement(item_idx: int):
        tokens = original(item_idx) if callable(original) else original
        if not reducer.acts_on(modality):
            return tokens
        full = getattr(tokens, "full", tokens)
        if not isinstance(full, list | tuple) or len(set(full)) != 1:
            raise RuntimeError(
                f"tokenreduce: cannot reduce the {modality} placeholders of {_family_of(hf_config)} in vLLM: "
                "they are not one repeated token"
            )
        layout = item_layout(hf_config, modality, out_mm_kwargs[modality][item_idx], len(full))
        if layout.num_tokens != len(full):
            raise RuntimeError(
                f"tokenreduce: the {modality} layout of {_family_of(hf_config)} has {layout.num_tokens} tokens, "
                f"vLLM's prompt {len(full)} placeholders; this checkpoint's packing is not supported"
            )
        return [full[0]] * reducer.count(layout)

    return dataclasses.replace(update, replacement=replacement)


def _item_field(item: Any, key: str) -> Any:
    value = item.get(key)
    return getattr(value, "data", value)


def item_layout(hf_config: Any, modality: str, item: Mapping[str, Any] | None, num_tokens: int) -> TokenLayout:
    """Layout of one processed item, from the same adapter code the transformers path uses."""
    family = _family_of(hf_config)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        grid = torch.as_tensor(_item_field(item, f"{modality}_grid_thw")).reshape(1, 3)
        return qwen_layouts(hf_config, modality, grid)[0]
    if family == "llava":
        return llava_layout(hf_config, num_tokens)
    if family in ANYRES_ADAPTERS and modality == "image":
        sizes = _item_field(item, "image_sizes")
        if sizes is None:
            raise _embeds_error(family)
        return anyres_image_layout(hf_config, sizes)
    if family == "llava_onevision":
        frames = _item_field(item, "pixel_values_videos")
        return onevision_video_layout(hf_config, int(frames.shape[0]))
    raise ValueError(f"tokenreduce: no vLLM layout for family {family!r}")


def qwen_layouts(hf_config: Any, modality: str, grid_thw: torch.Tensor) -> list[TokenLayout]:
    adapter = (Qwen2_5_VLAdapter if _family_of(hf_config) == "qwen2_5_vl" else Qwen2VLAdapter).from_config(hf_config)
    return adapter.layouts(modality, {f"{modality}_grid_thw": grid_thw})


def llava_layout(hf_config: Any, num_tokens: int) -> TokenLayout:
    side = hf_config.vision_config.image_size
    pixels = torch.empty(1, 3, side, side, device="meta")
    return LlavaAdapter.from_config(hf_config).layouts("image", {"pixel_values": pixels}, [num_tokens])[0]


class _Packing:
    """A transformers model's anyres packing (unpadding, OneVision's anyres_max downsampling, newline slots)
    on a config alone: ``pack_image_features`` reads nothing else of the model. The adapters' anyres layouts
    run it."""

    def __init__(self, config: Any, pack):
        self.config, self._pack = config, pack

    def pack_image_features(self, *args, **kwargs):
        return self._pack(self, *args, **kwargs)


# Family -> its adapter and the transformers model whose packing the layouts read.
ANYRES_ADAPTERS = {
    "llava_next": (LlavaNextAdapter, LlavaNextModel),
    "llava_onevision": (LlavaOnevisionAdapter, LlavaOnevisionModel),
}
# vLLM packs OneVision images with its merge function's default ``vision_aspect_ratio`` (anyres_max_9),
# whatever the config says; the layouts follow what vLLM feeds.
ONEVISION_ASPECT_RATIO = inspect.signature(
    LlavaOnevisionForConditionalGeneration._merge_image_patch_embeddings
).parameters["vision_aspect_ratio"].default
_ANYRES: dict[int, tuple[Any, Any, dict]] = {}
_ANYRES_MEMO = 1024  # layouts remembered per config (image sizes), oldest dropped first


def anyres_image_layout(hf_config: Any, image_size: Any) -> TokenLayout:
    """Layout of one anyres image (LLaVA-NeXT, LLaVA-OneVision) of ``image_size`` (height, width) as vLLM
    packs it: the transformers adapter's own anyres layout (every image patched, as vLLM does even with
    several images per prompt)."""
    size = tuple(int(v) for v in torch.as_tensor(image_size).flatten().tolist())
    entry = _ANYRES.get(id(hf_config))
    if entry is None or entry[0] is not hf_config:
        adapter_cls, model_cls = ANYRES_ADAPTERS[_family_of(hf_config)]
        adapter = adapter_cls.from_config(hf_config)
        adapter.inner = _Packing(hf_config, model_cls.pack_image_features)
        entry = _ANYRES[id(hf_config)] = (hf_config, adapter, {})
    _, adapter, memo = entry
    if size not in memo:
        if len(memo) >= _ANYRES_MEMO:
            memo.pop(next(iter(memo)))
        inputs = {"image_sizes": torch.tensor([size]), "vision_aspect_ratio": ONEVISION_ASPECT_RATIO}
        memo[size] = adapter.layouts("image", inputs)[0]
    return memo[size]


def _embeds_error(family: str) -> ValueError:
    return ValueError(f"tokenreduce: {family} images given as embeddings (`image_embeds`) cannot be reduced in "
                      "vLLM (their anyres layout is unknown); pass the images")


def onevision_video_layout(hf_config: Any, frames: int) -> TokenLayout:
    side = hf_config.vision_config.image_size
    pixels = torch.empty(1, frames, 3, side, side, device="meta")
    return LlavaOnevisionAdapter.from_config(hf_config)._video_layouts({"pixel_values_videos": pixels})[0]


class _ReducingMixin:
    """What every reducing model class shares: the reducer, built (and validated) at engine start."""

    _tokenreduce_family = ""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._tr = engine_reducer(vllm_config.model_config.hf_config, self._tokenreduce_family)
        self._tr_pending = None
        self._tr_method = self._tr_stage = None
        if self._tr is not None and self._tr.reads_tower:
            self._attach_tower_method()

    def _attach_tower_method(self) -> None:
        """This model's own method instance, attached to a vision stage on vLLM's tower (as ``tr.wrap``
        attaches it to the transformers tower)."""
        vision = self.config.vision_config
        tower = VllmTower(self.vision_tower, int(vision.num_hidden_layers))
        handle = _HandleView(_adapter_view(self._tokenreduce_adapter, self.config, tower), None)
        handle.method = self._tr.new_method()
        stage = VisionStage(handle, tower, handle.method.vision_layer)
        handle.vision_stage = stage
        stage.attach()
        handle.method.attach(handle)
        self._tr_method, self._tr_stage = handle.method, stage

    def _encode(self, encode, kwargs):
        """``encode(**kwargs)`` with the vision stage's capture on while the tower runs."""
        stage = self._tr_stage
        if stage is None:
            return encode(**kwargs)
        stage.discard()
        stage.set_enabled(True)
        try:
            return encode(**kwargs)
        finally:
            stage.set_enabled(False)

    def _reduce_items(self, embeds: Sequence[torch.Tensor], layouts: Sequence[TokenLayout]):
        if len(embeds) != len(layouts):
            raise RuntimeError(f"tokenreduce: {len(embeds)} encoder outputs for {len(layouts)} items")
        signals = [None] * len(layouts)
        if self._tr_stage is not None:
            signals = self._tr_stage.signals(layouts[0].modality, list(layouts)) if layouts else []
        return [self._tr.reduce(e, lay, self._tr_method, sig) for e, lay, sig in zip(embeds, layouts, signals)]


class _PositionCarrying(_ReducingMixin):
    """Kept tokens at their original positions: offsets ride in the embeddings from the encoder to ``forward``.

    Subclasses give every item's layout (``_items``), each token's offset from the item's origin
    (``_offsets``) and the positions of the unreduced prompt (``_full_positions``).
    """

    def _with_offsets(self, embeds, items):
        reductions = self._reduce_items(embeds, [lay for lay, _ in items])
        out = []
        for e, (lay, factor), red in zip(embeds, items, reductions):
            feats = red.output_features(e)
            if self._tr.renumber:
                offsets = torch.zeros(red.num_tokens, 3, dtype=torch.long)
            else:
                offsets = self._offsets(lay, factor)[red.sources.cpu()]
            out.append(torch.cat([feats, encode_positions(offsets, feats.dtype).to(feats.device)], dim=1))
        return tuple(out)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None, **kwargs):
        self._tr_pending = None
        if self._tr is None or multimodal_embeddings is None or len(multimodal_embeddings) == 0:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)
        feats = [e[:, :-POSITION_CHANNELS] for e in multimodal_embeddings]
        offsets = torch.cat([decode_positions(e[:, -POSITION_CHANNELS:]) for e in multimodal_embeddings])
        self._tr_pending = (is_multimodal, offsets)
        return super().embed_input_ids(input_ids, feats, is_multimodal=is_multimodal, **kwargs)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        pending, self._tr_pending = self._tr_pending, None
        if pending is not None and inputs_embeds is not None and positions.dim() == 2:
            mask, offsets = pending
            n = positions.shape[1]
            mask = mask[:n].to(positions.device)
            count = offsets.shape[0]
            require(mask.sum() == count, lambda: (
                f"tokenreduce: {count} visual tokens carry positions, the step holds {int(mask.sum())}"), RuntimeError)
            index = torch.nonzero_static(mask, size=count).view(-1)  # the count is known: no host wait
            positions = positions.clone()
            positions[:, index] += offsets.t().to(positions)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def _reduced_positions(self, length: int, mm_features, full_sizes: list[int]):
        """Positions of the reduced prompt: text at its original positions, each placeholder at its item's
        origin (``forward`` adds the kept token's offset); and the decode delta."""
        if self._tr.renumber:
            if not any(self._tr.acts_on(f.modality) for f in mm_features):
                # Nothing in this prompt is reduced: it keeps the plain model's positions, as with tr.wrap
                # (carried offsets are zero when renumbering).
                positions, delta = self._full_positions(length, mm_features, with_delta=True)
                return torch.as_tensor(positions), int(delta)
            return torch.arange(length).expand(3, -1).clone(), 0
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        shifted, shift, spans = [], 0, []
        for f, n in zip(features, full_sizes):
            start, m = f.mm_position.offset, f.mm_position.length
            spans.append((start, m, n))
            shifted.append(dataclasses.replace(f, mm_position=dataclasses.replace(f.mm_position, offset=start + shift, length=n)))
            shift += n - m
        full = torch.as_tensor(self._full_positions(length + shift, shifted))
        original_column = torch.arange(length)
        for start, m, n in spans:
            original_column[start + m :] += n - m
        positions = full[:, original_column]
        for start, m, _ in spans:
            origin = int(original_column[start])
            positions[:, start : start + m] = full[:, origin : origin + 1]
        return positions, int(full.max()) + 1 - length


# ----- Qwen2-VL / Qwen2.5-VL ---------------------------------------------------------------------------
class _QwenReducing(_PositionCarrying):
    def _qwen_items(self, kwargs: dict[str, Any]) -> list[tuple[TokenLayout, float]]:
        """Every item's layout and temporal factor, in the order ``embed_multimodal`` returns them."""
        parsed = self._parse_and_validate_multimodal_inputs(**kwargs)
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        out = []
        for key, inp in parsed.items():
            if inp is None:
                continue
            modality = "image" if key.startswith("image") else "video"
            grid = inp[f"{modality}_grid_thw"]
            layouts = qwen_layouts(self.config, modality, grid)
            seconds = inp.get("second_per_grid_ts") if modality == "video" else None
            if modality == "video" and seconds is None:
                seconds = kwargs.get("second_per_grid_ts")
            for i, lay in enumerate(layouts):
                factor = 1.0
                if modality == "video" and seconds is not None:
                    factor = float(torch.as_tensor(seconds).flatten()[i]) * tokens_per_second
                out.append((lay, factor))
        return out

    def embed_multimodal(self, **kwargs: object):
        embeds = super().embed_multimodal(**kwargs)
        if self._tr is None or len(embeds) == 0:
            return embeds
        return self._with_offsets(embeds, self._qwen_items(kwargs))

    def _offsets(self, layout: TokenLayout, factor: float) -> torch.Tensor:
        return grid_offsets(layout, factor)

    def _full_positions(self, length: int, features, with_delta: bool = False):
        positions, delta = super().get_mrope_input_positions([0] * length, features)
        return (positions, delta) if with_delta else positions

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if self._tr is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        sizes = [
            qwen_layouts(self.config, f.modality, torch.as_tensor(f.data[f"{f.modality}_grid_thw"].data).reshape(1, 3))[0].num_tokens
            for f in sorted(mm_features, key=lambda f: f.mm_position.offset)
        ]
        return self._reduced_positions(len(input_tokens), mm_features, sizes)


def grid_offsets(layout: TokenLayout, t_factor: float = 1.0) -> torch.Tensor:
    """``[N, 3]`` t/h/w offset of every token of a Qwen item from its origin, as vLLM numbers them."""
    t, h, w = len(layout.segments), layout.segments[0].rows, layout.segments[0].cols
    grid = np.indices((t, h, w))
    if t_factor != 1.0:
        grid[0] = (grid[0] * t_factor).astype(np.int64)
    return torch.from_numpy(grid.reshape(3, -1).T.copy()).long()


def _register(cls, base):
    factories = base._processor_factory
    return MULTIMODAL_REGISTRY.register_processor(
        _reducing_processor(factories.processor), info=factories.info, dummy_inputs=factories.dummy_inputs
    )(cls)


class Qwen2VLReduced(_QwenReducing, Qwen2VLForConditionalGeneration):
    """Qwen2-VL with tokenreduce's fixed-count methods."""

    _tokenreduce_family = "qwen2_vl"


class Qwen2_5_VLReduced(_QwenReducing, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with tokenreduce's fixed-count methods (not together with vLLM's own EVS pruning)."""

    _tokenreduce_family = "qwen2_5_vl"

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if self._tr is not None and self.is_multimodal_pruning_enabled:
            raise ValueError(
                "tokenreduce: `video_pruning_rate` (vLLM's EVS) cannot be combined with a tokenreduce method; "
                "drop one of them"
            )


# ----- 1-D rotary families: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision -------------------------------------------
ONE_DIM_FAMILIES = ("llava", "llava_next", "llava_onevision")


def enable_position_ids(hf_config: Any) -> None:
    """Let an engine with a reducer give a 1-D RoPE family arbitrary position ids.

    vLLM numbers a 1-D family's prompt consecutively; its M-RoPE path takes positions from the model. An
    M-RoPE section list in the text config routes the family through that path; the model gives the three
    rows the same positions, which makes M-RoPE exactly the 1-D rotary embedding. Called in the front-end
    (before the engine core starts) and again when the model is built; idempotent.
    """
    if getattr(hf_config, HF_CONFIG_KEY, None) is None:
        return
    text = hf_config.get_text_config()
    rope = dict(getattr(text, "rope_parameters", None) or {})
    if "mrope_section" in rope:
        return
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    half = head_dim // 2
    rope.setdefault("rope_type", "default")
    rope["mrope_section"] = [half - 2 * (half // 4), half // 4, half // 4]
    text.rope_parameters = rope


class _OneDimPositions(_PositionCarrying):
    """1-D families: the three M-RoPE rows all hold the token's 1-D position."""

    supports_mrope = True

    def __init__(self, *, vllm_config, prefix: str = ""):
        enable_position_ids(vllm_config.model_config.hf_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)

    def _offsets(self, layout: TokenLayout, factor: float) -> torch.Tensor:
        return torch.arange(layout.num_tokens)[:, None].expand(-1, 3)

    def _full_positions(self, length: int, features, with_delta: bool = False):
        positions = torch.arange(length).expand(3, -1)
        return (positions, 0) if with_delta else positions

    def get_mrope_input_positions(self, input_tokens, mm_features):
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        sizes = [self._full_size(f) for f in features]
        return self._reduced_positions(len(input_tokens), features, sizes)


# transformers 5.24 saves a CLIP / SigLIP tower as ``vision_tower.embeddings.*``; vLLM's towers read
# ``vision_tower.vision_model.embeddings.*``.
TOWER_NAMES = {
    f"vision_tower.{part}.": f"vision_tower.vision_model.{part}."
    for part in ("embeddings", "encoder", "pre_layrnorm", "post_layernorm", "head")
}


class LlavaReduced(_OneDimPositions, LlavaForConditionalGeneration):
    """LLaVA-1.5 with tokenreduce's fixed-count methods."""

    _tokenreduce_family = "llava"
    _tokenreduce_adapter = LlavaAdapter
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={**TOWER_NAMES, **LlavaForConditionalGeneration.hf_to_vllm_mapper.orig_to_new_prefix}
    )

    def embed_multimodal(self, **kwargs: object):
        embeds = self._encode(super().embed_multimodal, kwargs)
        if self._tr is None or len(embeds) == 0:
            return embeds
        return self._with_offsets(embeds, [(llava_layout(self.config, int(e.shape[0])), 1.0) for e in embeds])

    def _full_size(self, feature) -> int:
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        return side * side + int(self.config.vision_feature_select_strategy == "full")


class LlavaOnevisionReduced(_OneDimPositions, LlavaOnevisionForConditionalGeneration):
    """LLaVA-OneVision with tokenreduce's fixed-count methods: anyres images and videos."""

    _tokenreduce_family = "llava_onevision"
    _tokenreduce_adapter = LlavaOnevisionAdapter
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            **TOWER_NAMES, **LlavaOnevisionForConditionalGeneration.hf_to_vllm_mapper.orig_to_new_prefix,
        }
    )

    def embed_multimodal(self, **kwargs: object):
        if self._tr is None:
            return super().embed_multimodal(**kwargs)
        # vLLM's own loop over the modalities, in the order of the inputs; a tower-reading method's vision
        # stage captures the videos' tower pass only (the images pass through).
        out = ()
        for modality, inp in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality == "video":
                embeds = self._encode(self._process_video_pixels, {"inputs": inp})
                layouts = [onevision_video_layout(self.config, int(v.shape[0])) for v in inp["pixel_values_videos"]]
            else:
                embeds = self._process_image_input(inp)
                layouts = _anyres_layouts(self.config, inp)
            out += self._with_offsets(tuple(embeds), [(lay, 1.0) for lay in layouts])
        return out

    def _full_size(self, feature) -> int:
        if not self._tr.acts_on(feature.modality):
            return feature.mm_position.length
        if feature.modality == "image":
            return anyres_image_layout(self.config, feature.data["image_sizes"].data).num_tokens
        frames = feature.data["pixel_values_videos"].data
        return onevision_video_layout(self.config, int(frames.shape[0])).num_tokens


class LlavaNextReduced(_OneDimPositions, LlavaNextForConditionalGeneration):
    """LLaVA-NeXT with tokenreduce's fixed-count methods (anyres images)."""

    _tokenreduce_family = "llava_next"
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={**TOWER_NAMES, **LlavaNextForConditionalGeneration.hf_to_vllm_mapper.orig_to_new_prefix}
    )

    def embed_multimodal(self, **kwargs: object):
        embeds = super().embed_multimodal(**kwargs)
        if self._tr is None or len(embeds) == 0:
            return embeds
        layouts = _anyres_layouts(self.config, self._parse_and_validate_image_input(**kwargs))
        return self._with_offsets(embeds, [(lay, 1.0) for lay in layouts])

    def _full_size(self, feature) -> int:
        if not self._tr.acts_on(feature.modality):
            return feature.mm_position.length
        return anyres_image_layout(self.config, feature.data["image_sizes"].data).num_tokens


def _anyres_layouts(hf_config: Any, inp: Any) -> list[TokenLayout]:
    """The layouts of a batch's anyres images (vLLM's parsed image input), in order."""
    if inp.get("type") == "image_embeds":
        raise _embeds_error(_family_of(hf_config))
    sizes = inp.get("image_sizes")
    if sizes is None:  # as vLLM's own default: the tower's input size
        side = hf_config.vision_config.image_size
        sizes = [(side, side)] * len(inp["pixel_values"])
    return [anyres_image_layout(hf_config, size) for size in sizes]


Qwen2VLReduced = _register(Qwen2VLReduced, Qwen2VLForConditionalGeneration)
LlavaOnevisionReduced = _register(LlavaOnevisionReduced, LlavaOnevisionForConditionalGeneration)
Qwen2_5_VLReduced = _register(Qwen2_5_VLReduced, Qwen2_5_VLForConditionalGeneration)
LlavaReduced = _register(LlavaReduced, LlavaForConditionalGeneration)
LlavaNextReduced = _register(LlavaNextReduced, LlavaNextForConditionalGeneration)

ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": Qwen2VLReduced,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLReduced,
    "LlavaForConditionalGeneration": LlavaReduced,
    "LlavaOnevisionForConditionalGeneration": LlavaOnevisionReduced,
    "LlavaNextForConditionalGeneration": LlavaNextReduced,
}
