"""What the reference variants of the tower-signal baselines share: tower-space features and the projector.

The official VisionZip and PruMerge code for LLaVA-1.5 select and merge the vision tower's hidden states
of the layer LLaVA feeds its projector ([CLS] included), then project the result; the project's default
variants merge the projected tokens instead, which works on every family (anyres packing, video pooling)
but differs through the projector's nonlinearity. :class:`TowerFeatures` records those hidden states while
the tower runs and hands a method the projector, so a reference variant can do what the official code does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TowerFeatures:
    """Hidden states of the layer a LLaVA-1.5 model projects, [CLS] included, per tower row.

    ``hidden_states[l]`` of the tower is the output of block ``l - 1`` (``l > 0``) or block ``L + l``
    (``l < 0``); a forward hook on that block records its output, a pre-hook on the tower clears the record
    of the previous call. Installed through the handle (removed on unwrap).
    """

    def __init__(self, handle: Any, method: str, option: str = "variant"):
        adapter = handle.adapter
        if adapter.name != "llava" or adapter.tower is None:
            raise ValueError(
                f"`{option}`='reference' of {method!r} reproduces the official LLaVA-1.5 code and needs a "
                f"single-grid LLaVA model; {adapter.describe()} accepts `{option}`='default'"
            )
        layer = adapter.config.vision_feature_layer
        tower = adapter.tower
        blocks = len(tower.blocks)
        if not isinstance(layer, int) or not (1 <= layer <= blocks or -blocks <= layer <= -1):
            raise ValueError(
                f"`{option}`='reference' of {method!r} needs one `vision_feature_layer` in [1, {blocks}] or "
                f"[-{blocks}, -1], got {layer!r}"
            )
        self.num_prefix = tower.num_prefix_tokens
        self.projector: nn.Module = adapter.inner.multi_modal_projector
        self.records: list[torch.Tensor] = []
        block = tower.blocks[layer - 1 if layer > 0 else blocks + layer]
        handle.register_hook(tower.module.register_forward_pre_hook(self._start))
        handle.register_hook(block.register_forward_hook(self._record))

    def _start(self, module: nn.Module, args: Any) -> None:
        self.records.clear()

    def _record(self, module: nn.Module, args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        self.records.append(hidden.detach())

    def row(self, index: int, method: str) -> torch.Tensor:
        """``[P + prefix, C]`` hidden states of tower row ``index`` of the last tower call."""
        rows = sum(r.shape[0] for r in self.records)
        if index >= rows:
            raise RuntimeError(
                f"{method!r} with variant='reference' found {rows} recorded tower rows, not row {index}: the "
                "reference variant needs the tower to run inside the wrapped model (no precomputed features)"
            )
        return torch.cat(self.records)[index]

    def project(self, states: torch.Tensor) -> torch.Tensor:
        """The projector applied to ``[M, C]`` tower-space tokens: ``[M, D]``."""
        with torch.no_grad():
            return self.projector(states[None])[0]


def padded_sources(columns: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` ascending placeholder columns for outputs emitted in the reference code's order.

    The core places a reduction's outputs at its (ascending) ``sources``; a reference variant emits its
    outputs in the official order under consecutive positions, so only the kept columns matter, each output
    taking the next. Outputs with no column of their own ([CLS], the extra token of pruned ones) repeat
    the first kept column.
    """
    columns = columns.sort().values
    if columns.numel() == 0:
        columns = torch.zeros(1, dtype=torch.long, device=columns.device)
    missing = count - columns.numel()
    return torch.cat([columns[:1].expand(missing), columns]) if missing > 0 else columns[:count]
