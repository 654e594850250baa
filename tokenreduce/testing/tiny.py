"""Tiny random-weight models of the real transformers VLM classes, and batches to feed them.

Used by the test suite, the benchmarks and ``tokenreduce eval --model tiny:<family>``: every model
is built from a config (no download), every batch carries the exact placeholder counts the model's own
encoder produces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from tokenreduce.core.api import get_handle

VOCAB = 1000
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 999, 998, 997, 996
PAD, BOS, EOS = 0, 1, 2
FAMILIES = ("llava", "llava_next", "llava_next_video", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
VIDEO_FAMILIES = ("llava_next_video", "llava_onevision", "qwen2_vl", "qwen2_5_vl")


def _text(model_type: str = "llama", **overrides) -> dict:
    cfg = dict(
        model_type=model_type, vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        max_position_embeddings=4096,
    )
    cfg.update(overrides)
    return cfg


def _clip(image_size: int, **overrides) -> dict:
    cfg = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, image_size=image_size, patch_size=14)
    cfg.update(overrides)
    return cfg


def tiny_config(family: str, attn_implementation: str = "eager", num_layers: int = 4):
    """Config of a tiny model of ``family`` (one of :data:`FAMILIES`)."""
    import transformers as T

    text = _text(num_hidden_layers=num_layers)
    if family == "llava":
        cfg = T.LlavaConfig(vision_config=_clip(56), text_config=text, image_token_index=IMAGE_TOKEN)
    elif family == "llava_next":
        cfg = T.LlavaNextConfig(
            vision_config=_clip(28), text_config=text, image_token_index=IMAGE_TOKEN,
            image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]],
        )
    elif family == "llava_next_video":
        cfg = T.LlavaNextVideoConfig(
            vision_config=_clip(56), text_config=text, image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN,
            image_grid_pinpoints=[[56, 56], [56, 112], [112, 56]], spatial_pool_stride=2,
        )
    elif family == "llava_onevision":
        siglip = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, image_size=56, patch_size=14)
        cfg = T.LlavaOnevisionConfig(
            vision_config=siglip, text_config=_text("qwen2", num_hidden_layers=num_layers),
            image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN,
            vision_feature_select_strategy="full", vision_feature_layer=-1,
            image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112]], vision_aspect_ratio="anyres_max_1",
        )
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
        if family == "qwen2_vl":
            text_cfg = _text("qwen2_vl_text", rope_parameters=rope, num_hidden_layers=num_layers)
            vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                          spatial_merge_size=2, temporal_patch_size=2)
            cls = T.Qwen2VLConfig
        else:
            text_cfg = _text("qwen2_5_vl_text", rope_parameters=rope, num_hidden_layers=num_layers)
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                          fullatt_block_indexes=[1])
            cls = T.Qwen2_5_VLConfig
        cfg = cls(text_config=text_cfg, vision_config=vision, image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
                  vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    else:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    cfg._attn_implementation = attn_implementation
    for sub in ("text_config", "vision_config"):
        if getattr(cfg, sub, None) is not None:
            getattr(cfg, sub)._attn_implementation = attn_implementation
    return cfg


def model_class(family: str) -> type:
    """The transformers generation class of ``family``."""
    import transformers as T

    return {
        "llava": T.LlavaForConditionalGeneration,
        "llava_next": T.LlavaNextForConditionalGeneration,
        "llava_next_video": T.LlavaNextVideoForConditionalGeneration,
        "llava_onevision": T.LlavaOnevisionForConditionalGeneration,
        "qwen2_vl": T.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": T.Qwen2_5_VLForConditionalGeneration,
    }[family]


def tiny_model(family: str, seed: int = 0, attn_implementation: str = "eager", num_layers: int = 4) -> nn.Module:
    """A tiny random-weight generation model of ``family``, fp32, in eval mode."""
    torch.manual_seed(seed)
    model = model_class(family)(tiny_config(family, attn_implementation, num_layers))
    # Random init leaves the image newline / embeddings tiny; make visual tokens matter in the logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and p.abs().max() == 0 and p.numel() > 1:
                p.normal_(0, 0.5)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    return model.eval()


@dataclass
class RowSpec:
    """One batch row: its images (``(height, width)`` each), its videos (frame counts) and text lengths."""

    images: Sequence[tuple[int, int]] = ()
    videos: Sequence[int] = ()
    prefix: int = 3
    suffix: int = 4
    between: int = 2
    video_first: bool = False
    seed: int = field(default=0)


def _image_side(model) -> int:
    return model.config.vision_config.image_size if hasattr(model.config.vision_config, "image_size") else 56


def _media_inputs(model, family: str, images: list[tuple[int, int]], videos: list[int], gen: torch.Generator):
    """Pixel inputs for ``images`` and ``videos`` in the family's format."""
    out: dict = {}
    if family in ("qwen2_vl", "qwen2_5_vl"):
        patch_dim = 3 * 2 * 14 * 14
        if images:
            grids = [[1, h // 14, w // 14] for h, w in images]
            n = sum(g[1] * g[2] for g in grids)
            out["pixel_values"] = torch.randn(n, patch_dim, generator=gen)
            out["image_grid_thw"] = torch.tensor(grids)
        if videos:
            grids = [[f // 2, 4, 4] for f in videos]
            n = sum(g[0] * g[1] * g[2] for g in grids)
            out["pixel_values_videos"] = torch.randn(n, patch_dim, generator=gen)
            out["video_grid_thw"] = torch.tensor(grids)
        return out
    side = _image_side(model)
    if images:
        if family == "llava":
            out["pixel_values"] = torch.randn(len(images), 3, side, side, generator=gen)
        else:
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            counts = [
                image_size_to_num_patches(list(s), model.config.image_grid_pinpoints, side) for s in images
            ]
            pv = torch.zeros(len(images), max(counts), 3, side, side)
            for i, c in enumerate(counts):
                pv[i, :c] = torch.randn(c, 3, side, side, generator=gen)
            out["pixel_values"] = pv
            out["image_sizes"] = torch.tensor([list(s) for s in images])
    if videos:
        if len(set(videos)) != 1:
            raise ValueError("videos in one batch must have the same frame count for this family")
        out["pixel_values_videos"] = torch.randn(len(videos), videos[0], 3, side, side, generator=gen)
    return out


def _batch_media(model, family: str, rows: Sequence[RowSpec]) -> dict:
    """Media of every row, each drawn from its own seed so a row alone gets the same pixels as in a batch."""
    parts = [_media_inputs(model, family, list(r.images), list(r.videos), torch.Generator().manual_seed(r.seed))
             for r in rows]
    out: dict = {}
    for key in {k for p in parts for k in p}:
        values = [p[key] for p in parts if key in p]
        if key == "pixel_values" and values[0].dim() == 5:  # anyres: pad the crop axis
            most = max(v.shape[1] for v in values)
            values = [torch.cat([v, v.new_zeros(v.shape[0], most - v.shape[1], *v.shape[2:])], 1) for v in values]
        out[key] = torch.cat(values)
    return out


def _counts(model, modality: str, inputs: dict) -> list[int]:
    """Placeholder counts per item, from the model's own encoder (with any wrapping switched off)."""
    import inspect
    from contextlib import nullcontext

    fn = getattr(model.model, f"get_{modality}_features")
    params = inspect.signature(fn).parameters
    handle = get_handle(model)
    with torch.no_grad(), handle.disabled() if handle is not None else nullcontext():
        out = fn(**{k: v for k, v in inputs.items() if k in params}, return_dict=True).pooler_output
    if torch.is_tensor(out):
        return [int(t.reshape(-1, t.shape[-1]).shape[0]) for t in out.unbind(0)]
    return [int(t.reshape(-1, t.shape[-1]).shape[0]) for t in out]


def tiny_batch(model, rows: Sequence[RowSpec], left_pad: bool = True, labels: bool = False) -> dict:
    """Inputs for ``rows`` with placeholder counts matching ``model``'s encoder, left-padded."""
    family = model.config.model_type
    images = [s for r in rows for s in r.images]
    videos = [f for r in rows for f in r.videos]
    media = _batch_media(model, family, rows)
    img_counts = _counts(model, "image", media) if images else []
    vid_counts = _counts(model, "video", media) if videos else []
    qwen = family in ("qwen2_vl", "qwen2_5_vl")
    sequences, types = [], []
    img_iter, vid_iter = iter(img_counts), iter(vid_counts)
    for r in rows:
        g = torch.Generator().manual_seed(1000 + r.seed)

        def text(n, g=g):
            return torch.randint(3, 990, (n,), generator=g).tolist()

        ids, tt = [BOS, *text(r.prefix)], [0] * (1 + r.prefix)
        media_order = [("video", None)] * len(r.videos) + [("image", None)] * len(r.images)
        if not r.video_first:
            media_order = media_order[::-1]
        for modality, _ in media_order:
            n = next(vid_iter) if modality == "video" else next(img_iter)
            token = VIDEO_TOKEN if modality == "video" else IMAGE_TOKEN
            if qwen:
                ids += [VISION_START]
                tt += [0]
            ids += [token] * n
            tt += [2 if modality == "video" else 1] * n
            if qwen:
                ids += [VISION_END]
                tt += [0]
            ids += text(r.between)
            tt += [0] * r.between
        ids += text(r.suffix)
        tt += [0] * r.suffix
        sequences.append(ids)
        types.append(tt)
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    token_types = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (s, t) in enumerate(zip(sequences, types)):
        sl = slice(length - len(s), length) if left_pad else slice(0, len(s))
        input_ids[i, sl] = torch.tensor(s)
        attention_mask[i, sl] = 1
        token_types[i, sl] = torch.tensor(t)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, **media}
    if qwen:
        batch["mm_token_type_ids"] = token_types
    if labels:
        lab = input_ids.clone()
        lab[(attention_mask == 0) | (input_ids == IMAGE_TOKEN) | (input_ids == VIDEO_TOKEN) | (input_ids == BOS)] = -100
        batch["labels"] = lab
    return batch


def default_rows(family: str, n: int = 3, video: bool = False) -> list[RowSpec]:
    """``n`` rows with different image sizes and prompt lengths (videos too when ``video``)."""
    if family == "llava":
        sizes = [(56, 56)] * 3
    elif family == "llava_next":
        sizes = [(28, 28), (40, 60), (60, 30)]
    elif family in ("llava_next_video", "llava_onevision"):
        sizes = [(56, 56), (50, 100), (100, 60)]
    else:
        sizes = [(56, 56), (56, 84), (84, 56)]
    rows = []
    for i in range(n):
        spec = RowSpec(images=[sizes[i % 3]], prefix=2 + 2 * i, suffix=3 + i, seed=i)
        if video and family in VIDEO_FAMILIES:
            spec.videos = [4]
            if i == 1:
                spec.images = []
        rows.append(spec)
    return rows


def tiny_tokenizer(extra_special: Sequence[str] = ()):
    """A word-level tokenizer over :data:`VOCAB` ids: ``w<i>`` words plus the special tokens of the tiny models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<image>": IMAGE_TOKEN, "<video>": VIDEO_TOKEN,
                "<|vision_start|>": VISION_START, "<|vision_end|>": VISION_END}
    vocab = {f"w{i}": i for i in range(3, VISION_END)}
    vocab.update(specials)
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w3"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="w3",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"}, padding_side="left",
    )
    return tok


def tiny_processor(family: str):
    """A processor matching :func:`tiny_model` for ``llava`` and ``qwen2_vl`` / ``qwen2_5_vl``."""
    import transformers as T

    if family == "llava":
        image_processor = T.CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
        return T.LlavaProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer(), patch_size=14,
                                vision_feature_select_strategy="default", num_additional_image_tokens=1)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        tok = tiny_tokenizer()
        tok.image_token, tok.video_token = "<image>", "<video>"
        size = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
        image_processor = T.Qwen2VLImageProcessor(size=size)
        video_processor = T.Qwen2VLVideoProcessor(size=size)
        cls = T.Qwen2VLProcessor if family == "qwen2_vl" else T.Qwen2_5_VLProcessor
        return cls(image_processor=image_processor, tokenizer=tok, video_processor=video_processor)
    raise ValueError(f"no tiny processor for {family!r}; available: llava, qwen2_vl, qwen2_5_vl")
