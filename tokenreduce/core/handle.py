"""The per-model handle: reversible injection, and the bookkeeping every method shares.

``wrap`` builds one :class:`ModelHandle` per model. It replaces ``forward`` and ``generate`` on the
instance (never on the class), installs the method's hooks through :meth:`ModelHandle.register_hook` /
:meth:`ModelHandle.patch`, and undoes all of it on ``unwrap``. Before the wrapped model runs, the handle
finds the visual placeholders, computes the visual tokens, lets the method reduce them, and rebuilds
``input_ids``, ``attention_mask``, ``labels``, ``mm_token_type_ids`` and position ids per row.
"""

from __future__ import annotations

import copy
import copyreg
import functools
import inspect
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tokenreduce.adapters import get_adapter
from tokenreduce.adapters.base import PIXEL_KEYS, Adapter
from tokenreduce.core.config import MethodConfig
from tokenreduce.core.continuation import (
    ReducedPrompt,
    cache_of,
    continued_inputs,
    forget,
    is_empty,
    prompt_of,
    refuse_foreign,
    remember,
)
from tokenreduce.core.flops import Geometry
from tokenreduce.core.hostsync import require
from tokenreduce.core.inputs import ids_from_embeds, plain_embeds_positions, rebuilt_embeds
from tokenreduce.core.layout import TokenLayout
from tokenreduce.core.llm import LLMStage
from tokenreduce.core.reduction import Method, ReduceContext, Reduction
from tokenreduce.core.registry import STAGES, MethodSpec
from tokenreduce.core.sequence import Columns, gather_inputs, one_row_index, row_index
from tokenreduce.core.stack import config_in, spec_of
from tokenreduce.core.stats import ItemStats, LazyCount, SampleStats, Stats, timer
from tokenreduce.core.vision import VisionStage

HANDLE_ATTR = "_tokenreduce_handle"
COUNT_CHANGING_STAGES = ("vision", "projector")


@dataclass
class VisualItem:
    """One image or video of the current batch, as placed in the sequence the LLM receives."""

    modality: str
    row: int
    layout: TokenLayout
    # Columns of the item's tokens in the (rebuilt) sequence, and the original token each stands for.
    columns: torch.Tensor
    sources: torch.Tensor
    reduction: Reduction | None = None


@dataclass
class BatchInfo:
    """What the core knows about the sequence the LLM is about to read; in-LLM methods read it."""

    items: list[VisualItem]
    attention_mask: torch.Tensor
    samples: list[SampleStats]
    # Per modality, the features handed to the model (item order) when the core packed them itself.
    features: dict[str, list[torch.Tensor]] = field(default_factory=dict)


def _bind(fn, args: tuple, kwargs: dict, sig: inspect.Signature | None = None) -> dict[str, Any]:
    """All arguments of a call as keywords (``**kwargs`` catch-alls flattened); ``sig``: ``fn``'s signature
    when the caller has it already."""
    if not args:  # keywords only: binding would give back the same names and values
        return dict(kwargs)
    sig = sig if sig is not None else inspect.signature(fn)
    bound = sig.bind_partial(*args, **kwargs)
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


