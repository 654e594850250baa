"""Tiny random-weight VLMs saved with their processors, in a shape vLLM's CPU backend serves.

vLLM's CPU attention takes head dims 32 and 64 only, so these are :func:`~tokenreduce.testing.tiny.tiny_config`
models with 2 attention heads of 32 (and Qwen's M-RoPE sections resized to match). Saved with
``save_pretrained`` next to the tiny processor, a directory loads both in transformers and in vLLM.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from tokenreduce.testing.tiny import IMAGE_TOKEN, tiny_config, tiny_processor, tiny_tokenizer

VLLM_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava", "llava_next", "llava_onevision")
# LLaVA-OneVision's crop resolutions: up to 4 x 4 crops of 56 pixels, so a large image's canvas (16 x 16
# patches) exceeds anyres_max_9 and is downsampled (vLLM packs with anyres_max_9 whatever the config says).
ONEVISION_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112], [112, 168], [168, 112], [224, 224]]
# LLaVA-NeXT's: up to 2 x 3 crops of 56 pixels (its canvas is unpadded, never downsampled).
NEXT_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112], [112, 168], [168, 112]]
# Qwen processors resize images to at most this many pixels (16 x 16 patches of 14: 64 merged tokens).
QWEN_MAX_PIXELS = 224 * 224


def vllm_config(family: str, num_layers: int = 2, heads: int = 2, head_dim: int = 32, hidden: int | None = None,
                vision_layers: int | None = None, vision_width: int | None = None, intermediate: int | None = None):
    """Config of a tiny ``family`` model whose LM attention vLLM's CPU backend runs; Qwen's vision tower
    can be made deeper (``vision_layers``) and wider (``vision_width``, heads of 64)."""
    cfg = tiny_config(family, attn_implementation="sdpa", num_layers=num_layers)
    if family == "qwen2_vl" and (vision_layers or vision_width):
        vis = cfg.vision_config
        vis.depth = vision_layers or vis.depth
        if vision_width:
            vis.embed_dim, vis.num_heads = vision_width, max(1, vision_width // 64)
    text = cfg.text_config
    text.hidden_size = hidden or heads * head_dim
    text.num_attention_heads = heads
    text.num_key_value_heads = max(1, heads // 2)
    text.head_dim = head_dim
    text.intermediate_size = intermediate or 2 * text.hidden_size
    rope = getattr(text, "rope_parameters", None)
    if rope and "mrope_section" in rope:
        half = head_dim // 2
        t = half // 4
        rope["mrope_section"] = [t, (half - t) // 2, half - t - (half - t) // 2]
    if family == "llava_next":
        cfg.vision_config.image_size = 56
        cfg.image_grid_pinpoints = NEXT_PINPOINTS
    if family == "llava_onevision":
        cfg.image_grid_pinpoints = ONEVISION_PINPOINTS
        cfg.vision_aspect_ratio = "anyres_max_9"
    if family == "qwen2_vl":
        cfg.vision_config.hidden_size = text.hidden_size
    elif family == "qwen2_5_vl":
        cfg.vision_config.out_hidden_size = text.hidden_size
    # Wider random weights than the default 0.02: next-token distributions far from uniform, so a test
    # comparing log-probabilities sees every visual token.
    text.initializer_range = 0.15
    cfg.initializer_range = 0.15
    cfg.torch_dtype = torch.float32
    return cfg


def build_vllm_model(family: str, seed: int = 0, **config_options) -> nn.Module:
    """A random-weight transformers model of ``family`` in the vLLM-servable shape (fp32, eval mode)."""
    import transformers as T

    classes = {
        "llava": T.LlavaForConditionalGeneration,
        "qwen2_vl": T.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": T.Qwen2_5_VLForConditionalGeneration,
        "llava_onevision": T.LlavaOnevisionForConditionalGeneration,
        "llava_next": T.LlavaNextForConditionalGeneration,
    }
    if family not in classes:
        raise ValueError(f"`family` must be one of {tuple(classes)}, got {family!r}")
    torch.manual_seed(seed)
    model = classes[family](vllm_config(family, **config_options))
    with torch.no_grad():
        for p in model.parameters():  # make zero-initialised vectors (biases, newlines) matter
            if p.dim() == 1 and p.abs().max() == 0 and p.numel() > 1:
                p.normal_(0, 0.5)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model.eval()


# Placeholder words: Qwen's own, so vLLM's chat placeholders ("<|image_pad|>") are the model's tokens.
PLACEHOLDERS = {
    "qwen2_vl": ("<|image_pad|>", "<|video_pad|>"),
    "qwen2_5_vl": ("<|image_pad|>", "<|video_pad|>"),
    "llava": ("<image>", "<video>"),
    "llava_onevision": ("<image>", "<video>"),
    "llava_next": ("<image>", "<video>"),
}
# A chat template that writes each message's content as is (vLLM puts the placeholders in the text).
CHAT_TEMPLATE = "<s>{% for m in messages %} {{ m['content'] }}{% endfor %}"


def vllm_processor(family: str, max_pixels: int = QWEN_MAX_PIXELS):
    """The tiny processor of ``family`` with a chat template; Qwen's keeps up to ``max_pixels`` per image."""
    builders = {"llava_onevision": _onevision_processor, "llava_next": _next_processor}
    processor = builders[family]() if family in builders else tiny_processor(family)
    image, video = PLACEHOLDERS[family]
    tok = processor.tokenizer
    if image != "<image>":
        vocab = tok.get_vocab()
        tok = _renamed_tokenizer(tok, {"<image>": image, "<video>": video})
        assert tok.convert_tokens_to_ids(image) == vocab["<image>"] == IMAGE_TOKEN
        processor.tokenizer = tok
        processor.image_token, processor.video_token = image, video
        tok.image_token, tok.video_token = image, video
    tok.chat_template = CHAT_TEMPLATE
    processor.chat_template = CHAT_TEMPLATE
    if family in ("qwen2_vl", "qwen2_5_vl"):
        size = {"shortest_edge": 56 * 56, "longest_edge": max_pixels}
        processor.image_processor.size = size
        processor.video_processor.size = size
    return processor


