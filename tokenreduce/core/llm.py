"""The ``llm`` stage: dropping visual tokens between decoder layers, correct in prefill and decode.

A method names the layers ``K`` at which it prunes and, at each, chooses which visual tokens survive from
a :class:`LLMContext` (hidden states, cheap attention scores of layer ``K-1``, where the visual tokens are).
Everything else happens here, for every method and every family:

* layers ``>= K`` see only the kept tokens: their hidden states, rotary embeddings (kept tokens keep their
  original positions unless ``renumber_positions``), ``position_ids`` and a causal/padding mask rebuilt for
  the compressed length, in prefill and in every decode step;
* the ``DynamicCache`` simply holds fewer entries in layers ``>= K`` (no cache edits: the cache sizes each
  layer's mask through ``layer_idx``); rows keeping different counts are left-padded;
* scores come from the queries of chosen rows (the last token, or all text tokens) against layer
  ``K-1``'s cached keys, grouped KV heads and padding handled: no eager attention, no second layer run;
* outside ``generate``, the final hidden states are scattered back to the original length (a dropped token
  keeps the state it had when dropped), so logits and labels stay aligned with the caller's sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tokenreduce import kernels
from tokenreduce.core.sequence import (
    Columns,
    causal_mask_builder,
    column_index,
    decode_key_length,
    decode_mask,
    decode_positions,
    full_causal,
    gather_columns,
    gather_tokens,
    gathered_causal_mask,
    is_empty_cache,
    prefill_padding_mask,
    renumbered_positions,
    rope_positions,
    scatter_tokens,
)
from tokenreduce.core.stats import timer

# The attribute of a cache that holds the stages of the prefill that filled it.
STAGES_ATTR = "_tokenreduce_stages"

if TYPE_CHECKING:
    from tokenreduce.core.handle import ModelHandle, VisualItem


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x: [B, H, Q, d]`` with ``cos, sin: [B, Q, d]``."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


@dataclass
class AttentionCapture:
    """Inputs of layer ``K-1``'s attention in prefill: enough to score tokens without re-running it."""

    module: nn.Module
    hidden: torch.Tensor  # normed hidden states entering the attention, [B, L, D]
    cos: torch.Tensor
    sin: torch.Tensor
    keys: torch.Tensor | None = None  # post-RoPE keys [B, Hkv, L, d] (from the cache when there is one)
    projected: torch.Tensor | None = None  # the layer's own q_proj output [B, L, Hq * d], when captured
    projected_keys: torch.Tensor | None = None  # k_proj output [B, L, Hkv * d], when computed for scoring
    # The capture of the next layer (K) that :meth:`LLMContext.at_current_layer` derived from this one: its
    # projections of every token, which layer K then reads for the tokens it keeps instead of projecting.
    current: AttentionCapture | None = None

    def query_states(self, columns: torch.Tensor) -> torch.Tensor:
        """Post-RoPE queries ``[B, Hq, Q, d]`` of the tokens at ``columns: [B, Q]``."""
        attn = self.module
        if self.projected is not None:  # what the layer computed: no second projection
            h = gather_tokens(self.projected, columns)
        else:
            h = attn.q_proj(gather_tokens(self.hidden, columns))
        b, q, _ = h.shape
        states = h.view(b, q, -1, attn.head_dim).transpose(1, 2)
        if getattr(attn, "q_norm", None) is not None:
            states = attn.q_norm(states)
        return apply_rope(states, gather_tokens(self.cos, columns), gather_tokens(self.sin, columns))

    def key_states(self) -> torch.Tensor:
        if self.keys is None:
            attn = self.module
            b, length, _ = self.hidden.shape
            projected = self.projected_keys if self.projected_keys is not None else attn.k_proj(self.hidden)
            keys = projected.view(b, length, -1, attn.head_dim).transpose(1, 2)
            if getattr(attn, "k_norm", None) is not None:
                keys = attn.k_norm(keys)
            self.keys = apply_rope(keys, self.cos, self.sin)
        return self.keys


