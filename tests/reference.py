"""Independent references for the oracles: feed a reduced sequence to the UNWRAPPED model directly.

Nothing here goes through tokenreduce's input rebuilding: the reduced sequence is assembled token by token
from the original row, its embeddings and its original position ids.
"""

from __future__ import annotations

import inspect

import torch

from tokenreduce.adapters import get_adapter
from tokenreduce.core.reduction import ReduceContext
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


def reduced_rows(model, method, batch, modalities=("image", "video"), recorded=None):
    """Per row: (embeddings [L', D], positions [.., L'], kept original columns) of the reduced sequence.

    Positions are the original ones at the kept columns, or ``0..L'-1`` when the method's config sets
    ``renumber_positions``.

    The reductions come from ``method`` run on the unwrapped encoder's features, or, for methods that
    read the vision tower, from ``recorded`` (:func:`recorded_reductions` of the wrapped model).
    """
    adapter = get_adapter(model)
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
                ctx = ReduceContext(layout=layout, modality=modality, row=row, item=i, generator=gen)
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
