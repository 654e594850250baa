"""mPLUG-DocOwl 1.5 (remote code ``MPLUGDocOwlLlamaForCausalLM``, ``model_type="mplug_docowl"``).

How DocOwl 1.5 reads a page (X-PLUG/mPLUG-DocOwl, ``DocOwl1.5/mplug_docowl``): the processor resizes the
page to a grid of up to 9 crops of 448 px (shape-adaptive anchors) and adds a global 448-px view first;
``images`` holds every crop of the batch ``[C, 3, 448, 448]`` and ``patch_positions [C, 2]`` their
``(row, col)`` in the crop grid, the global view marked ``(A, A)`` with ``A`` the largest anchor
dimension. ``input_ids`` hold ONE ``IMAGE_TOKEN_INDEX`` (-200) per crop (with textual crop indicators
such as ``<crop_img_row0_col1>`` between them). ``encode_images`` runs the ViT-L/14 (CLS + 32x32 patches,
``model.model.vision_model``) and the H-Reducer (``model.model.vision2text``: a 1x4 conv over each crop's
32x32 grid, a second 1x4 conv, an FC to the LLM width, and a learned ``vit_eos`` token) into 257 tokens
per crop; ``prepare_inputs_labels_for_multimodal`` splices them into the embeddings and marks them with
``modality_indicators`` (the modality-adaptive LLaMA uses separate K/V projections and norms for them).

**Where tokens are reduced: after the H-Reducer.** The H-Reducer's convolutions need every crop's full
32x32 grid (each output token is a learned mix of a 1x4 patch window), so ViT tokens sampled out of the
grid would have to be re-padded with values the H-Reducer never saw; TCC's text puts its compressor before
the "Vision-to-Text module" but does not say how it feeds a sparse grid through it. Reducing the 256
H-Reducer tokens per crop instead keeps the model's computation exact up to the LLM, costs the LLM the
same per kept token, and still lets methods read the ViT: the tower's per-patch signals (attention,
keys, hidden states) are averaged over each token's 1x4 patch window (:meth:`DocOwlAdapter.token_signals`).

The core's convention (one placeholder per visual token, precomputed features through
``mm_encoder_outputs``, explicit ``position_ids``) is translated in three hooks:

* :meth:`~DocOwlAdapter.expand_inputs` repeats each crop's placeholder 257 times (mask and labels along);
* :meth:`~DocOwlAdapter.finalize_inputs` hands the reduced ``input_ids`` (one placeholder per kept token)
  to DocOwl's own ``forward`` / ``generate`` and parks the reduced features and positions on the call;
* :meth:`~DocOwlAdapter.attach` patches the instance's ``prepare_inputs_labels_for_multimodal`` to splice
  those features at the placeholders (``modality_indicators`` = 1 there), and hooks the LLaMA model to
  give kept tokens their original positions, in prefill and in every decode step.

An image is a global view plus its crops; images are told apart with ``patch_positions`` (a global view
``(A, A)`` starts an image, and so does a crop ``(0, 0)`` not preceded by a global view). Layout: one
``"base"`` segment (global view) or ``"crop"`` segment (``crop_index`` = its cell) of ``32 x 8`` tokens per
crop, each followed by its ``vit_eos`` as a lone newline slot. Vision-, projector- and decode-stage methods
are supported (in-LLM methods need the LLM's attention internals, which DocOwl's multiway layers change).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from tokenreduce.core.layout import Segment, TokenLayout
from tokenreduce.core.sequence import (
    IGNORE_INDEX,
    cache_length,
    continued_positions,
    gather_columns,
    next_positions,
    repeat_index,
)

from .base import Adapter
from .towers import BlockParts, Tower, _identity

IMAGE_TOKEN_INDEX = -200


class MplugOwlTower(Tower):
    """DocOwl's ``MplugOwlVisionModel``: CLS + patches, fused per-head ``query_key_value``."""

    kind = "mplug_owl"

    @property
    def blocks(self):
        return list(self.module.encoder.layers)

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    def parts(self, block):
        attn = block.self_attn
        heads = attn.num_heads

        def qkv(h):
            b, n, _ = h.shape
            mixed = attn.query_key_value(h).reshape(b, n, heads, 3, -1)
            q, k, v = mixed.permute(3, 0, 2, 1, 4).unbind(0)
            return q, k, v

        return BlockParts(block.input_layernorm, qkv, attn.dense, _identity, block.post_attention_layernorm,
                          block.mlp, _identity, attn.scale)

    def attention_input_module(self, block):
        return block.self_attn