@dataclass
class LLMContext:
    """What a method sees at pruning layer ``layer`` (sequence length ``L`` = current, compressed length).

    Attributes:
        layer: the decoder layer about to run on the pruned sequence.
        hidden: ``[B, L, D]`` residual stream entering that layer.
        attention_mask: ``[B, L]`` 1 for real tokens, 0 for padding.
        visual: per row, the columns of the row's visual tokens (ascending).
        visual_tokens: per row, ``[Nv, 2]``: (batch item index, token index inside that item's layout) of
            each visual column; ``items[i].layout`` gives rows/cols/frames for spatial methods.
        text: per row, the columns of the row's text tokens (with one row, its padding columns too:
            ``attention_mask`` tells them apart).
        original_visual: per row, the number of visual tokens the row had at the LLM input.
        layer_module: the decoder layer ``layer`` itself, for :meth:`at_current_layer`.
    """

    layer: int
    hidden: torch.Tensor
    attention_mask: torch.Tensor
    visual: list[torch.Tensor]
    visual_tokens: list[torch.Tensor]
    text: list[torch.Tensor]
    items: list[VisualItem]
    original_visual: list[int]
    capture: AttentionCapture
    extra: dict[str, Any] = field(default_factory=dict)
    layer_module: nn.Module | None = None

    def at_current_layer(self) -> LLMContext:
        """This context with layer ``K``'s own attention in place of layer ``K-1``'s: layer ``K``'s input norm
        and query / key projections applied to ``hidden``. Every query has then read one more layer (text
        after the image has read the question, for one), at the cost of projecting the keys once more.

        Queries and keys of every token are projected once (scores read most of them); in prefill layer K
        then takes the kept tokens' projections from these instead of projecting them again."""
        if self.layer_module is None:
            raise ValueError(f"the context of layer {self.layer} carries no decoder layer to score with")
        norm = getattr(self.layer_module, "input_layernorm", None)
        normed = norm(self.hidden) if norm is not None else self.hidden
        attn = self.layer_module.self_attn
        capture = AttentionCapture(attn, normed, self.capture.cos, self.capture.sin,
                                   projected=attn.q_proj(normed), projected_keys=attn.k_proj(normed))
        self.capture.current = capture
        return replace(self, capture=capture)

    @property
    def last(self) -> torch.Tensor:
        """Column of the last real token of each row, ``[B]``."""
        length = self.attention_mask.shape[1]
        ar = torch.arange(length, device=self.attention_mask.device)
        return torch.where(self.attention_mask.bool(), ar, -1).max(dim=1).values

    def attention(
        self, queries: torch.Tensor, query_mask: torch.Tensor | None = None, causal: bool = True
    ) -> torch.Tensor:
        """Attention probabilities of the captured layer (``K-1``, or ``K`` after :meth:`at_current_layer`)
        from the tokens at ``queries: [B, Q]`` to every key.

        Softmax over keys with padding masked, and causality unless ``causal=False`` (then a query scores
        keys after it too, which the model itself never does), averaged over heads and valid queries:
        ``[B, L]``. ``queries`` ascend along each row (left padding at column 0 allowed): the kernel skips
        the keys a causal chunk of them cannot see.
        """
        q = self.capture.query_states(queries)
        k = self.capture.key_states()
        scale = getattr(self.capture.module, "scaling", q.shape[-1] ** -0.5)
        return kernels.attention_importance(
            q, k, scale=scale, key_mask=self.attention_mask.bool(), query_mask=query_mask,
            query_positions=queries if causal else None, ascending=causal,
        )

    def last_token_attention(self) -> torch.Tensor:
        """Attention of each row's last token to every key, ``[B, L]`` (FastV's signal)."""
        # Causal, though scored as not: every key after a row's last real token is padding, which the key
        # mask hides already (the same probabilities, without the kernel's causal mask).
        return self.attention(self.last[:, None], causal=False)

    def text_attention(self, causal: bool = True) -> torch.Tensor:
        """Attention of each row's text tokens to every key, averaged over them, ``[B, L]``."""
        cols = column_index(self.text, device=self.hidden.device)
        real = gather_columns(self.attention_mask, cols, 0) != 0  # text of one row may hold padding
        return self.attention(cols.clamp_min(0), real, causal=causal)


