"""Independent references for the oracles: feed a reduced sequence to the UNWRAPPED model directly.

Nothing here goes through tokenreduce's input rebuilding: the reduced sequence is assembled token by token
from the original row, its embeddings and its original position ids.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext

import torch

from tokenreduce.adapters import get_adapter
from tokenreduce.core.reduction import ReduceContext
from tokenreduce.core.registry import get_method
from tokenreduce.testing.tiny import IMAGE_TOKEN, VIDEO_TOKEN

QWEN = ("qwen2_vl", "qwen2_5_vl")


def encoder_features(model, modality, batch):
    fn = getattr(model.model, f"get_{modality}_features")
    params = inspect.signature(fn).parameters
    with torch.no_grad():
        out = fn(**{k: v for k, v in batch.items() if k in params}, return_dict=True).pooler_output
    items = out.unbind(0) if torch.is_tensor(out) else out
    return [t.reshape(-1, t.shape[-1]) for t in items]


def original_positions(model, batch):
    """Position ids of the original sequence: [B, L] (index among valid tokens) or [3, B, L] for Qwen."""
    mask = batch["attention_mask"]
    if model.config.model_type in QWEN:
        keys = ("image_grid_thw", "video_grid_thw", "mm_token_type_ids", "second_per_grid_ts")
        kwargs = {k: batch[k] for k in keys if k in batch}
        pos, _ = model.model.get_rope_index(batch["input_ids"], attention_mask=mask, **kwargs)
        return pos
    return (mask.cumsum(-1) - 1).clamp_min(0)


def recorded_reductions(model):
    """The reductions a wrapped model applied in its last call, per modality in item order."""
    from tokenreduce.core.api import get_handle

    out = {}
    for item in get_handle(model).last_batch.items:
        out.setdefault(item.modality, []).append(item.reduction)
    return out


def wrapped_call(model, batch, method, **options):
    """The logits of one forward of ``model`` wrapped with ``method`` and the reductions it applied (image
    items); the model is unwrapped again."""
    import tokenreduce as tr

    tr.wrap(model, method, **options)
    try:
        with torch.no_grad():
            logits = model(**batch).logits
        recorded = recorded_reductions(model)["image"]
    finally:
        tr.unwrap(model)
    return logits, recorded


def _reduced_modalities(method) -> tuple[str, ...]:
    """What a wrapped model reduces with ``method``: its config's ``modalities``, else its registered ones."""
    config = getattr(method, "config", None)
    if getattr(config, "modalities", None):
        return tuple(config.modalities)
    name = getattr(method, "name", "")
    return get_method(name).modalities if name else ("image", "video")