class DocOwlAdapter(Adapter):
    name = "docowl"
    model_types = ("mplug_docowl",)
    modalities = ("image",)
    # No llm stage: in-LLM pruning would have to follow DocOwl's multiway LLaMA layers.
    stages = ("vision", "projector", "decode")

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        inner = getattr(model, "model", None)
        return (inner is not None and hasattr(inner, "vision_model") and hasattr(inner, "vision2text")
                and hasattr(model, "encode_images") and hasattr(model, "prepare_inputs_labels_for_multimodal")
                and hasattr(model, "generate"))

    # ----- geometry ----------------------------------------------------------------------------------
    @property
    def _visual(self) -> dict[str, Any]:
        return self.config.visual_config

    @property
    def patch_side(self) -> int:
        """Patches per side of one crop (448 / 14 = 32)."""
        vis = self._visual["visual_model"]
        return int(vis.get("image_size", 448)) // int(vis.get("patch_size", 14))

    @property
    def conv_shape(self) -> tuple[int, int]:
        """The H-Reducer's window ``(rows, cols)`` (``"1x4"``)."""
        h, w = str(self._visual["visual_hreducer"].get("conv_shape", "1x4")).split("x")
        return int(h), int(w)

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid of one crop after the H-Reducer (32 x 8)."""
        ch, cw = self.conv_shape
        return self.patch_side // ch, self.patch_side // cw

    @property
    def tokens_per_crop(self) -> int:
        """Tokens one crop's placeholder stands for: the reduced grid plus ``vit_eos`` (257)."""
        rows, cols = self.grid
        return rows * cols + 1

    # ----- tokens and encoding -----------------------------------------------------------------------
    def placeholder_id(self, modality: str) -> int:
        return IMAGE_TOKEN_INDEX

    def has_pixels(self, modality: str, inputs: dict[str, Any]) -> bool:
        return inputs.get("images") is not None

    def encoder_keys(self, modality: str) -> set[str]:
        return {"images", "patch_positions"}

    def _images(self, inputs: dict[str, Any]) -> torch.Tensor:
        images = inputs["images"]
        if isinstance(images, (list, tuple)) or images.dim() == 5:
            images = torch.cat(list(images), dim=0)
        return images

    def crop_table(self, inputs: dict[str, Any], num_crops: int) -> tuple[list[list[int]], list[bool]]:
        """Crop indices of every image (in order) and, per crop, whether it is a global view.

        A crop at ``(A, A)`` is a global view when ``A > 0`` exceeds every coordinate of the other crops
        (the processor's ``anchor_max``); an image starts at a global view, or at a ``(0, 0)`` crop that
        does not follow one. Without ``patch_positions`` every crop is an image of its own.
        """
        positions = inputs.get("patch_positions")
        if positions is None:
            return [[c] for c in range(num_crops)], [False] * num_crops
        pos = [tuple(int(v) for v in p) for p in torch.as_tensor(positions).reshape(-1, 2).tolist()]
        if len(pos) != num_crops:
            raise ValueError(f"docowl: `patch_positions` has {len(pos)} rows for {num_crops} crops in `images`")
        top = max(max(p) for p in pos)
        others = [v for p in pos if p != (top, top) for v in p]
        is_global = [p == (top, top) and top > 0 and all(v < top for v in others) for p in pos]
        groups: list[list[int]] = []
        for c, p in enumerate(pos):
            if not groups or is_global[c] or (p == (0, 0) and not is_global[c - 1]):
                groups.append([c])
            else:
                groups[-1].append(c)
        return groups, is_global

    def encode(self, modality: str, inputs: dict[str, Any]) -> list[torch.Tensor]:
        images = self._images(inputs)
        features = self.model.encode_images(images, inputs.get("patch_positions"))  # [C, 257, D]
        groups, _ = self.crop_table(inputs, features.shape[0])
        return [features[g].reshape(-1, features.shape[-1]) for g in groups]

    def layouts(self, modality, inputs, counts=None) -> list[TokenLayout]:
        images = self._images(inputs)
        positions = inputs.get("patch_positions")
        pos = (torch.as_tensor(positions).reshape(-1, 2).tolist() if positions is not None
               else [[0, 0]] * images.shape[0])
        rows, cols = self.grid
        per_crop = rows * cols
        height, width = images.shape[-2:]
        groups, is_global = self.crop_table(inputs, images.shape[0])
        out = []
        for group in groups:
            cells = [tuple(int(v) for v in pos[c]) for c in group if not is_global[c]]
            grid = (max(p[0] for p in cells) + 1, max(p[1] for p in cells) + 1) if cells else (1, 1)
            segments, source = [], []
            for j, c in enumerate(group):
                if is_global[c]:
                    segments.append(Segment("base", rows, cols))
                else:
                    cell = (int(pos[c][0]), int(pos[c][1]))
                    segments.append(Segment("crop", rows, cols, crop_grid=grid, crop_index=cell))
                segments.append(Segment("newline", 1, 0, newline=True))
                source.append(torch.stack([torch.full((per_crop,), j), torch.arange(per_crop)], dim=1))
                source.append(torch.tensor([[-1, -1]]))
            layout = TokenLayout("image", tuple(segments), image_size=(grid[0] * height, grid[1] * width),
                                 extra={"tower_rows": len(group), "patch_source": torch.cat(source).long()})
            out.append(layout)
        return out

    def token_signals(self, modality, layouts, per_patch: torch.Tensor) -> list[torch.Tensor]:
        """Per-patch signals ``[R, 32*32, ...]`` averaged over each H-Reducer window, then mapped to tokens."""
        side = self.patch_side
        ch, cw = self.conv_shape
        r, p = per_patch.shape[:2]
        if p != side * side:
            raise ValueError(f"docowl: expected {side * side} patches per crop, got {p}")
        trailing = per_patch.shape[2:]
        grid = per_patch.float().reshape(r, side // ch, ch, side // cw, cw, *trailing)
        pooled = grid.mean(dim=(2, 4)).reshape(r, (side // ch) * (side // cw), *trailing)
        return super().token_signals(modality, layouts, pooled)

    @property
    def tower(self):
        return MplugOwlTower(self.inner.vision_model)

    # ----- the calling convention --------------------------------------------------------------------
    def expand_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """One placeholder per visual token: each crop's -200 repeated 257 times (mask value and label
        ``-100`` along); rows that grow unequally are left-padded."""
        ids = inputs.get("input_ids")
        if ids is None or not bool((ids == IMAGE_TOKEN_INDEX).any()):
            return inputs
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        labels = inputs.get("labels")
        placeholder = ids == IMAGE_TOKEN_INDEX
        index = repeat_index(torch.where(placeholder, self.tokens_per_crop, 1))
        pad = self.text_config.pad_token_id
        out = dict(inputs)
        out["input_ids"] = gather_columns(ids, index, 0 if pad is None else int(pad))
        out["attention_mask"] = gather_columns(mask, index, 0)
        if labels is not None:
            out["labels"] = gather_columns(torch.where(placeholder, IGNORE_INDEX, labels), index, IGNORE_INDEX)
        return out

    def finalize_inputs(self, inputs: dict[str, Any], batch: Any) -> dict[str, Any]:
        out = dict(inputs)
        packed = out.pop("mm_encoder_outputs", None) or {}
        positions = out.pop("position_ids")
        features = packed["image"].pooler_output if "image" in packed else []
        self._call = (batch, {
            "features": torch.cat(list(features)) if len(features) else None,
            "positions": positions,
            "next": next_positions(positions),
            "prefill": positions.shape[-1],
            "spliced": False,
        })
        return out

    def attach(self, handle: Any) -> None:
        model = self.model
        original = model.prepare_inputs_labels_for_multimodal
        names = list(inspect.signature(original).parameters)
        embed = self.inner.get_input_embeddings()

        self._call = None

        def state():  # the parked state of the call now running, if this handle's finalize_inputs made it
            current = getattr(handle, "current", None)
            if current is None or self._call is None or self._call[0] is not current:
                return None
            return self._call[1]

        def prepare_inputs_labels_for_multimodal(*args, **kwargs):
            bound = dict(zip(names, args), **kwargs)
            st = state()
            ids = bound.get(names[0])
            if (st is None or st["spliced"] or bound.get("images") is not None or ids is None
                    or ids.shape[1] != st["prefill"]):
                return original(*args, **kwargs)
            visual = ids == IMAGE_TOKEN_INDEX
            embeds = embed(ids.masked_fill(visual, 0))
            if st["features"] is not None:
                feats = st["features"].to(embeds.device, embeds.dtype)
                if feats.shape[0] != int(visual.sum()):
                    raise RuntimeError(f"docowl: {feats.shape[0]} reduced visual tokens for {int(visual.sum())} "
                                       "placeholders")
                embeds = embeds.masked_scatter(visual[..., None], feats)
            st["spliced"] = True
            cache = bound.get(names[2]) if len(names) > 2 else None
            return None, visual.long(), bound.get(names[1]), cache, embeds, bound.get("labels")

        handle.patch(model, "prepare_inputs_labels_for_multimodal", prepare_inputs_labels_for_multimodal)

        def positions_hook(module, args, kwargs):
            st = state()
            if st is None or not st["spliced"] or kwargs.get("position_ids") is not None:
                return None
            tokens = kwargs.get("inputs_embeds")
            tokens = kwargs.get("input_ids") if tokens is None else tokens
            if tokens is None:
                return None
            length = tokens.shape[1]
            past = cache_length(kwargs.get("cache", kwargs.get("past_key_values")))
            positions = st["positions"].to(tokens.device)
            if past == 0 and length == positions.shape[-1]:
                kwargs["position_ids"] = positions
            else:
                kwargs["position_ids"] = continued_positions(st["next"].to(tokens.device), past - st["prefill"], length)
            return args, kwargs

        handle.register_hook(self.inner.register_forward_pre_hook(positions_hook, with_kwargs=True))

    # ----- language model ----------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self.inner

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner.get_input_embeddings()(input_ids)


def crops_from_page(num_rows: int, num_cols: int, with_global: bool = True, anchor_max: int = 9) -> torch.Tensor:
    """``patch_positions`` as DocOwl's processor writes them for one page cut into ``num_rows x num_cols``."""
    cells = [[r, c] for r in range(num_rows) for c in range(num_cols)]
    if with_global:
        cells = [[anchor_max, anchor_max], *cells]
    return torch.tensor(cells, dtype=torch.long)


__all__ = ["IMAGE_TOKEN_INDEX", "DocOwlAdapter", "MplugOwlTower", "crops_from_page"]