@dataclass
class Stage:
    """The sequence layers ``>= layer`` (up to the next stage) see during one generation."""

    layer: int
    columns: torch.Tensor  # [B, L'] columns of the ORIGINAL sequence (-1: padding)
    mask: torch.Tensor  # [B, L'] 1 real token, 0 padding
    cos: torch.Tensor
    sin: torch.Tensor
    position_ids: torch.Tensor | None
    visual: list[torch.Tensor]
    visual_tokens: list[torch.Tensor]
    text: list[torch.Tensor]
    # Per row, columns after the prompt that rode along its prefill (assisted decoding's candidates).
    tail: list[torch.Tensor] = field(default_factory=list)
    # One row whose prefill came without an attention mask: ``mask`` is all ones (known on the host), so
    # the layers' masks are built as the plain model builds them then, from no 2-D mask.
    unmasked: bool = False
    # One row, prefill: the kept columns' index into the previous sequence, and the 4-D mask this stage's
    # layers got (``mask4d_set`` once built), from which the next stage's is gathered.
    gather: torch.Tensor | None = None
    mask4d: Any = None
    mask4d_set: bool = False


@dataclass
class _Call:
    """State of one text-model call."""

    prefill: bool
    cache: Any
    mask2d: torch.Tensor | None
    position_ids: torch.Tensor | None
    captures: dict[int, AttentionCapture] = field(default_factory=dict)
    projected: dict[int, torch.Tensor] = field(default_factory=dict)  # layer K-1's q_proj output, by K
    kwargs_by_layer: dict[int, dict[str, Any]] = field(default_factory=dict)
    # Per stage, its input: (original column of each column [B, L] (-1: padding), hidden states [B, L, D]).
    dropped: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # Per row, its visual tokens at the LLM input (the same for every stage of the call).
    original_visual: list[int] | None = None
    # Outside generate, the dropped states go back into the final norm's input (no hidden states recorded),
    # and whether they went.
    scatter_before_norm: bool = False
    scattered: bool = False


