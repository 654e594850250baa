"""Low-rank adapters on a language model's linear layers, added by forward hooks while a method is wrapped.

A method whose reduced tokens are not what the LLM was trained to read (VQToken's code tokens, LangDC's soft
caption tokens) may carry rank-``r`` deltas ``x A^T B^T * alpha / r`` for the LLM's projections, trained
with it. They live in the method's own module, are hooked into the unchanged model while it is wrapped,
and removing the hooks restores the model exactly (``B`` starts at zero, so untrained adapters change
nothing either).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llm_linear_layers(
    language_model: nn.Module, targets: tuple[str, ...] = LLM_TARGETS
) -> tuple[tuple[str, int, int], ...]:
    """``(name, in_features, out_features)`` of the language model's ``nn.Linear`` layers whose last name
    part is in ``targets`` (the attention and MLP projections of Llama/Qwen2-style decoders)."""
    found = tuple(
        (name, m.in_features, m.out_features)
        for name, m in language_model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )
    if not found:
        raise ValueError(f"the language model has no nn.Linear layer named one of {targets}")
    return found


def check_adapters(prefix: str, rank: int, modules: Iterable) -> tuple[tuple[str, int, int], ...]:
    """Validate the ``{prefix}_rank`` / ``{prefix}_modules`` pair of a config; returns the modules as
    ``(name, in_features, out_features)`` tuples (JSON gives lists)."""
    modules = tuple((str(n), int(i), int(o)) for n, i, o in modules)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"`{prefix}_rank` must be an int >= 0, got {rank!r}")
    if bool(rank) != bool(modules):
        raise ValueError(
            f"`{prefix}_rank` ({rank}) > 0 needs `{prefix}_modules` and 0 needs none; got {len(modules)} modules"
        )
    return modules


class LowRank(nn.Module):
    """``x -> x A^T B^T * scale``: one LoRA delta, ``B`` zero-initialised so it starts at nothing."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float):
        super().__init__()
        self.a = nn.Parameter(torch.randn(rank, in_features) / math.sqrt(in_features))
        self.b = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x.to(self.a.dtype), self.a), self.b) * self.scale


class LowRankAdapters(nn.ModuleDict):
    """One :class:`LowRank` per adapted layer, keyed by the layer's name (dots as ``__``).

    Args:
        layers: ``(name, in_features, out_features)`` per layer, names relative to the language model
            (see :func:`llm_linear_layers`).
        rank: adapter rank (0 gives no adapters).
        alpha: scale numerator (each delta is multiplied by ``alpha / rank``).
        owner: what carries the adapters, named in errors.
    """

    def __init__(self, layers: Iterable[tuple[str, int, int]], rank: int, alpha: float, owner: str = "the method"):
        layers = tuple(layers)
        super().__init__({name.replace(".", "__"): LowRank(i, o, rank, alpha / rank) for name, i, o in layers} if rank else {})
        self.layers = layers if rank else ()
        self.owner = owner

    def install(self, language_model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """Add every delta to its layer of ``language_model`` as a forward hook; returns the hooks (removing
        them restores the model exactly). Raises, installing nothing, when a layer is missing or differs."""
        hooks = []
        try:
            for name, i, o in self.layers:
                try:
                    layer = language_model.get_submodule(name)
                except AttributeError:
                    layer = None
                if not isinstance(layer, nn.Linear) or (layer.in_features, layer.out_features) != (i, o):
                    raise ValueError(
                        f"{self.owner} adapts LLM layer {name!r} as Linear({i} -> {o}); this language model "
                        f"has {layer!r} there"
                    )
                delta = self[name.replace(".", "__")]

                def hook(_module, args, output, delta=delta):
                    return output + delta(args[0]).to(output.dtype)

                hooks.append(layer.register_forward_hook(hook))
        except BaseException:
            for h in hooks:
                h.remove()
            raise
        return hooks
