"""The ``vision`` stage: attention signals read inside the vision tower, mapped onto the LLM's tokens.

Methods such as VisionZip and PruMerge rank visual tokens by the [CLS] token's attention at a tower layer
and merge them by key similarity. The core reads the queries and keys of that layer from the attention's
own input (one extra q/k projection; the tower keeps running under SDPA or flash attention), lets the
method turn them into per-patch signals, and maps those onto the tokens the LLM receives with the
family's own spatial transforms (anyres packing and unpadding, video pooling), so methods work per item
on aligned ``[N]`` / ``[N, d]`` signals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from tokenreduce.adapters.towers import Tower

if TYPE_CHECKING:
    from tokenreduce.core.handle import ModelHandle


class TowerCapture:
    """Records q and k of one tower layer for every encoder call."""

    def __init__(self, tower: Tower, layer: int):
        self.tower = tower
        self.index = tower.block_index(layer)
        block = tower.blocks[self.index]
        self.parts = tower.parts(block)
        self.module = tower.attention_input_module(block)
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.enabled = False  # switched on by the handle only while it encodes

    def attach(self, handle: ModelHandle) -> None:
        handle.register_hook(self.module.register_forward_pre_hook(self._hook, with_kwargs=True))

    def _hook(self, module, args, kwargs):
        if not self.enabled:
            return None
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if getattr(module, "batch_first", True) is False:
            hidden = hidden.transpose(0, 1)
        with torch.no_grad():
            q, k, _ = self.parts.qkv(hidden)
        self.records.append((q.detach(), k.detach()))
        return None

    def pop(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Queries and keys ``[R, H, N, d]`` of every tower row since the last call (call order)."""
        if not self.records:
            return None
        q = torch.cat([r[0] for r in self.records])
        k = torch.cat([r[1] for r in self.records])
        self.records.clear()
        return q, k


class VisionStage:
    """Installs a method's tower captures and turns captured q/k into per-token signals.

    ``layers`` is one tower layer (the method's ``tower_signals`` then gets that layer's ``q, k``) or a
    tuple of layers (it gets dicts ``{layer: q}``, ``{layer: k}``).
    """

    def __init__(self, handle: ModelHandle, tower: Tower, layers: int | tuple[int, ...]):
        self.handle = handle
        self.tower = tower
        self.single = isinstance(layers, int)
        self.captures = {layer: TowerCapture(tower, layer) for layer in ((layers,) if self.single else layers)}

    @property
    def capture(self) -> TowerCapture:
        """The capture of the first (or only) layer."""
        return next(iter(self.captures.values()))

    def attach(self) -> None:
        for capture in self.captures.values():
            capture.attach(self.handle)

    def set_enabled(self, enabled: bool) -> None:
        for capture in self.captures.values():
            capture.enabled = enabled

    def discard(self) -> None:
        for capture in self.captures.values():
            capture.records.clear()

    def signals(self, modality: str, layouts: list) -> list[dict[str, Any]]:
        """Per item, the method's signals aligned with the item's tokens (NaN on newline/CLS slots)."""
        popped = {layer: c.pop() for layer, c in self.captures.items()}
        if any(v is None for v in popped.values()):
            return [{} for _ in layouts]
        if self.single:
            q, k = next(iter(popped.values()))
        else:
            q = {layer: v[0] for layer, v in popped.items()}
            k = {layer: v[1] for layer, v in popped.items()}
        per_patch = self.handle.method.tower_signals(
            q, k, scale=self.capture.parts.scale, num_prefix=self.tower.num_prefix_tokens
        )
        per_item: list[dict[str, Any]] = [{} for _ in layouts]
        for name, value in per_patch.items():
            for i, mapped in enumerate(self.handle.adapter.token_signals(modality, layouts, value)):
                per_item[i][name] = mapped
        return per_item