class LLMStage:
    """Hooks one handle's method into the decoder layers of its model."""

    def __init__(self, handle: ModelHandle):
        self.handle = handle
        self.method = handle.method
        self.lm = handle.adapter.language_model
        self.layers = handle.adapter.decoder_layers
        self.prune_layers = sorted(self.method.llm_layers(len(self.layers)))
        self.stages: list[Stage] = []
        self.prompt_length = 0
        self.original_mask: torch.Tensor | None = None
        self.call: _Call | None = None
        self.stage_cache: Any = None
        self._mask_cache: dict[tuple, Any] = {}
        self._builders: dict[int, Any] = {}  # each stage layer's mask builder (by its layer type)
        self._reused: list[Any] = []  # one-shot hooks handing layer K its kept tokens' projections
        self.prepared: Any = None  # the handle's BatchInfo the last text-model call belonged to

    # ----- installation -------------------------------------------------------------------------------
    def attach(self) -> None:
        h = self.handle
        h.register_hook(self.lm.register_forward_pre_hook(self._before_lm, with_kwargs=True))
        h.register_hook(self.lm.register_forward_hook(self._after_lm, with_kwargs=True))
        norm = getattr(self.lm, "norm", None)
        if isinstance(norm, nn.Module):
            h.register_hook(norm.register_forward_pre_hook(self._before_norm))
        for k in self.prune_layers:
            attn = self.layers[k - 1].self_attn
            h.register_hook(attn.register_forward_hook(self._capture_hook(k), with_kwargs=True))
            if isinstance(getattr(attn, "q_proj", None), nn.Module):
                h.register_hook(attn.q_proj.register_forward_hook(self._query_hook(k)))
        first = self.prune_layers[0]
        for i in range(first, len(self.layers)):
            h.register_hook(self.layers[i].register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))

    # ----- hooks -------------------------------------------------------------------------------------
    def _before_lm(self, module, args, kwargs):
        self.call = None
        self._drop_reuse()
        if not self.handle.enabled:
            return None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        info = self.handle.current
        # The first text-model call of a prepared call may be a prefill; the decode steps after it are not
        # (no cache read there: generate may compile them).
        # (A call the handle prepared nothing for, info None, is checked every time.)
        prefill = (info is None or info is not self.prepared) and is_empty_cache(cache, self.prune_layers[0])
        self.prepared = info
        if prefill and cache is not None and getattr(cache, STAGES_ATTR, None) is not None:
            delattr(cache, STAGES_ATTR)  # a cache reused for a new conversation: its old stages are void
        if prefill and (info is None or not info.items):
            self.stages = []
            return None
        if not prefill and cache is not self.stage_cache and getattr(cache, STAGES_ATTR, None) is not None:
            # a conversation continued from a cache this stage pruned (not the last one it pruned)
            self.stages, self.prompt_length = getattr(cache, STAGES_ATTR)
            self.stage_cache = cache
        if not prefill and (not self.stages or cache is not self.stage_cache):
            return None  # decoding on a cache whose prefill this stage did not prune: nothing to substitute
        self.call = _Call(prefill=prefill, cache=cache, mask2d=kwargs.get("attention_mask"),
                          position_ids=kwargs.get("position_ids"))
        if prefill:
            wants = kwargs.get("output_hidden_states")
            # the recorded last hidden state is the norm's output: with it asked for, the norm keeps the
            # pruned length and the scatter waits for the model's output (_after_lm)
            self.call.scatter_before_norm = not (wants if wants is not None else
                                                 getattr(self.lm.config, "output_hidden_states", False))
            self.stages = []
            self.stage_cache = cache
        return None

    def _capture_hook(self, k: int):
        def hook(module, args, kwargs, output):
            call = self.call
            if call is None or not call.prefill:
                return None
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = _batched(kwargs["position_embeddings"], hidden.shape[0])
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            keys = None
            if cache is not None and len(cache.layers) > module.layer_idx:
                keys = cache.layers[module.layer_idx].keys
                if keys is not None and keys.shape[2] != hidden.shape[1]:
                    keys = None
            projected = call.projected.pop(k, None)
            if projected is not None and projected.shape[:2] != hidden.shape[:2]:
                projected = None
            call.captures[k] = AttentionCapture(module, hidden, cos, sin, keys, projected)
            return None

        return hook

    def _query_hook(self, k: int):
        def hook(module, args, output):
            call = self.call
            if call is not None and call.prefill:
                call.projected[k] = output
            return None

        return hook

    def _layer_hook(self, i: int):
        def hook(module, args, kwargs):
            call = self.call
            if call is None:
                return None
            if i in self.prune_layers and call.prefill:
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                new_hidden = self._prune(i, hidden, kwargs)
                call.kwargs_by_layer.clear()
                args = (new_hidden, *args[1:]) if args else args
                if not args:
                    kwargs["hidden_states"] = new_hidden
            stage = self._stage_for(i)
            if stage is None:
                return None
            sub = call.kwargs_by_layer.get(stage.layer)
            if sub is None:
                sub = self._layer_kwargs(stage, kwargs, args[0] if args else kwargs["hidden_states"])
                call.kwargs_by_layer[stage.layer] = sub
            kwargs.update(sub)
            return args, kwargs

        return hook

    def _after_lm(self, module, args, kwargs, output):
        call, self.call = self.call, None
        if call is not None and call.prefill and self.stages and call.cache is not None:
            # what every decode step on this cache needs, kept with it: a conversation continues from it later
            setattr(call.cache, STAGES_ATTR, (self.stages, self.prompt_length))
        self._drop_reuse()
        if call is None or not call.prefill or not self.stages or self.handle.in_generate or call.scattered:
            return None
        # Outside generate: put every dropped token back at its column, with the state it was dropped in.
        norm = getattr(module, "norm", None)
        # every stage's input, in order (a dropped column keeps its last), then the final states
        inputs = [states for _, states in call.dropped]
        if norm is not None:
            # one norm over every stage's input (it acts on each token alone): fewer ops than one per stage
            inputs = [norm(inputs[0])] if len(inputs) == 1 else norm(torch.cat(inputs, 1)).split(
                [s.shape[1] for s in inputs], 1)
        pieces = [(cols, states) for (cols, _), states in zip(call.dropped, inputs)]
        pieces.append((self.stages[-1].columns, output.last_hidden_state))
        output.last_hidden_state = scatter_tokens(self.original_mask.shape[1], pieces)
        return output

    def _before_norm(self, module, args):
        """Outside generate, the final norm's input put back at the original length (every dropped token
        with the state it was dropped in, as :meth:`_after_lm` does after the norm): the norm, which acts on
        each token alone, then runs once on the whole sequence instead of once per stage's dropped states."""
        call = self.call
        if call is None or not call.prefill or not call.scatter_before_norm or not self.stages or call.scattered:
            return None
        if self.handle.in_generate or not args or not torch.is_tensor(args[0]):
            return None
        pieces = [*call.dropped, (self.stages[-1].columns, args[0])]
        call.scattered = True
        return (scatter_tokens(self.original_mask.shape[1], pieces), *args[1:])

    # ----- pruning -----------------------------------------------------------------------------------
    def _stage_for(self, i: int) -> Stage | None:
        current = None
        for s in self.stages:
            if s.layer <= i:
                current = s
        return current

    def _prune(self, k: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        call = self.call
        handle = self.handle
        info = handle.current
        previous = self.stages[-1] if self.stages else None
        # generate's beam search / num_return_sequences repeat every row (repeat_interleave): expanded row
        # r is the caller's row r // factor, and each of its copies is pruned as the row alone.
        factor = _expansion(info, hidden.shape[0])
        with timer(hidden.device) as t:
            if previous is None:
                mask = prefill_padding_mask(call.mask2d, info.attention_mask, *hidden.shape[:2])
                if mask is None:
                    mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
                self.original_mask = mask
                self.prompt_length = mask.shape[1]
                columns = torch.where(mask.bool(), torch.arange(mask.shape[1], device=hidden.device), -1)
                cos, sin = _batched(kwargs["position_embeddings"], hidden.shape[0])
                position_ids = kwargs.get("position_ids")
                if position_ids is not None and position_ids.shape[-2] != hidden.shape[0]:
                    position_ids = position_ids.expand(*position_ids.shape[:-2], hidden.shape[0], -1)
                visual, visual_tokens, text = _split_columns(info, mask, factor, handle.text_counts)
                # Assisted decoding verifies candidate tokens in the prefill itself: they are kept, and the
                # method chooses from the prompt alone, as it does without an assistant.
                prompt = info.attention_mask.shape[1]
                if mask.shape[1] > prompt:  # (sizes known on the host: no boolean indexing otherwise)
                    tail = [cols[cols >= prompt] for cols in text]
                    text = [cols[cols < prompt] for cols in text]
                else:
                    tail = [cols[:0] for cols in text]
            else:
                mask, columns = previous.mask, previous.columns
                cos, sin, position_ids = previous.cos, previous.sin, previous.position_ids
                visual, visual_tokens, text = previous.visual, previous.visual_tokens, previous.text
                tail = previous.tail
            scoring_mask = mask
            if any(cols.numel() for cols in tail):
                scoring_mask = mask.clone()
                for r, cols in enumerate(tail):
                    scoring_mask[r, cols] = 0
            if call.original_visual is None:
                call.original_visual = [
                    sum(it.columns.numel() for it in info.items if it.row == r // factor) for r in range(mask.shape[0])
                ]
            ctx = LLMContext(
                layer=k, hidden=hidden, attention_mask=scoring_mask, visual=visual, visual_tokens=visual_tokens, text=text,
                items=info.items, original_visual=list(call.original_visual), capture=call.captures[k],
                layer_module=self.layers[k],
            )
            keep = self.method.select(ctx)
            rows_keep, kept_visual, new_visual_tok = [], [], []
            for r in range(mask.shape[0]):
                kv = _as_index(keep[r], hidden.device).sort().values
                kept_visual.append(visual[r].index_select(0, kv))
                parts = [text[r], kept_visual[r], tail[r]] if tail[r].numel() else [text[r], kept_visual[r]]
                rows_keep.append(torch.cat(parts).sort().values)
                new_visual_tok.append(visual_tokens[r].index_select(0, _as_index(kv, visual_tokens[r].device)))
            # Into the current sequence; one row needs no padding (its length is its own): a plain select.
            one_row = mask.shape[0] == 1
            index = rows_keep if one_row else column_index(rows_keep, device=hidden.device)
            take = Columns(rows_keep[0] if one_row else index)
            new_hidden = take.tokens(hidden)
            new_columns = take.take(columns, -1)
            new_mask = _as_long(take.take(mask, 0))  # text may hold padding
            # What every column held entering this layer: outside generate, a token dropped here keeps that
            # state (later stages and the final states overwrite the columns they still hold).
            call.dropped.append((columns, hidden))
            if handle.stage_config["llm"].renumber_positions:
                cos, sin = self._rotary(new_hidden, renumbered_positions(new_mask))
            else:
                cos, sin = take.tokens(cos), take.tokens(sin)
            new_pos = None if position_ids is None else take.take(position_ids, 0)
            # Map visual/text columns into the new sequence: each row of the index is ascending (left
            # padding -1 first), so a kept column's new place is where it sorts in.
            new_visual, new_text, new_tail = [], [], []
            for r in range(mask.shape[0]):
                row = index[r]
                new_visual.append(torch.searchsorted(row, kept_visual[r]))
                new_text.append(torch.searchsorted(row, text[r]))
                new_tail.append(torch.searchsorted(row, tail[r]) if tail[r].numel() else tail[r])
        unmasked = (previous.unmasked if previous is not None else call.mask2d is None) and mask.shape[0] == 1
        self.stages.append(Stage(k, new_columns, new_mask, cos, sin, new_pos, new_visual, new_visual_tok, new_text,
                                 new_tail, unmasked, gather=take.index if one_row else None))
        current = call.captures[k].current
        if current is not None and current.module is self.layers[k].self_attn:
            self._reuse_projections(current, take, mask.shape[0])
        requested = handle.requested_keep(self.prune_layers.index(k), "llm")
        for r, sample in enumerate(info.samples):
            sample.layers[k] = int(new_visual[r * factor].numel())
            available = int(visual[r * factor].numel())
            if requested is not None and requested > available:
                handle.note("keep", f"`keep`={requested} is more than the {available} visual tokens row {r} holds at "
                            f"layer {k} (method {handle.spec.name!r}): all {available} kept", sample.extra)
            sample.llm_elapsed.append(t.share(len(info.samples)))
        return new_hidden

    def _reuse_projections(self, capture: AttentionCapture, take: Columns, rows: int) -> None:
        """Hand layer K's ``q_proj`` / ``k_proj`` the scoring's projections of the tokens it keeps (rows of a
        linear map of row-wise normed states: gathering them is projecting the gathered rows). The
        projection then runs on an empty input; both hooks go after one call, or at the end of the call."""
        attn = capture.module
        for name, full in (("q_proj", capture.projected), ("k_proj", capture.projected_keys)):
            linear = getattr(attn, name, None)
            if full is None or type(linear) is not nn.Linear or full.shape[:2] != (rows, capture.hidden.shape[1]):
                continue
            kept = take.tokens(full)
            handles: list[Any] = []

            def before(module, args, kept=kept, handles=handles):
                if args[0].shape[:-1] != kept.shape[:-1]:  # not the call this was prepared for
                    for h in handles:
                        h.remove()
                    return None
                return (args[0][..., :0, :],)

            def after(module, args, output, kept=kept, handles=handles):
                for h in handles:
                    h.remove()
                return kept

            handles += [linear.register_forward_pre_hook(before), linear.register_forward_hook(after)]
            self._reused += handles

    def _drop_reuse(self) -> None:
        for h in self._reused:
            h.remove()
        self._reused.clear()

    def _rotary(self, hidden: torch.Tensor, positions: torch.Tensor):
        """The rotary tables of ``[B, L]`` positions, on each of the family's rotary axes (M-RoPE)."""
        return self.lm.rotary_emb(hidden, rope_positions(positions, self.handle.adapter.position_axes))

    def _layer_kwargs(self, stage: Stage, kwargs: dict, hidden: torch.Tensor) -> dict[str, Any]:
        call = self.call
        cache = call.cache
        renumber = self.handle.stage_config["llm"].renumber_positions
        # All ones, known on the host: built from no 2-D mask, as the plain model builds it then.
        unmasked = stage.unmasked and (call.prefill or call.mask2d is None)
        mask2d = None
        if call.prefill:
            mask2d = None if unmasked else stage.mask
            cos, sin, position_ids = stage.cos, stage.sin, stage.position_ids
        else:
            q = hidden.shape[1]
            if not unmasked or renumber:
                mask2d = decode_mask(stage.mask, call.mask2d, self.prompt_length,
                                     decode_key_length(cache, q, stage.layer))
            cos, sin = kwargs["position_embeddings"]
            position_ids = kwargs.get("position_ids")
            if renumber:
                cos, sin = self._rotary(hidden, decode_positions(mask2d, cache, q, stage.layer))
        key = None
        if call.prefill:
            gathered = self._gathered_mask(stage, kwargs)
            if gathered is not None:
                stage.mask4d, stage.mask4d_set = gathered[0], True
                return {"attention_mask": gathered[0], "position_embeddings": (cos, sin), "position_ids": position_ids}
        builder = self._builders.get(stage.layer)
        if builder is None:
            builder = self._builders[stage.layer] = causal_mask_builder(self.lm.config, stage.layer)
        if unmasked and call.prefill and not getattr(cache, "is_compileable", False):
            # A prefill mask without padding depends on the length alone (the layer's cache is empty, or
            # sized by the query): built once per length, dtype and attention kernel.
            key = (builder, hidden.shape[1], hidden.dtype, hidden.device, self.lm.config._attn_implementation)
            if key in self._mask_cache:
                return {"attention_mask": self._mask_cache[key], "position_embeddings": (cos, sin),
                        "position_ids": position_ids}
        mask = builder(
            config=self.lm.config, inputs_embeds=hidden, attention_mask=mask2d, cache=cache,
            position_ids=None, layer_idx=stage.layer,
        )
        if call.prefill:
            stage.mask4d, stage.mask4d_set = mask, True
        if key is not None:
            if len(self._mask_cache) >= 8:
                self._mask_cache.pop(next(iter(self._mask_cache)))
            self._mask_cache[key] = mask
        return {"attention_mask": mask, "position_embeddings": (cos, sin), "position_ids": position_ids}


    def _gathered_mask(self, stage: Stage, kwargs: dict) -> tuple[Any] | None:
        """The prefill mask of ``stage``'s layers taken from the previous sequence's (one row, full causal
        layers, a dynamic cache: :func:`~tokenreduce.core.sequence.gathered_causal_mask`); None otherwise."""
        g = stage.gather
        config = self.lm.config
        if g is None or not full_causal(config, stage.layer) or getattr(self.call.cache, "is_compileable", False):
            return None
        at = self.stages.index(stage)
        if at == 0:
            prior, length = kwargs.get("attention_mask"), self.original_mask.shape[1]
        else:
            before = self.stages[at - 1]
            if not before.mask4d_set or not full_causal(config, before.layer):
                return None
            prior, length = before.mask4d, before.mask.shape[1]
        return gathered_causal_mask(prior, length, g)


def _as_index(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` as int64 on ``device`` (no op dispatched when it is already)."""
    return t if t.dtype == torch.long and t.device == device else t.to(device, torch.long)


def _as_long(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.long else t.long()


def _batched(embeddings: tuple[torch.Tensor, torch.Tensor], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = embeddings
    if cos.shape[0] == batch and sin.shape[0] == batch:
        return cos, sin
    return cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)


def _expansion(info, rows: int) -> int:
    """How many times ``generate`` repeated each of the caller's rows (beams, returned sequences)."""
    batch = len(info.samples)
    if batch == 0 or rows % batch:
        raise RuntimeError(f"the LLM received {rows} rows for a call of {batch} rows; expected a multiple of {batch}")
    return rows // batch


def _split_columns(info, mask: torch.Tensor, factor: int = 1, text_counts: list[int] | None = None):
    """Per row: visual columns, their (item, token) ids, and text columns of the LLM-input sequence.

    Row ``r`` of ``mask`` is the caller's row ``r // factor`` (``generate`` repeats rows for beams).
    ``text_counts``: the caller's rows' text tokens, padding excluded (read by the handle in a batched
    call); without them (one row) every non-visual column is text, padding included (``attention_mask``
    tells it apart), so no count has to be read from the device."""
    visual, tokens, text = [], [], []
    for r in range(mask.shape[0]):
        cols, ids = [], []
        for i, it in enumerate(info.items):
            if it.row == r // factor:
                cols.append(_as_index(it.columns, mask.device))
                ids.append(_as_index(torch.stack([torch.full_like(it.sources, i), it.sources], dim=1), mask.device))
        if len(cols) == 1:  # one item: its columns are ascending already
            vis, tok = cols[0], ids[0]
        else:
            vis = torch.cat(cols) if cols else torch.zeros(0, dtype=torch.long, device=mask.device)
            tok = torch.cat(ids) if ids else torch.zeros(0, 2, dtype=torch.long, device=mask.device)
            order = vis.argsort()
            vis, tok = vis[order], tok[order]
        visual.append(vis)
        tokens.append(tok)
        if text_counts is not None:
            is_text = mask[r] != 0
        else:
            is_text = torch.ones(mask.shape[1], dtype=torch.bool, device=mask.device)
        is_text.index_fill_(0, vis, False)
        count = text_counts[r // factor] if text_counts is not None else mask.shape[1] - vis.numel()
        text.append(torch.nonzero_static(is_text, size=count).view(-1))
    return visual, tokens, text