class ModelHandle:
    """Everything ``wrap`` changed on one model, and the machinery to run the method on it."""

    def __init__(self, model: nn.Module, adapter: Adapter, spec: MethodSpec, config: MethodConfig):
        self.model = model
        self.adapter = adapter
        self.spec = spec
        self.config = config
        self.method: Method = spec.method_cls(config)
        # Per stage, the config of the method acting there (a stack's member; else the one config).
        self.stage_config = {stage: config_in(config, stage) for stage in STAGES}
        self.stats = Stats()
        self.stats.stages = spec.stages
        self.enabled = True
        self.current: BatchInfo | None = None
        # What the last call did (items with their reductions): for overlays, analysis and tests.
        self.last_batch: BatchInfo | None = None
        self._in_generate = False
        self._warned: set[str] = set()
        self._preparing_generate = False
        # The call gave `inputs_embeds` and no ids: the ids the core works on were found from the embeddings.
        self._ids_from_embeds = False
        # Text tokens per row of the current call when they had to be read (batched calls), else None.
        self.text_counts: list[int] | None = None
        self._patched: list[tuple[Any, str, bool, Any]] = []
        self._hooks: list[Any] = []
        self.original_forward = model.forward
        self.original_generate = getattr(model, "generate", None)
        modalities = config.modalities or spec.modalities
        self.modalities = tuple(m for m in modalities if m in adapter.modalities)
        # Read once: what every call would otherwise re-derive from the configs and signatures.
        self._signatures: dict[str, inspect.Signature] = {}
        self._placeholder_ids: dict[str, int] | None = None
        self._geometry: Geometry | None = None
        self._pad_id: int | None = None
        self._reduces_before_llm = any(s in COUNT_CHANGING_STAGES for s in spec.stages) and bool(self.modalities)
        self._changes_encoder_output = self.method.changes_encoder_output
        self._uses_text = self.method.uses_text

    # ----- reversible injection -----------------------------------------------------------------------
    def patch(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name = value`` on the instance, remembering how to undo it."""
        own = obj.__dict__
        self._patched.append((obj, name, name in own, own.get(name)))
        object.__setattr__(obj, name, value)

    def register_hook(self, hook_handle: Any) -> Any:
        """Track a ``torch.utils.hooks.RemovableHandle`` (or anything with ``remove()``)."""
        self._hooks.append(hook_handle)
        return hook_handle

    def install(self) -> None:
        model = self.model

        @functools.wraps(self.original_forward)
        def forward(*args, **kwargs):
            return self._forward(args, kwargs)

        @functools.wraps(self.original_generate)
        def generate(*args, **kwargs):
            return self._generate(args, kwargs)

        original_expand = getattr(model, "_expand_multimodal_outputs", None)

        def expand_multimodal_outputs(input_ids, mm_encoder_output, expand_size=1, **kw):
            return self._expand_multimodal_outputs(original_expand, input_ids, mm_encoder_output, expand_size, kw)

        self.llm_stage = None
        self.vision_stage = None
        hooks_before = _hook_keys(model)
        try:
            if self.adapter.is_vlm:
                self.patch(model, "forward", forward)
                self.patch(model, "generate", generate)
                if original_expand is not None:
                    self.patch(model, "_expand_multimodal_outputs", expand_multimodal_outputs)
            self.patch(model, HANDLE_ATTR, self)
            self.adapter.attach(self)
            layer = self.method.vision_layer
            if layer is not None:
                tower = self.adapter.tower
                if tower is None:
                    raise TypeError(
                        f"method {self.spec.name!r} reads attention inside the vision tower; the tower of "
                        f"{self.adapter.describe()} is not a supported CLIP/SigLIP/timm/open_clip ViT"
                    )
                self.vision_stage = VisionStage(self, tower, layer)
                self.vision_stage.attach()
            if "llm" in self.spec.stages:
                self.llm_stage = LLMStage(self)
                self.llm_stage.attach()
            self.method.attach(self)
            self._install_copying(hooks_before)
        except BaseException:
            self.remove()
            raise

    # ----- copying and pickling -----------------------------------------------------------------------
    def _install_copying(self, hooks_before: dict[int, dict[str, set]]) -> None:
        """Make ``copy.deepcopy`` and pickling see the unwrapped model, then wrap the copy anew.

        Wrapping puts closures bound to this handle on the model (``forward``, ``generate``) and hooks on
        its submodules: copied as they are, a copy would run the original, and closures do not pickle.
        Every object wrap touched gets an instance ``__getstate__`` leaving out what wrap added; the model
        gets ``__deepcopy__`` and ``__reduce_ex__`` that rebuild it from that state and wrap it again with
        (a copy of) this handle's config.
        """
        added: dict[int, tuple[nn.Module, dict[str, set]]] = {}
        for module in self.model.modules():
            before = hooks_before.get(id(module), {})
            new = {name: keys - before.get(name, set()) for name, keys in _module_hook_keys(module).items()}
            new = {name: keys for name, keys in new.items() if keys}
            if new:
                added[id(module)] = (module, new)
        self._added_hooks = {k: v for k, (_, v) in added.items()}
        owners = {id(obj): obj for obj, *_ in self._patched if isinstance(obj, nn.Module)}
        owners.update({k: m for k, (m, _) in added.items()})
        for obj in owners.values():
            if obj is not self.model:
                self.patch(obj, "__getstate__", functools.partial(self._state_of, obj))
        model = self.model
        self.patch(model, "__getstate__", functools.partial(self._state_of, model))
        self.patch(model, "__deepcopy__", self._deepcopy)
        self.patch(model, "__reduce_ex__", self._reduce_ex)

    def _state_of(self, obj: Any) -> dict[str, Any]:
        """``obj.__dict__`` as it was before wrap: patched attributes restored, wrap's hooks left out."""
        state = obj.__dict__.copy()
        state.pop("_compiled_call_impl", None)
        for o, name, had, old in reversed(self._patched):
            if o is obj:
                if had:
                    state[name] = old
                else:
                    state.pop(name, None)
        for name, keys in self._added_hooks.get(id(obj), {}).items():
            if name in state:
                state[name] = OrderedDict((k, v) for k, v in state[name].items() if k not in keys)
        return state

    def _wrap_copy(self, clone: nn.Module, config: MethodConfig, stats: Stats | None) -> None:
        handle = _install(clone, config, self.enabled)
        if stats is not None:
            handle.stats = stats

    def _deepcopy(self, memo: dict) -> nn.Module:
        model = self.model
        cls = type(model)
        clone = cls.__new__(cls)
        memo[id(model)] = clone
        clone.__setstate__(copy.deepcopy(self._state_of(model), memo))
        self._wrap_copy(clone, copy.deepcopy(self.config, memo), copy.deepcopy(self.stats, memo))
        return clone

    def _reduce_ex(self, protocol: int):
        # The 6th item (state setter) runs once the model's state is loaded: it wraps the loaded model.
        setter = functools.partial(_load_wrapped, self.config, self.enabled)
        return copyreg.__newobj__, (type(self.model),), self._state_of(self.model), None, None, setter

    def remove(self) -> None:
        self.method.detach(self)
        for h in reversed(self._hooks):
            h.remove()
        self._hooks.clear()
        for obj, name, had, old in reversed(self._patched):
            if had:
                object.__setattr__(obj, name, old)
            else:
                obj.__dict__.pop(name, None)
        self._patched.clear()

    def note(self, key: str, message: str, record: dict[str, Any]) -> None:
        """The rule for inputs a method cannot act on: they pass through (or the budget is clamped), what
        happened goes into ``record`` (an item's or a sample's stats, under ``"notes"``) and one warning per
        kind (``key``) is given per wrapped model."""
        record.setdefault("notes", []).append(message)
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"tokenreduce: {message} (recorded in tr.stats; warned once per model)", stacklevel=3)

    def requested_keep(self, stage: int = 0, where: str = "projector") -> int | None:
        """The token count ``keep`` of the method acting in stage ``where`` asks for (at the ``stage``-th
        pruning layer), or None for a fraction."""
        keep = getattr(self.stage_config[where], "keep", None)
        if isinstance(keep, (tuple, list)):
            keep = keep[stage] if stage < len(keep) else None
        return keep if isinstance(keep, int) and not isinstance(keep, bool) else None

    @property
    def reduces_before_llm(self) -> bool:
        return self._reduces_before_llm

    @property
    def in_generate(self) -> bool:
        """Whether the model's ``generate`` is running (its forwards pass through: ``generate`` was prepared)."""
        return self._in_generate

    def _signature(self, name: str, fn) -> inspect.Signature:
        sig = self._signatures.get(name)
        if sig is None:
            sig = self._signatures[name] = inspect.signature(fn)
        return sig

    # ----- entry points -------------------------------------------------------------------------------
    def _forward(self, args: tuple, kwargs: dict):
        if not self.enabled or self._in_generate:
            return self.original_forward(*args, **kwargs)
        inputs = _bind(self.original_forward, args, kwargs, args and self._signature("forward", self.original_forward))
        _refuse_reduced_cache(inputs, "forward")
        if self.reduces_before_llm:
            refuse_foreign(inputs, self._has_pixels(inputs), "forward", ())
        inputs = self.prepare(inputs)
        try:
            return self.original_forward(**inputs)
        finally:
            self.last_batch, self.current = self.current, None

    def _generate(self, args: tuple, kwargs: dict):
        if not self.enabled:
            return self.original_generate(*args, **kwargs)
        inputs = _bind(self.original_generate, args, kwargs)
        if inputs.get("input_ids") is None and torch.is_tensor(inputs.get("inputs")):
            inputs["input_ids"] = inputs.pop("inputs")
        cache = cache_of(inputs)
        record = prompt_of(cache)
        if record is not None:
            if not is_empty(cache):
                return self._continue(inputs, record)
            forget(cache)  # an emptied cache begins a new conversation
        if self.reduces_before_llm:
            refuse_foreign(inputs, self._has_pixels(inputs), "generate", self._placeholder_tokens())
        original_ids = inputs.get("input_ids")
        self._preparing_generate = True
        try:
            # generate runs without gradients; features made here must be plain tensors too (assisted
            # decoding deep-copies the model kwargs, which tensors with a grad history refuse)
            with torch.no_grad():
                inputs = self.prepare(inputs)
        finally:
            self._preparing_generate = False
        if "decode" in self.spec.stages:
            inputs = _add_generation_hooks(inputs, self.method.generation_hooks(self, inputs))
        self._in_generate = True
        try:
            out = self.original_generate(**inputs)
        finally:
            self._in_generate = False
            self.last_batch, self.current = self.current, None
        if "decode" in self.spec.stages:
            self.method.after_generate(self, inputs, out)
        cache = None if torch.is_tensor(out) else getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if self.last_batch is not None and (self.reduces_before_llm or self.llm_stage is not None):
            rebuilt = inputs.get("input_ids") is not original_ids
            remember(cache, original_ids, inputs, rebuilt, getattr(self.adapter.inner, "rope_deltas", None))
        if original_ids is None or inputs["input_ids"] is original_ids:
            return out
        return _restore_prompt(out, original_ids, inputs["input_ids"].shape[1])

    def _placeholder_tokens(self) -> tuple[int, ...]:
        return tuple(self.adapter.placeholder_id(m) for m in self.adapter.modalities)

    def _has_pixels(self, inputs: dict[str, Any]) -> bool:
        return any(self.adapter.has_pixels(m, inputs) for m in self.adapter.modalities)

    def _continue(self, inputs: dict[str, Any], record: ReducedPrompt):
        """``generate`` continuing from the cache a wrapped ``generate`` returned (see
        :mod:`tokenreduce.core.continuation`): the caller's ids mapped onto the cached prompt, nothing reduced
        again (the visual tokens are in the cache)."""
        if type(self.adapter).expand_inputs is not Adapter.expand_inputs:
            raise ValueError(
                f"`generate` cannot continue from `past_key_values` on {self.adapter.describe()}: its placeholders "
                "stand for several visual tokens; pass the whole conversation with its pixel values and no "
                "`past_key_values`"
            )
        keys = tuple(k for m in self.adapter.modalities for k in PIXEL_KEYS[m])
        mapped = continued_inputs(inputs, record, keys)
        if record.prefix is None and record.rope_deltas is not None:
            # the positions the model computes for the new tokens count on from this conversation's prompt
            self.adapter.inner.rope_deltas = record.rope_deltas
        self._in_generate = True
        try:
            out = self.original_generate(**mapped)
        finally:
            self._in_generate = False
        if mapped["input_ids"] is inputs["input_ids"]:
            return out
        return _restore_prompt(out, inputs["input_ids"], mapped["input_ids"].shape[1])

    def _expand_multimodal_outputs(self, original, input_ids, mm_encoder_output, expand_size, kwargs):
        """``generate``'s repetition of the features for beams / returned sequences, for features the core
        packed: each row's items repeated ``expand_size`` times in row order ([A, A, B, B] for rows A, B),
        as ``input_ids`` are. transformers splits the packed output by placeholder counts, which fails for
        families whose packed form is one joined tensor (OneVision videos)."""
        info = self.current
        packed = {m: f for m, f in (info.features.items() if info is not None else ()) if m in mm_encoder_output}
        rest = {m: v for m, v in mm_encoder_output.items() if m not in packed}
        out = dict(original(input_ids, rest, expand_size=expand_size, **kwargs)) if rest else {}
        for m, feats in packed.items():
            rows = [it.row for it in info.items if it.modality == m]
            groups = [[f for f, row in zip(feats, rows) if row == r] for r in range(len(info.samples))]
            out[m] = self.adapter.pack(m, [f for g in groups for _ in range(expand_size) for f in g])
        return out

    # ----- the bookkeeping ----------------------------------------------------------------------------
    def prepare(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Reduce visual tokens and rebuild the inputs; record what happened in ``self.current``."""
        adapter = self.adapter
        caller_inputs = inputs
        inputs = adapter.expand_inputs(inputs)
        input_ids = inputs.get("input_ids")
        precomputed = dict(inputs.get("mm_encoder_outputs") or {})
        present_pixels = [m for m in adapter.modalities if adapter.has_pixels(m, inputs) or m in precomputed]
        self._ids_from_embeds = input_ids is None and present_pixels and inputs.get("inputs_embeds") is not None
        if self._ids_from_embeds:
            input_ids = ids_from_embeds(adapter, inputs)
            inputs = {**inputs, "input_ids": input_ids}
        elif input_ids is None:
            if present_pixels:
                raise ValueError(
                    "tokenreduce needs `input_ids` or `inputs_embeds` to find the visual placeholder tokens; got "
                    "neither. Pass the processor's `input_ids`."
                )
            return inputs
        if self._placeholder_ids is None:
            self._placeholder_ids = {m: adapter.placeholder_id(m) for m in adapter.modalities}
        placeholders = self._placeholder_ids
        present = [m for m in adapter.modalities if adapter.has_pixels(m, inputs) or precomputed.get(m) is not None]
        if not present:
            # No pixels at all: nothing to reduce. Placeholders without pixels are embedded as ordinary tokens
            # by the plain model; say so (one read of their counts, off the reducing path).
            stray = torch.stack([(input_ids == placeholders[m]).sum(1) for m in adapter.modalities]).tolist()
            missing = [m for m, per_row in zip(adapter.modalities, stray) if sum(per_row)]
            if missing:
                for row, sample in enumerate(self.stats.new_call(input_ids.shape[0])):
                    for m in missing:
                        n = stray[adapter.modalities.index(m)][row]
                        self.note(f"no_pixels:{m}", f"`input_ids` hold {m} placeholder tokens but no "
                                  f"`{PIXEL_KEYS[m][0]}` was given: nothing to reduce, the call passed through "
                                  f"({n} in row {row})", sample.extra)
            return caller_inputs

        caller_mask = attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        samples = self.stats.new_call(input_ids.shape[0])
        if self._geometry is None:
            self._geometry = Geometry.from_config(adapter.text_config)
        # Placeholders of a modality given no pixels stay ordinary tokens, as in the plain model: text.
        is_placeholder = {m: input_ids == placeholders[m] for m in present}
        if len(samples) > 1:  # the rebuilt rows' lengths need them (read in _rows)
            visual_per_row = sum(is_placeholder[m].long() for m in present)
            text_per_row = ((attention_mask != 0).long() - visual_per_row).sum(1)
            for r, s in enumerate(samples):
                s.geometry, s.text_tokens = self._geometry, text_per_row[r]  # read when the stats are
        else:
            text_per_row = None
            samples[0].geometry = self._geometry
        reduce = self.reduces_before_llm and any(m in self.modalities for m in present)
        # Encoded here, and handed to the model, also when a layout reads a size the encoder reads again.
        encode = reduce or any(m in adapter.host_read_modalities for m in present)

        features, items, reductions, coords, found = {}, [], {}, {}, {}
        reduced_in_tower = self._changes_encoder_output
        for m in present:
            signals = None
            if precomputed.get(m) is not None:
                features[m] = adapter.unpack(m, precomputed[m].pooler_output)
            elif encode:
                features[m] = self._encode(m, inputs)
            n_items = None if m not in features or reduced_in_tower else [int(f.shape[0]) for f in features[m]]
            layouts = self._layouts(m, inputs, n_items)
            if self.vision_stage is not None and m in features and precomputed.get(m) is None:
                signals = self.vision_stage.signals(m, layouts)
            layouts, coords[m] = self._placeholders(m, layouts, features.get(m), is_placeholder[m])
            found[m] = (layouts, signals)
        if text_per_row is None:
            # One row: its text tokens are its real tokens but the placeholders (their count is known here).
            visual = sum(int(c.shape[0]) for c in coords.values())
            samples[0].text_tokens = (input_ids.shape[1] - visual if caller_mask is None
                                      else LazyCount(caller_mask, -visual))
        rows, self.text_counts = self._rows(coords, found, text_per_row)
        for m in present:
            layouts, signals = found[m]
            items_m, reds = self._reduce_items(m, layouts, features.get(m), coords[m], inputs, samples, signals, rows[m])
            items.extend(items_m)
            reductions[m] = reds

        if not reduce:
            for it in items:
                it.columns = coords[it.modality][it.columns, 1]
            encoded = [m for m in features if precomputed.get(m) is None]
            handed = {m: features[m] for m in encoded}
            self.current = BatchInfo(items=items, attention_mask=attention_mask, samples=samples, features=handed)
            if not encoded:
                return caller_inputs  # nothing reduced: the model reads the caller's own inputs
            # Encoded here with the sizes the layouts read (see Adapter.host_read_modalities): the model gets
            # those features, unchanged, instead of encoding (and reading the sizes) again.
            out = dict(caller_inputs)
            out["mm_encoder_outputs"] = {**precomputed, **{m: adapter.pack(m, handed[m]) for m in encoded}}
            for m in encoded:
                for key in adapter.encoder_keys(m) | set(PIXEL_KEYS[m]):
                    out.pop(key, None)
            return out

        with timer(input_ids.device) as t:
            inputs = self._rebuild(inputs, input_ids, attention_mask, items, coords, features, reductions, precomputed)
        for s in samples:
            s.extra["bookkeeping_ms"] = t.share(len(samples))
        return inputs

    def _layouts(self, modality: str, inputs: dict[str, Any], counts: list[int] | None) -> list[TokenLayout]:
        """The adapter's layouts; square grids or flat sequences when precomputed features come without
        the inputs the layout is read from (pixel values, image sizes, grids)."""
        if self.adapter.has_pixels(modality, inputs) or counts is None:
            return self.adapter.layouts(modality, inputs, counts)
        try:
            return self.adapter.layouts(modality, inputs, counts)
        except (KeyError, ValueError, TypeError):
            return [TokenLayout.square_or_flat(modality, n) for n in counts]

    def _encode(self, modality: str, inputs: dict[str, Any]) -> list[torch.Tensor]:
        """The encoder's per-item tokens, with the vision stage's capture on while the tower runs."""
        stage = self.vision_stage
        if stage is None:
            return self.adapter.encode(modality, inputs)
        stage.discard()
        stage.set_enabled(True)
        try:
            return self.adapter.encode(modality, inputs)
        finally:
            stage.set_enabled(False)

    def _placeholders(self, modality, layouts, features, is_placeholder):
        """The item layouts (flat where the encoder's counts differ from the layout's) and the ``[T, 2]``
        (row, column) of the modality's ``T`` placeholders, ``T`` known from the layouts or features:
        found without the host reading the ids; the count check runs on the device."""
        count = is_placeholder.sum()
        if features is not None and not self._changes_encoder_output:
            counts = [int(f.shape[0]) for f in features]
            total = sum(counts)
            require(count == total, lambda: (
                f"{modality} features and {modality} placeholder tokens do not match: the encoder gave "
                f"{total} tokens, `input_ids` hold {int(count)} placeholders"))
            layouts = [
                lay if lay.num_tokens == n else TokenLayout.flat(modality, n) for lay, n in zip(layouts, counts)
            ]
        else:
            total = sum(lay.num_tokens for lay in layouts)
            require(count == total, lambda: (
                f"{modality} layout expects {total} tokens but `input_ids` hold {int(count)} placeholders"))
        return layouts, torch.nonzero_static(is_placeholder, size=total)

    def _rows(self, coords, found, text_per_row):
        """Per modality, the batch row of each item, and per row its text tokens (padding excluded).

        With one row, every item is in row 0 and the row's padding stays in the rebuilt sequence (its
        text count is then not needed: nothing is read). With several, both are read from the device
        in one transfer: the one host wait of a batched call, which the lengths of the rebuilt rows need.
        """
        if text_per_row is None:
            return {m: [0] * len(found[m][0]) for m in coords}, None
        starts = {}
        for m, (layouts, _) in found.items():
            offsets = [0]
            for lay in layouts[:-1]:
                offsets.append(offsets[-1] + lay.num_tokens)
            starts[m] = offsets
        device = text_per_row.device
        firsts = [coords[m][torch.tensor(starts[m], dtype=torch.long, device=device), 0] for m in coords]
        values = torch.cat([*firsts, text_per_row]).tolist()
        rows, at = {}, 0
        for m in coords:
            rows[m], at = values[at : at + len(starts[m])], at + len(starts[m])
        return rows, values[at:]

    def _reduce_items(self, modality, layouts, features, coords, inputs, samples, signals, rows):
        """Run the method on every item of one modality; ``columns`` hold placeholder offsets for now."""
        act = features is not None and modality in self.modalities and self.reduces_before_llm
        items, reductions, offset = [], [], 0
        texts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # a row's text, embedded once for its items
        for i, layout in enumerate(layouts):
            n = layout.num_tokens
            row = rows[i]
            if act:
                if self._uses_text and row not in texts:
                    texts[row] = self._text_embeds(inputs, row)
                text, text_mask = texts.get(row, (None, None))
                ctx = ReduceContext(
                    layout=layout, modality=modality, row=row, item=i, text_embeds=text, text_mask=text_mask,
                    generator=self._generator(), signals=signals[i] if signals else {},
                )
                with timer(features[i].device) as t:
                    red = self._reduce_one(features[i], ctx)
                _check_reduction(self.spec.name, red, n)
                ms = t
            else:
                red = Reduction(sources=torch.arange(n, device=coords.device))
                ms = 0.0
            sources = red.sources if red.sources.device == coords.device else red.sources.to(coords.device)
            self._note_unreduced(modality, i, row, n, act, red)
            samples[row].items.append(ItemStats(modality, n, red.num_tokens, ms, red.info))
            # placeholder offsets of the kept tokens (the modality's placeholders are the items' in order)
            items.append(VisualItem(modality, row, layout, sources + offset if offset else sources, sources, red))
            reductions.append(red)
            offset += n
        return items, reductions

    def _note_unreduced(self, modality: str, item: int, row: int, n: int, acted: bool, red: Reduction) -> None:
        """Record (and warn once about) an item a count-changing method could not act on."""
        name = self.stage_config["projector"].method  # a stack: its member reducing the items
        if not any(s in COUNT_CHANGING_STAGES for s in self.spec.stages):
            return
        if not acted and modality not in self.spec.modalities:
            self.note(f"modality:{modality}", f"method {name!r} does not reduce {modality}s; {modality} item {item} "
                      f"(row {row}) passed through with its {n} tokens", red.info)
        keep = self.requested_keep()
        if acted and keep is not None and keep > n:
            self.note("keep", f"`keep`={keep} is more than the {n} tokens of {modality} item {item} (row {row}) "
                      f"of method {name!r}: all {n} kept", red.info)

    def _reduce_one(self, features: torch.Tensor, ctx: ReduceContext) -> Reduction:
        """The method's reduction of one item; a bad item never takes down its batch.

        An empty item has nothing to reduce. An item whose features hold NaN / inf, if the method fails on
        it, passes through unreduced (its row then reads what the unwrapped model reads), with a warning
        and ``skipped`` in the item's stats; any other failure names the row and the item.
        """
        n = features.shape[0]
        if n == 0:
            return Reduction(sources=torch.zeros(0, dtype=torch.long, device=features.device), info={"skipped": "empty"})
        try:
            return self.method.reduce(features, ctx).sorted()
        except Exception as err:
            where = f"{ctx.modality} item {ctx.item} (row {ctx.row})"
            if bool(torch.isfinite(features).all()):
                raise RuntimeError(f"method {self.spec.name!r} failed on {where}: {err}") from err
            warnings.warn(
                f"tokenreduce: {where} holds NaN or inf features and method {self.spec.name!r} cannot reduce it "
                f"({err}); passed through unreduced, as the unwrapped model reads it", stacklevel=2,
            )
            return Reduction(sources=torch.arange(n, device=features.device), info={"skipped": "non-finite features"})

    def _rebuild(self, inputs, input_ids, attention_mask, items, coords, features, reductions, precomputed):
        adapter = self.adapter
        index = self._column_index(input_ids, attention_mask, items, coords)
        columns = Columns(index)
        new_mask = columns.take(attention_mask, 0)

        if self.stage_config["projector"].renumber_positions:
            positions = adapter.sequential_positions(new_mask)
        else:
            original = inputs.get("position_ids")
            if original is None or (original.dim() == 3 and original.shape[0] == 4):
                embeds = plain_embeds_positions(adapter, inputs, self._preparing_generate) if self._ids_from_embeds else None
                if embeds is not None:
                    original = embeds
                elif self._preparing_generate and adapter.text_positions_in_generate(inputs):
                    # what the plain model's generate uses then (e.g. Qwen without `mm_token_type_ids`)
                    original = adapter.sequential_positions(attention_mask)
                else:
                    original = adapter.position_ids(input_ids, attention_mask, inputs)
            positions = columns.take(original, 0)
        if self._pad_id is None:
            pad_id = self.adapter.text_config.pad_token_id
            self._pad_id = 0 if pad_id is None else int(pad_id)
        out = gather_inputs(inputs, columns, self._pad_id)
        out = rebuilt_embeds(out, inputs, index if index.dim() == 2 else index[None], adapter.embed, self._pad_id,
                             given_ids=not self._ids_from_embeds)
        out["attention_mask"] = new_mask
        out["position_ids"] = adapter.format_positions(positions, new_mask)
        packed, handed = dict(precomputed), {}
        for m in coords:
            feats = [red.output_features(f) for red, f in zip(reductions[m], features[m])]
            handed[m] = feats
            packed[m] = adapter.pack(m, feats)
            for key in adapter.encoder_keys(m) | set(PIXEL_KEYS[m]):
                out.pop(key, None)
        out["mm_encoder_outputs"] = packed
        self.current = BatchInfo(items=items, attention_mask=new_mask, samples=self.stats.last, features=handed)
        return adapter.finalize_inputs(out, self.current)

    def _column_index(self, input_ids, attention_mask, items, coords) -> torch.Tensor:
        """The original column of each column of the rebuilt sequence: ``[L']`` for one row (its padding
        kept), ``[B, L']`` left-padded for several (``text_counts`` known); sets each item's ``columns`` to
        where its tokens land."""
        if self.text_counts is None:
            cols = {m: c[:, 1] for m, c in coords.items()}
            kept = [cols[it.modality][it.columns] for it in items]
            index, landed = one_row_index(input_ids.shape[1], list(cols.values()), kept, input_ids.device)
        else:
            kept = [(it.row, coords[it.modality][it.columns, 1]) for it in items]
            index, landed = row_index(attention_mask, list(coords.values()), kept, self.text_counts)
        for it, columns in zip(items, landed):
            it.columns = columns
        return index

    def _text_embeds(self, inputs, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The row's input embeddings at every column and which columns are text (see ``ReduceContext``)."""
        ids = inputs["input_ids"][row]
        mask = inputs.get("attention_mask")
        keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask[row] != 0
        for m in self.adapter.modalities:
            keep &= ids != self.adapter.placeholder_id(m)
        with torch.no_grad():
            embeds = inputs.get("inputs_embeds")  # what the model reads when the caller gave it
            return (self.adapter.embed(ids) if embeds is None else embeds[row]), keep

    def _generator(self) -> torch.Generator | None:
        seed = getattr(self.stage_config["projector"], "seed", None)
        if seed is None:
            return None
        return torch.Generator().manual_seed(int(seed))

    @contextmanager
    def disabled(self):
        previous, self.enabled = self.enabled, False
        try:
            yield self.model
        finally:
            self.enabled = previous


_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks",
)