def reduced_rows(model, method, batch, modalities=None, recorded=None):
    """Per row: (embeddings [L', D], positions [.., L'], kept original columns) of the reduced sequence.

    Positions are the original ones at the kept columns, or ``0..L'-1`` when the method's config sets
    ``renumber_positions``.

    The reductions come from ``method`` run on the unwrapped encoder's features, or, for methods that
    read the vision tower, from ``recorded`` (:func:`recorded_reductions` of the wrapped model).
    """
    adapter = get_adapter(model)
    modalities = _reduced_modalities(method) if modalities is None else modalities
    ids, mask = batch["input_ids"], batch["attention_mask"]
    placeholder = {"image": IMAGE_TOKEN, "video": VIDEO_TOKEN}
    positions = original_positions(model, batch)
    embeds = model.model.get_input_embeddings()(ids).detach()
    per_token = {}  # (row, col) -> replacement embedding or None (dropped)
    for modality in ("image", "video"):
        coords = (ids == placeholder[modality]).nonzero().tolist()
        if not coords:
            continue
        feats = encoder_features(model, modality, batch)
        layouts = adapter.layouts(modality, batch, None if recorded else [f.shape[0] for f in feats])
        offset = 0
        for i, (f, layout) in enumerate(zip(feats, layouts)):
            n = layout.num_tokens
            row = coords[offset][0]
            if recorded is not None:
                red = recorded[modality][i]
                out = red.output_features(f)
                sources = red.sources.tolist()
            elif modality in modalities:
                seed = getattr(method.config, "seed", None)
                gen = None if seed is None else torch.Generator().manual_seed(seed)
                text = {}
                if getattr(method, "uses_text", False):
                    # the row's input embeddings and its text columns: real, not a visual placeholder
                    is_text = mask[row].bool() & (ids[row] != IMAGE_TOKEN) & (ids[row] != VIDEO_TOKEN)
                    text = dict(text_embeds=embeds[row], text_mask=is_text)
                ctx = ReduceContext(layout=layout, modality=modality, row=row, item=i, generator=gen, **text)
                red = method.reduce(f, ctx).sorted()
                out = red.output_features(f)
                sources = red.sources.tolist()
            else:
                out, sources = f, list(range(n))
            for j in range(n):
                per_token[tuple(coords[offset + j])] = []
            for k, s in enumerate(sources):
                per_token[tuple(coords[offset + s])].append(out[k])
            offset += n
    rows = []
    for r in range(ids.shape[0]):
        emb, cols = [], []
        for c in range(ids.shape[1]):
            if mask[r, c] == 0:
                continue
            if (r, c) in per_token:
                for e in per_token[(r, c)]:
                    emb.append(e)
                    cols.append(c)
            else:
                emb.append(embeds[r, c])
                cols.append(c)
        cols_t = torch.tensor(cols)
        pos = positions[..., r, :][..., cols_t]
        if getattr(getattr(method, "config", None), "renumber_positions", False):
            # renumber_positions: the reduced row reads consecutive positions (every M-RoPE axis alike)
            pos = torch.arange(cols_t.numel()).expand_as(pos).clone()
        rows.append((torch.stack(emb), pos, cols_t))
    return rows


def reference_logits(model, emb, pos):
    """Logits of the unwrapped model on one reduced row given as embeddings."""
    position_ids = pos[:, None, :] if pos.dim() == 2 else pos[None]
    with torch.no_grad():
        return model(
            inputs_embeds=emb[None], attention_mask=torch.ones(1, emb.shape[0], dtype=torch.long),
            position_ids=position_ids,
        ).logits[0]


def reference_generate(model, emb, pos, max_new_tokens=8):
    position_ids = pos[:, None, :] if pos.dim() == 2 else pos[None]
    with torch.no_grad():
        out = model.generate(
            inputs_embeds=emb[None], attention_mask=torch.ones(1, emb.shape[0], dtype=torch.long),
            position_ids=position_ids, max_new_tokens=max_new_tokens, do_sample=False,
        )
    return out[0, -max_new_tokens:]


# ----- the LLM stage: which tokens a method keeps, from its definition on the unwrapped model -------------
def visual_tokens(model, batch):
    """Per row: ``{column: (layout, index in the layout)}`` of every visual placeholder of the LLM input."""
    adapter = get_adapter(model)
    ids = batch["input_ids"]
    out = [{} for _ in range(ids.shape[0])]
    for modality, token in (("image", IMAGE_TOKEN), ("video", VIDEO_TOKEN)):
        coords = (ids == token).nonzero().tolist()
        if not coords:
            continue
        layouts = adapter.layouts(modality, batch, [f.shape[0] for f in encoder_features(model, modality, batch)])
        offset = 0
        for layout in layouts:
            for j in range(layout.num_tokens):
                row, col = coords[offset + j]
                out[row][col] = (layout, j)
            offset += layout.num_tokens
    return out


