"""Model-family adapters, imported lazily and chosen by ``config.model_type``."""

from __future__ import annotations

import importlib

from torch import nn

from .base import Adapter
from .towers import find_tower

# Family name -> (module, class, the `config.model_type` values it serves). The family name is the adapter's
# `name`, the one method `families` lists use. Modules import only transformers, a core dependency.
_ADAPTERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "llava": ("llava", "LlavaAdapter", ("llava",)),
    "llava_next": ("llava_next", "LlavaNextAdapter", ("llava_next",)),
    "llava_next_video": ("llava_next", "LlavaNextVideoAdapter", ("llava_next_video",)),
    "llava_onevision": ("llava_onevision", "LlavaOnevisionAdapter", ("llava_onevision",)),
    "qwen2_vl": ("qwen2_vl", "Qwen2VLAdapter", ("qwen2_vl",)),
    "qwen2_5_vl": ("qwen2_vl", "Qwen2_5_VLAdapter", ("qwen2_5_vl",)),
    "docowl": ("docowl", "DocOwlAdapter", ("mplug_docowl",)),
}
# `config.model_type` -> family name. A model type that differs from its family name (DocOwl's remote code
# says "mplug_docowl") is accepted wherever a family is named, so configs and scripts written with it work.
_FAMILY_OF_MODEL_TYPE = {t: family for family, (_, _, types) in _ADAPTERS.items() for t in types}


# Bare vision towers (for in-tower methods such as ToMe), by Tower.kind.
TOWER_ADAPTERS = {"hf": "hf_vision_tower", "timm": "timm_vit", "open_clip": "open_clip_vit"}


def list_adapters() -> list[str]:
    """Model families and bare vision-tower kinds that can be wrapped, spelled as methods' ``families``."""
    return sorted(_ADAPTERS) + sorted(TOWER_ADAPTERS.values())


def family_name(name: str) -> str:
    """The family name for a family name or a ``config.model_type`` (``"mplug_docowl"`` -> ``"docowl"``)."""
    return name if name in _ADAPTERS else _FAMILY_OF_MODEL_TYPE.get(name, name)


def adapter_class(name: str) -> type[Adapter]:
    """The adapter class of a model family, named by its family name or its ``config.model_type``."""
    family = family_name(name)
    if family not in _ADAPTERS:
        raise TypeError(f"unsupported model type {name!r}; supported families: {', '.join(list_adapters())}")
    module, cls, _ = _ADAPTERS[family]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


class TowerAdapter(Adapter):
    """A bare vision tower (no language model): only in-tower methods apply."""

    is_vlm = False
    modalities = ("image",)

    def __init__(self, model: nn.Module, tower):
        self.model = model
        self.inner = model
        self.config = getattr(model, "config", None)
        self._tower = tower
        self.name = TOWER_ADAPTERS[tower.kind]

    @property
    def tower(self):
        return self._tower

    def describe(self) -> str:
        return f"{self.name} ({type(self.model).__name__})"


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``, or a TypeError naming the supported families."""
    tower = find_tower(model)
    if tower is not None:
        return TowerAdapter(model, tower)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise TypeError(
            f"cannot wrap {type(model).__name__}: it has no `config.model_type`; supported families: "
            f"{', '.join(list_adapters())}"
        )
    cls = adapter_class(model_type)
    if not cls.accepts(model):
        raise TypeError(
            f"wrap the generation model of family {model_type!r} (e.g. {type(model).__name__.replace('Model', 'ForConditionalGeneration')}), "
            f"not {type(model).__name__}"
        )
    return cls(model)