def _module_hook_keys(module: nn.Module) -> dict[str, set]:
    return {name: set(module.__dict__[name]) for name in _HOOK_DICTS if name in module.__dict__}


def _hook_keys(model: nn.Module) -> dict[int, dict[str, set]]:
    """The ids of the hooks every submodule holds, by hook dict: what wrap adds is told apart by it."""
    return {id(m): _module_hook_keys(m) for m in model.modules()}


def _install(model: nn.Module, config: MethodConfig, enabled: bool) -> ModelHandle:
    """Wrap a copy of a model that was wrapped with ``config`` (its checks passed when the original was)."""
    handle = ModelHandle(model, get_adapter(model), spec_of(config), config)
    handle.install()
    handle.enabled = enabled
    return handle


def _load_wrapped(config: MethodConfig, enabled: bool, model: nn.Module, state: dict[str, Any]) -> None:
    """Unpickling of a wrapped model: restore the unwrapped model's state, then wrap it again."""
    model.__setstate__(state)
    _install(model, config, enabled)


def _check_reduction(name: str, red: Reduction, n: int) -> None:
    if red.sources.dim() != 1:
        raise RuntimeError(f"method {name!r} returned source indices outside [0, {n})")
    if red.sources.numel():
        inside = ((red.sources >= 0) & (red.sources < n)).all()
        require(inside, lambda: f"method {name!r} returned source indices outside [0, {n})", RuntimeError)
    if red.features is not None and red.features.shape[0] != red.sources.numel():
        raise RuntimeError(
            f"method {name!r} returned {red.features.shape[0]} features for {red.sources.numel()} sources"
        )