def _onevision_processor():
    """LLaVA-OneVision's processor for the tiny config: 56-pixel crops at :data:`ONEVISION_PINPOINTS`."""
    import transformers as T

    side = {"height": 56, "width": 56}
    return T.LlavaOnevisionProcessor(
        image_processor=T.LlavaOnevisionImageProcessor(size=side, image_grid_pinpoints=ONEVISION_PINPOINTS),
        video_processor=T.LlavaOnevisionVideoProcessor(size=side, do_sample_frames=False),
        tokenizer=tiny_tokenizer(), num_image_tokens=16, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )


def _next_processor():
    """LLaVA-NeXT's processor for the tiny config: 56-pixel crops at :data:`NEXT_PINPOINTS`."""
    import transformers as T

    image_processor = T.LlavaNextImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                                image_grid_pinpoints=NEXT_PINPOINTS)
    return T.LlavaNextProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer(), patch_size=14,
                                vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _renamed_tokenizer(tok, renames: dict[str, str]):
    """The tiny word-level tokenizer with some special words renamed (ids unchanged)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {renames.get(w, w): i for w, i in tok.get_vocab().items()}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w3"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = ["<pad>", "<s>", "</s>", *renames.values(), "<|vision_start|>", "<|vision_end|>"]
    raw.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="w3",
        extra_special_tokens={"image_token": renames["<image>"], "video_token": renames["<video>"]},
        padding_side="left",
    )


def save_vllm_model(family: str, directory: str | os.PathLike, seed: int = 0, max_pixels: int = QWEN_MAX_PIXELS,
                    **config_options) -> Path:
    """Build and save a tiny ``family`` model with its processor into ``directory``; returns the path."""
    path = Path(directory)
    model = build_vllm_model(family, seed=seed, **config_options)
    model.save_pretrained(path)
    vllm_processor(family, max_pixels=max_pixels).save_pretrained(path)
    return path
