"""Model-family adapters: where visual tokens come from and how inputs are rebuilt around them.

An adapter knows, for one family of transformers VLMs: the placeholder token of each modality, the inner
``get_image_features`` / ``get_video_features`` that produce the per-item visual tokens, the layout of
those tokens (crops, frames, newline slots), the original position ids of the sequence, the form in which
``forward`` accepts precomputed features (``mm_encoder_outputs``), and where the decoder layers are.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tokenreduce.core.hostsync import host_only
from tokenreduce.core.layout import TokenLayout
from tokenreduce.core.sequence import rope_positions, text_positions

from .towers import find_tower

# Input keys that carry pixels, per modality (generate encodes and then drops them).
PIXEL_KEYS = {"image": ("pixel_values",), "video": ("pixel_values_videos",)}


class Adapter:
    """Base adapter; one subclass per family, chosen by ``config.model_type``."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ("image",)
    # Stages (of tokenreduce.core.registry.STAGES) whose methods this family runs; wrap refuses the others.
    stages: tuple[str, ...] = ()
    is_vlm = True
    # Rotary axes of the text model's position ids: 1 (``[B, L]``), or 3 for M-RoPE (``[3, B, L]``: t/h/w).
    # The sequence edits (tokenreduce.core.sequence.rope_positions) give new positions to every axis.
    position_axes: int = 1
    # Modalities whose layouts read a size tensor that the encoder reads again (anyres ``image_sizes``): the
    # core encodes them itself, with the host copy, even when it reduces nothing before the LLM.
    host_read_modalities: frozenset[str] = frozenset()

    def __init__(self, model: nn.Module):
        self.model = model
        self.inner = model.model
        self.config = model.config

    @classmethod
    def from_config(cls, config: Any) -> Adapter:
        """An adapter of this family with no model behind it: what reads only the config works (placeholder
        ids, the layouts of LLaVA, Qwen and OneVision videos); what needs the model does not (anyres image
        packing). Serving engines (the vLLM plugin) use it."""
        adapter = cls.__new__(cls)
        adapter.model = adapter.inner = None
        adapter.config = config
        return adapter

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        """Whether ``model`` is the generation model of the family (what ``wrap`` must be given)."""
        inner = getattr(model, "model", None)
        return inner is not None and hasattr(inner, "get_image_features") and hasattr(model, "generate")

    # ----- calling convention ------------------------------------------------------------------------
    # transformers' VLMs take one placeholder per visual token and precomputed features through
    # ``mm_encoder_outputs``; families with another convention (e.g. remote-code models with one
    # placeholder per crop) translate in these three hooks.
    def attach(self, handle: Any) -> None:
        """Install family-specific patches or hooks through ``handle`` (undone on unwrap). Default: none."""

    def expand_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The caller's inputs with ONE placeholder per visual token (the core's convention). Default: as is."""
        return inputs

    def finalize_inputs(self, inputs: dict[str, Any], batch: Any) -> dict[str, Any]:
        """The rebuilt inputs (reduced ids, positions, ``mm_encoder_outputs``) in the form the model's
        ``forward`` / ``generate`` take; ``batch`` is the handle's :class:`~tokenreduce.core.handle.BatchInfo`
        of this call (``handle.current`` while the call runs: hooks installed by :meth:`attach` can tell
        their call's state by it). Default: as is."""
        return inputs

    # ----- tokens ------------------------------------------------------------------------------------
    def placeholder_id(self, modality: str) -> int:
        attr = {"image": "image_token_id", "video": "video_token_id"}[modality]
        value = getattr(self.config, attr, None)
        if value is None:
            value = getattr(self.config, attr.replace("_id", "_index"))
        return int(value)

    # ----- encoding ----------------------------------------------------------------------------------
    def encoder_fn(self, modality: str):
        return getattr(self.inner, f"get_{modality}_features")

    def encoder_keys(self, modality: str) -> frozenset[str]:
        """Input names the encoder of ``modality`` consumes (dropped once features are precomputed); read
        from its signature once per encoder function."""
        fn = self.encoder_fn(modality)
        key = (modality, getattr(fn, "__func__", fn))
        cache = self.__dict__.setdefault("_encoder_keys", {})
        keys = cache.get(key)
        if keys is None:
            params = inspect.signature(fn).parameters
            keys = frozenset(k for k, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
            cache[key] = keys
        return keys

    def has_pixels(self, modality: str, inputs: dict[str, Any]) -> bool:
        return any(inputs.get(k) is not None for k in PIXEL_KEYS[modality])

    def encode(self, modality: str, inputs: dict[str, Any]) -> list[torch.Tensor]:
        """Per-item ``[N_i, D]`` visual tokens, exactly as the unwrapped model computes them."""
        fn = self.encoder_fn(modality)
        kwargs = self.encoder_kwargs(modality, {k: inputs[k] for k in self.encoder_keys(modality) if k in inputs})
        out = fn(**kwargs, return_dict=True)
        return self.unpack(modality, out.pooler_output)

    def encoder_kwargs(self, modality: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The encoder's arguments as the encoder is called with them; families whose encoder reads a size
        tensor on the host hand it the host copy the layouts read (one read of the device instead of two).
        Default: as given."""
        return kwargs

    def unpack(self, modality: str, pooler_output: Any) -> list[torch.Tensor]:
        """Normalise an encoder's ``pooler_output`` (list or batched tensor) to a list of ``[N_i, D]``."""
        if isinstance(pooler_output, torch.Tensor):
            if pooler_output.dim() == 2:
                return [pooler_output]
            return list(pooler_output.unbind(0))
        return [t.reshape(-1, t.shape[-1]) for t in pooler_output]

    def pack(self, modality: str, features: Sequence[torch.Tensor]) -> BaseModelOutputWithPooling:
        """Wrap per-item features the way ``forward(mm_encoder_outputs=...)`` of this family reads them."""
        return BaseModelOutputWithPooling(pooler_output=list(features))

    def layouts(self, modality: str, inputs: dict[str, Any], counts: Sequence[int]) -> list[TokenLayout]:
        """Layout of every item; ``counts`` are the token counts the encoder produced (a cross-check)."""
        return [TokenLayout.flat(modality, n) for n in counts]

    # ----- vision tower --------------------------------------------------------------------------------
    @property
    def tower(self):
        """The vision tower as a :class:`~tokenreduce.adapters.towers.Tower`, or None if unsupported."""
        module = getattr(self.inner, "vision_tower", None)
        return None if module is None else find_tower(module)

    def token_signals(self, modality: str, layouts: Sequence[TokenLayout], per_patch: torch.Tensor) -> list[torch.Tensor]:
        """Map per-patch tower signals ``[R, P, ...]`` (one row per tower image, prefix tokens removed) onto
        each item's LLM tokens, ``[N_i, ...]``; slots with no patch (newline, CLS) get NaN.

        Layouts may carry ``extra["tower_rows"]`` (tower images per item, default 1) and
        ``extra["patch_source"]`` (``[N, 2]`` tower row within the item and patch index); without it the
        item's content tokens are its first tower row's patches in order.
        """
        out, row = [], 0
        for layout in layouts:
            rows = int(layout.extra.get("tower_rows", 1))
            maps = per_patch[row : row + rows]
            source = layout.extra.get("patch_source")
            if source is None:
                source = default_patch_source(layout)
            source = source.to(per_patch.device)
            valid = (source[:, 0] >= 0) & (source[:, 1] < maps.shape[1])
            values = maps[source[:, 0].clamp_min(0), source[:, 1].clamp(0, maps.shape[1] - 1)].float()
            values = values.masked_fill(~valid.view(-1, *(1,) * (values.dim() - 1)), float("nan"))
            out.append(values)
            row += rows
        return out

    # ----- positions ---------------------------------------------------------------------------------
    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, inputs: dict[str, Any]):
        """Position ids of the original sequence: ``[B, L]`` (``[3, B, L]`` for M-RoPE families)."""
        return text_positions(attention_mask)

    def text_positions_in_generate(self, inputs: dict[str, Any]) -> bool:
        """Whether the plain model's ``generate`` would give these inputs plain text positions instead of
        :meth:`position_ids` (Qwen without ``mm_token_type_ids``). Default: no."""
        return False

    def format_positions(self, positions: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Turn gathered positions into the ``position_ids`` argument ``forward``/``generate`` take."""
        return positions

    def sequential_positions(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Consecutive positions for a (reduced) sequence, in the layout of :meth:`position_ids`."""
        return rope_positions(text_positions(attention_mask), self.position_axes)

    # ----- language model ----------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self.inner.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def text_config(self):
        return self.config.get_text_config()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner.get_input_embeddings()(input_ids)

    def describe(self) -> str:
        return f"{self.name} ({type(self.model).__name__})"


def default_patch_source(layout: TokenLayout) -> torch.Tensor:
    """Tower row 0's patches in order for content tokens; ``-1`` for newline slots and CLS segments."""
    with host_only():  # a table built from the layout, on the host
        source = torch.full((layout.num_tokens, 2), -1, dtype=torch.long)
        content = layout.content_mask.clone()
        for seg, sl in zip(layout.segments, layout.segment_slices()):
            if seg.kind == "cls":
                content[sl] = False
        source[content, 0] = 0
        source[content, 1] = torch.arange(int(content.sum()))
    return source