@contextmanager
def hide_columns(model, kept, prompt_len, record=None, renumber=False):
    """Inside the block, the UNWRAPPED model hides from every layer ``>= K`` the prompt columns not in
    ``kept[K]`` (per row, the prompt columns kept from stage ``K`` on): explicit 4D additive masks, original
    positions (or, with ``renumber``, the kept tokens' ranks), the hidden tokens still computed.

    ``record`` (a dict), when given, receives the hidden states entering each stage layer in prefill.
    """
    lm = model.model.language_model
    state = {}
    handles = [lm.register_forward_pre_hook(lambda m, a, k: state.update(mask2d=k.get("attention_mask")),
                                            with_kwargs=True)]
    stages = sorted(kept)

    def layer_hook(i):
        def hook(module, args, kwargs):
            stage = max((k for k in stages if k <= i), default=None)
            if stage is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            b, q = hidden.shape[:2]
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            past = cache.get_seq_length(i) if cache is not None else 0
            if record is not None and i in kept and past == 0:
                record[i] = hidden.detach().clone()
            kv = past + q
            allowed = torch.arange(kv)[None, None, :] <= torch.arange(past, past + q)[None, :, None]
            allowed = allowed.expand(b, q, kv).clone()
            mask2d = state.get("mask2d")
            if mask2d is not None and mask2d.dim() == 2:
                allowed &= mask2d[:, None, :kv].bool()
            visible = torch.zeros(b, kv, dtype=torch.bool)
            visible[:, prompt_len:] = True
            for r in range(b):
                visible[r, kept[stage][r]] = True
            allowed &= visible[:, None, :]
            kwargs["attention_mask"] = torch.zeros(b, 1, q, kv, dtype=hidden.dtype).masked_fill(
                ~allowed[:, None], torch.finfo(hidden.dtype).min)
            if renumber:
                # a kept token's position is its rank among the row's visible tokens
                rank = (visible & (mask2d[:, :kv].bool() if mask2d is not None else True)).long().cumsum(-1) - 1
                positions = rank[:, past:kv]
                if kwargs.get("position_ids") is not None and kwargs["position_ids"].dim() == 3:
                    positions = positions[None].expand(3, -1, -1)
                kwargs["position_embeddings"] = lm.rotary_emb(hidden, positions)
            return args, kwargs
        return hook

    for i in range(min(stages), len(lm.layers)):
        handles.append(lm.layers[i].register_forward_pre_hook(layer_hook(i), with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def llm_stage_reference(model, batch, layers, select, renumber=False, score_offset=1, is_visual=None):
    """What an in-LLM pruning method's definition gives on the UNWRAPPED eager model ``model``.

    ``select(stage, attention, visual, text, row)`` returns, of the row's remaining ``visual`` columns, those
    kept from stage ``layers[stage]`` on, given ``attention`` (``[H, L, L]`` probabilities of layer
    ``K - 1`` on the sequence as the previous stages left it) and the row's ``text`` columns. Each stage's
    attention comes from a run hiding what the previous stages dropped.

    Returns ``(logits, kept visual columns per stage layer and row)``: logits at every valid column; a
    token dropped at layer ``K`` reads the final norm and LM head of its state entering layer ``K``.

    ``batch`` may give the sequence as ``inputs_embeds`` (a sequence reduced before the LLM, with its
    ``position_ids``); ``is_visual`` (``[B, L]`` bool) then says which columns are visual tokens.
    """
    mask = batch["attention_mask"]
    prompt_len = mask.shape[1]
    if is_visual is None:
        ids = batch["input_ids"]
        is_visual = (ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN)
    rows = mask.shape[0]
    visual = [is_visual[r].nonzero().flatten() for r in range(rows)]
    text = [(mask[r].bool() & ~is_visual[r]).nonzero().flatten() for r in range(rows)]
    kept_visual, kept = {}, {}
    current = visual
    for stage, layer in enumerate(layers):
        with hide_columns(model, kept, prompt_len, renumber=renumber) if kept else nullcontext(), torch.no_grad():
            attentions = model(**batch, output_attentions=True).attentions
        current = [torch.as_tensor(sorted(select(stage, attentions[layer - score_offset][r], current[r], text[r], r)),
                                   dtype=torch.long) for r in range(rows)]
        kept_visual[layer] = current
        kept[layer] = [torch.cat([text[r], current[r]]) for r in range(rows)]
    record = {}
    with hide_columns(model, kept, prompt_len, record=record, renumber=renumber), torch.no_grad():
        logits = model(**batch).logits.clone()
        lm = model.model.language_model
        head = model.get_output_embeddings()
        remaining = visual
        for layer in layers:
            for r in range(rows):
                dropped = sorted(set(remaining[r].tolist()) - set(kept_visual[layer][r].tolist()))
                if dropped:
                    logits[r, dropped] = head(lm.norm(record[layer][r, dropped]))
            remaining = kept_visual[layer]
    return logits, kept_visual
