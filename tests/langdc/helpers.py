"""A tiny captioner fitted to the tiny random VLMs' videos, so that captions (and token counts) differ per
segment and per sample in a known, deterministic way."""

from __future__ import annotations

import torch

from tokenreduce.adapters import get_adapter
from tokenreduce.plugins.langdc import Captioner, CaptionerConfig
from tokenreduce.plugins.langdc.method import segment_groups
from tokenreduce.plugins.langdc.training import train_captioner
from tokenreduce.testing.tiny import default_rows, tiny_batch, tiny_model

VIDEO_FAMILIES = ("llava_onevision", "llava_next_video", "qwen2_vl", "qwen2_5_vl")
# Frames per captioned segment: two frames (LLaVA) or one temporal patch of two frames (Qwen).
SEGMENT_FRAMES = {"llava_onevision": 2, "llava_next_video": 2, "qwen2_vl": 1, "qwen2_5_vl": 1}
EOS, BOS = 2, 1


def target_caption(row: int, segment: int) -> list[int]:
    """Row r's segment s gets ``r + s`` tokens (0 to 3): totals 1, 3, 5 per sample."""
    return [3 + (row + 2 * segment + k) % 5 for k in range(row + segment)]


def tiny_captioner(seed: int = 0) -> Captioner:
    config = CaptionerConfig(vlm_hidden=64, eos_token_id=EOS, hidden_layer=1, frame_tokens=4, segment_frames=2,
                             max_caption_tokens=6, prompt_ids=(BOS,))
    lm = dict(vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    return Captioner.build(config, lm, seed=seed)


def video_segments(family: str, model=None):
    """``(model, batch, [(row, segment, visual)])`` of the default three-row video batch of ``family``."""
    model = model or tiny_model(family)
    batch = tiny_batch(model, default_rows(family, video=True))
    adapter = get_adapter(model)
    with torch.no_grad():
        feats = adapter.encode("video", batch)
    layouts = adapter.layouts("video", batch, [f.shape[0] for f in feats])
    out = []
    for row, (f, layout) in enumerate(zip(feats, layouts)):
        for s, group in enumerate(segment_groups(f, layout, SEGMENT_FRAMES[family], 4)):
            out.append((row, s, group.visual))
    return model, batch, out


def fit_tiny_captioner(directory, family: str, model=None, steps: int = 60) -> Captioner:
    """Fit :func:`tiny_captioner` to :func:`target_caption` on ``family``'s default video batch; save it."""
    captioner = tiny_captioner()
    _, _, segments = video_segments(family, model)
    inputs = torch.stack([visual for _, _, visual in segments])[:, None]
    captions = [[target_caption(row, s)] for row, s, _ in segments]
    # Random tiny towers give nearly the same tokens for every video (differences ~1% of their scale):
    # start the input projector as a whitening of those differences so a few steps tell videos apart.
    tokens = inputs.flatten(0, 2)
    mean, spread = tokens.mean(0), (tokens - tokens.mean(0)).std().clamp_min(1e-6)
    with torch.no_grad():
        weight = torch.randn(captioner.in_proj.weight.shape, generator=torch.Generator().manual_seed(0))
        captioner.in_proj.weight.copy_(weight / (spread * tokens.shape[1] ** 0.5))
        captioner.in_proj.bias.copy_(-captioner.in_proj.weight @ mean)
    train_captioner(captioner, inputs, captions, steps=steps, batch_size=len(segments), lr=1e-2)
    captioner.save_pretrained(directory)
    return captioner
