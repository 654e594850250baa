"""Vision-tower adapters: HF CLIP / SigLIP, timm ViTs (raw or inside transformers' TimmWrapper) and open_clip.

A :class:`Tower` knows a ViT's blocks and how to take one apart (norms, q/k/v, output projection, MLP,
layer scales), so that methods can (a) read attention signals at a layer (CLS-to-patch attention, keys)
without switching the model to eager attention, by recomputing q/k from the attention's own input, and
(b) run a block with token merging in the middle (ToMe) through :func:`merging_block_forward`, with
proportional attention. Everything is installed per instance through the handle and undone on unwrap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class BlockParts:
    """One pre-norm transformer block, taken apart."""

    norm1: Callable[[torch.Tensor], torch.Tensor]
    qkv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # -> [B, H, N, d] each
    out: Callable[[torch.Tensor], torch.Tensor]  # [B, N, H*d] -> [B, N, D]
    after_attn: Callable[[torch.Tensor], torch.Tensor]
    norm2: Callable[[torch.Tensor], torch.Tensor]
    mlp: Callable[[torch.Tensor], torch.Tensor]
    after_mlp: Callable[[torch.Tensor], torch.Tensor]
    scale: float


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


class Tower:
    """A ViT of one of the supported kinds."""

    kind = ""

    def __init__(self, module: nn.Module):
        self.module = module

    @property
    def blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches (CLS, registers); never merged or dropped inside the tower."""
        raise NotImplementedError

    @property
    def has_cls(self) -> bool:
        return self.num_prefix_tokens > 0

    def parts(self, block: nn.Module) -> BlockParts:
        raise NotImplementedError

    def attention_input_module(self, block: nn.Module) -> nn.Module:
        """The module whose first input is the block's normed hidden states (where signals are read)."""
        raise NotImplementedError

    def block_index(self, layer: int) -> int:
        n = len(self.blocks)
        index = layer if layer >= 0 else n + layer
        if not 0 <= index < n:
            raise ValueError(f"vision layer {layer} is out of range for a tower of {n} blocks")
        return index


class HFTower(Tower):
    """``CLIPVisionModel`` / ``SiglipVisionModel`` (or their ``*VisionTransformer``)."""

    kind = "hf"

    @property
    def _body(self) -> nn.Module:
        return getattr(self.module, "vision_model", self.module)

    @property
    def blocks(self):
        return list(self._body.encoder.layers)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if hasattr(self._body.embeddings, "class_embedding") else 0

    def parts(self, block):
        attn = block.self_attn
        heads = attn.num_heads

        def qkv(h):
            return _heads(attn.q_proj(h), heads), _heads(attn.k_proj(h), heads), _heads(attn.v_proj(h), heads)

        return BlockParts(block.layer_norm1, qkv, attn.out_proj, _identity, block.layer_norm2, block.mlp, _identity,
                          attn.scale)

    def attention_input_module(self, block):
        return block.self_attn


class TimmTower(Tower):
    """A timm ``VisionTransformer`` (also inside transformers' ``TimmWrapperModel``)."""

    kind = "timm"

    @property
    def _vit(self) -> nn.Module:
        return getattr(self.module, "timm_model", self.module)

    @property
    def blocks(self):
        return list(self._vit.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        return int(getattr(self._vit, "num_prefix_tokens", 1))

    def parts(self, block):
        attn = block.attn
        heads = attn.num_heads

        def qkv(h):
            b, n, _ = h.shape
            q, k, v = attn.qkv(h).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            return attn.q_norm(q), attn.k_norm(k), v

        def out(o):
            o = attn.norm(o)
            return attn.proj_drop(attn.proj(o))

        if getattr(attn, "gate", None) is not None:
            raise TypeError("gated timm attention is not supported by token merging")

        def after_attn(x):
            return block.drop_path1(block.ls1(x))

        def after_mlp(x):
            return block.drop_path2(block.ls2(x))

        return BlockParts(block.norm1, qkv, out, after_attn, block.norm2, block.mlp, after_mlp, attn.scale)

    def attention_input_module(self, block):
        return block.attn


class OpenClipTower(Tower):
    """An open_clip ``VisionTransformer`` (or the ``.visual`` of an open_clip ``CLIP``)."""

    kind = "open_clip"

    @property
    def _visual(self) -> nn.Module:
        return getattr(self.module, "visual", self.module)

    @property
    def blocks(self):
        return list(self._visual.transformer.resblocks)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if getattr(self._visual, "class_embedding", None) is not None else 0

    def parts(self, block):
        mha = block.attn
        heads = mha.num_heads
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"open_clip block attention {type(mha).__name__} is not supported")

        def qkv(h):
            q, k, v = F.linear(h, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
            return _heads(q, heads), _heads(k, heads), _heads(v, heads)

        return BlockParts(block.ln_1, qkv, mha.out_proj, block.ls_1, block.ln_2, block.mlp, block.ls_2,
                          (mha.embed_dim // heads) ** -0.5)

    def attention_input_module(self, block):
        return block.attn


def find_tower(model: nn.Module) -> Tower | None:
    """The tower ``model`` is, or None."""
    from transformers import (
        CLIPVisionModel,
        CLIPVisionModelWithProjection,
        SiglipVisionModel,
        TimmWrapperModel,
    )

    if isinstance(model, (CLIPVisionModel, SiglipVisionModel, CLIPVisionModelWithProjection)):
        return HFTower(model)
    if isinstance(model, TimmWrapperModel):
        return TimmTower(model)
    cls = type(model)
    if cls.__module__.startswith("timm.") and hasattr(model, "blocks") and hasattr(model, "patch_embed"):
        return TimmTower(model)
    if cls.__module__.startswith("open_clip."):
        visual = getattr(model, "visual", model)
        if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):
            return OpenClipTower(model)
    return None


def merging_block_forward(parts: BlockParts, x: torch.Tensor, size: torch.Tensor | None,
                          merge: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]):
    """A block run with proportional attention and a merge step between attention and MLP.

    ``size: [B, N]`` counts the patches each token stands for (None: all ones); the attention logits get
    ``log(size)`` added so a merged token weighs as much as its members (ToMe). ``merge(x, keys)`` returns
    the merged hidden states and sizes (it is given the head-mean keys as the similarity metric).
    """
    h = parts.norm1(x)
    q, k, v = parts.qkv(h)
    bias = None if size is None else size.log().to(q.dtype)[:, None, None, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=parts.scale)
    b, heads, n, d = o.shape
    x = x + parts.after_attn(parts.out(o.transpose(1, 2).reshape(b, n, heads * d)))
    x, size = merge(x, k.mean(1))
    x = x + parts.after_mlp(parts.mlp(parts.norm2(x)))
    return x, size
