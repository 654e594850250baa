"""The shipped tiny VLMs: their configs, tokenizer, processors, where they live, and how to load them.

Three models of the real transformers classes, one per benchmark family:

* ``image``: ``LlavaForConditionalGeneration``, CLIP tower at 224 px / patch 14 (256 visual tokens), Llama LM;
* ``document``: ``LlavaOnevisionForConditionalGeneration``, SigLIP tower at 168 px / patch 14 with anyres
  up to 2x2 crops (744 visual tokens per 336-px page), Qwen2 LM;
* ``video``: the same OneVision architecture, 16 frames pooled 2x2 to 6x6 tokens (577 visual tokens).

Documents and videos get separate OneVision models rather than one: each family then has its own
60-minute CPU training budget and its own tower specialised on its per-patch labels (glyph strings vs.
scene objects), and retraining one family cannot regress the other.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenreduce.assets import assets_dir

from .documents import CROP_SIZE, PAGE_SIZE
from .scenes import IMAGE_SIZE
from .videos import FRAME_SIZE
from .vocab import BOS, EOS, IMAGE_TOKEN, PAD, SPECIAL_TOKENS, UNK, VIDEO_TOKEN, vocabulary

KINDS: tuple[str, ...] = ("image", "document", "video")
MODEL_NAMES: dict[str, str] = {
    "image": "synthetic-llava-image",
    "document": "synthetic-onevision-document",
    "video": "synthetic-onevision-video",
}
ASSETS_DIR = assets_dir() / "models"
# Folder holding the three model directories instead of ASSETS_DIR (e.g. models trained elsewhere).
MODELS_ENV = "TOKENREDUCE_SYNTHETIC_MODELS"
PATCH_SIZE = 14
PIXEL_MEAN = (0.5, 0.5, 0.5)
PIXEL_STD = (0.5, 0.5, 0.5)
GRID_PINPOINTS = [[CROP_SIZE, CROP_SIZE], [CROP_SIZE, PAGE_SIZE], [PAGE_SIZE, CROP_SIZE], [PAGE_SIZE, PAGE_SIZE]]

# Architecture sizes (shared by the three models; the towers differ in image size only).
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048)


def model_dir(kind: str, root: str | Path | None = None) -> Path:
    """Directory of the shipped model for ``kind`` (``"image"``, ``"document"`` or ``"video"``).

    It lies in ``root``, else in the folder named by ``$TOKENREDUCE_SYNTHETIC_MODELS``, else in
    ``assets/models``.
    """
    if kind not in MODEL_NAMES:
        raise ValueError(f"unknown kind {kind!r}; known: {KINDS}")
    root = root if root is not None else os.environ.get(MODELS_ENV) or ASSETS_DIR
    return Path(root) / MODEL_NAMES[kind]


def special_ids() -> dict[str, int]:
    """Ids of the special tokens (fixed by :func:`vocabulary`'s order)."""
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}


def build_tokenizer():
    """A fresh word-level fast tokenizer over the benchmark vocabulary (BOS prepended, left padding).

    Built anew for every processor: registering special tokens mutates the tokenizer.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(vocabulary())}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN},
        padding_side="left", model_max_length=4096,
    )
    return tokenizer


def build_processor(kind: str):
    """The processor of the ``kind`` model, built offline."""
    from transformers import (
        CLIPImageProcessor,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        LlavaProcessor,
    )

    tokenizer = build_tokenizer()
    if kind == "image":
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            image_mean=list(PIXEL_MEAN), image_std=list(PIXEL_STD),
        )
        return LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
            vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token=IMAGE_TOKEN,
        )
    side = CROP_SIZE if kind == "document" else FRAME_SIZE
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": side, "width": side}, image_grid_pinpoints=GRID_PINPOINTS,
        image_mean=list(PIXEL_MEAN), image_std=list(PIXEL_STD),
    )
    video_processor = LlavaOnevisionVideoProcessor(
        size={"height": side, "width": side}, image_mean=list(PIXEL_MEAN), image_std=list(PIXEL_STD),
        do_sample_frames=False,
    )
    return LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        num_image_tokens=(side // PATCH_SIZE) ** 2, vision_feature_select_strategy="full",
        image_token=IMAGE_TOKEN, video_token=VIDEO_TOKEN, vision_aspect_ratio="anyres_max_9",
    )


def build_config(kind: str):
    """The transformers config of the ``kind`` model."""
    import transformers as T

    ids = special_ids()
    vocab_size = len(vocabulary())
    text = dict(TEXT, vocab_size=vocab_size, pad_token_id=ids[PAD], bos_token_id=ids[BOS], eos_token_id=ids[EOS],
                tie_word_embeddings=False)
    if kind == "image":
        vision = dict(VISION, model_type="clip_vision_model", image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
        config = T.LlavaConfig(
            vision_config=vision, text_config=dict(text, model_type="llama"), image_token_index=ids[IMAGE_TOKEN],
            vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
            tie_word_embeddings=False,
        )
    elif kind in ("document", "video"):
        side = CROP_SIZE if kind == "document" else FRAME_SIZE
        vision = dict(VISION, model_type="siglip_vision_model", image_size=side, patch_size=PATCH_SIZE,
                      vision_use_head=False)
        config = T.LlavaOnevisionConfig(
            vision_config=vision, text_config=dict(text, model_type="qwen2"), image_token_index=ids[IMAGE_TOKEN],
            video_token_index=ids[VIDEO_TOKEN], vision_feature_layer=-1, vision_feature_select_strategy="full",
            image_grid_pinpoints=GRID_PINPOINTS, vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False,
        )
    else:
        raise ValueError(f"unknown kind {kind!r}; known: {KINDS}")
    return config


def build_model(kind: str, seed: int = 0):
    """A randomly initialised ``kind`` model (fp32), the starting point of training."""
    import torch
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(build_config(kind))
    configure_generation(model)
    return model


def configure_generation(model) -> None:
    """Greedy decoding that stops at EOS and pads with PAD."""
    ids = special_ids()
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = ids[PAD], ids[EOS], ids[BOS]
    gen.do_sample = False
    gen.max_new_tokens = 4


def load(kind: str, directory: str | Path | None = None):
    """The shipped ``kind`` model (eval mode) and its processor, via the Auto classes."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(directory) if directory is not None else model_dir(kind)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path}; train it with `python -m research.synthetic.train {kind}`")
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    return model.eval(), processor