def _refuse_reduced_cache(inputs: dict[str, Any], entry: str) -> None:
    """A cache whose prompt the core rebuilt holds ``L'`` columns for the caller's ``L``: ``forward`` (one step
    of the caller's own decoding, its ids and mask in the caller's columns) is refused; ``generate`` maps a
    continuation onto it (:mod:`tokenreduce.core.continuation`)."""
    record = prompt_of(cache_of(inputs))
    if record is not None and record.prefix is not None:
        raise ValueError(
            f"`{entry}` cannot continue from `past_key_values` whose prompt tokenreduce reduced before the LLM (the "
            "cache holds the reduced prompt, the caller's ids and mask the original one); continue with "
            "`generate(input_ids=<the conversation>, past_key_values=...)`, or pass the whole conversation with its "
            "pixel values and no `past_key_values`"
        )


def _add_generation_hooks(inputs: dict[str, Any], hooks: dict[str, list]) -> dict[str, Any]:
    """Append a decode-stage method's logits processors / stopping criteria to the caller's."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    out = dict(inputs)
    for key, cls in (("logits_processor", LogitsProcessorList), ("stopping_criteria", StoppingCriteriaList)):
        extra = hooks.get(key) or []
        if extra:
            out[key] = cls([*(inputs.get(key) or []), *extra])
    return out


def _restore_prompt(out: Any, original_ids: torch.Tensor, reduced_len: int) -> Any:
    """Make ``generate``'s output start with the caller's original prompt ids."""
    sequences = out if torch.is_tensor(out) else out.sequences
    new_tokens = sequences[:, reduced_len:]
    repeat = sequences.shape[0] // original_ids.shape[0]
    prompt = original_ids.repeat_interleave(repeat, dim=0).to(sequences.device)
    full = torch.cat([prompt, new_tokens], dim=1)
    if torch.is_tensor(out):
        return full
    out.sequences = full
    return out
