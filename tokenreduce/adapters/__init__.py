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
    stages = ("vision",)  # no language model: only methods merging inside the tower

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


def _parents(modules: list[tuple[nn.Module, str]]) -> list[tuple[nn.Module, str]]:
    """The modules holding any of ``modules`` as a direct child, with the child's attribute path extended.

    A module does not know its parents: they are found through the garbage collector's referrers (the
    parent's ``_modules`` dict, then its ``__dict__``, then the parent), three heap scans per level."""
    import gc

    paths = {id(m): p for m, p in modules}
    children = [d for d in gc.get_referrers(*(m for m, _ in modules))
                if isinstance(d, dict) and any(id(v) in paths for v in d.values())]
    if not children:
        return []
    by_id = {id(d): d for d in children}
    attrs = [a for a in gc.get_referrers(*children) if isinstance(a, dict) and id(a.get("_modules")) in by_id]
    if not attrs:
        return []
    out = []
    for owner in gc.get_referrers(*attrs):
        if isinstance(owner, nn.Module) and id(owner.__dict__.get("_modules")) in by_id:
            for name, child in owner._modules.items():
                if id(child) in paths:
                    path = paths[id(child)]
                    out.append((owner, f"{name}.{path}" if path else name))
    return out


def enclosing_vlm(module: nn.Module, depth: int = 6) -> tuple[nn.Module, str] | None:
    """The wrappable VLM ``module`` is a sub-module of (and its attribute path there), or None."""
    frontier, seen = [(module, "")], {id(module)}
    for _ in range(depth):
        frontier = [(p, path) for p, path in _parents(frontier) if id(p) not in seen]
        for parent, path in frontier:
            seen.add(id(parent))
            model_type = getattr(getattr(parent, "config", None), "model_type", None)
            if model_type is not None and family_name(model_type) in _ADAPTERS and adapter_class(model_type).accepts(parent):
                return parent, path
        if not frontier:
            return None
    return None


def _refuse_inside_vlm(model: nn.Module) -> None:
    found = enclosing_vlm(model)
    if found is not None:
        vlm, path = found
        raise TypeError(
            f"cannot wrap {type(model).__name__}: it is `{path}` inside {type(vlm).__name__}, whose forward and "
            f"generate would then see changed token counts; wrap the {type(vlm).__name__} itself (methods "
            "acting in the tower or the LLM do so from there)"
        )


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``, or a TypeError naming the supported families (or, for a sub-module of a
    VLM such as its vision tower or language model, the model to wrap instead)."""
    tower = find_tower(model)
    if tower is not None:
        _refuse_inside_vlm(model)
        return TowerAdapter(model, tower)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None or family_name(model_type) not in _ADAPTERS:
        _refuse_inside_vlm(model)
    if model_type is None:
        raise TypeError(
            f"cannot wrap {type(model).__name__}: it has no `config.model_type`; supported families: "
            f"{', '.join(list_adapters())}"
        )
    cls = adapter_class(model_type)
    if not cls.accepts(model):
        _refuse_inside_vlm(model)
        raise TypeError(
            f"wrap the generation model of family {model_type!r} (e.g. {type(model).__name__.replace('Model', 'ForConditionalGeneration')}), "
            f"not {type(model).__name__}"
        )
    return cls(model)
