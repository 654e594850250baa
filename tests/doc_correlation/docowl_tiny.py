"""Tiny random-weight mPLUG-DocOwl 1.5 stand-ins, built directly or loaded with ``trust_remote_code``."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .mplug_docowl.configuration_mplug_docowl import (
    MPLUGDocOwlConfig,
    MplugDocOwlHReducerConfig,
    MplugOwlVisionConfig,
)
from .mplug_docowl.modeling_mplug_docowl import IMAGE_TOKEN_INDEX, MPLUGDocOwlLlamaForCausalLM

SOURCE = Path(__file__).parent / "mplug_docowl"
REMOTE_FILES = ("configuration_mplug_docowl.py", "modeling_mplug_docowl.py", "visual_encoder.py")
AUTO_MAP = {
    "AutoConfig": "configuration_mplug_docowl.MPLUGDocOwlConfig",
    "AutoModelForCausalLM": "modeling_mplug_docowl.MPLUGDocOwlLlamaForCausalLM",
}
# A crop of 56 px, patch 7: an 8 x 8 patch grid, 8 x 2 tokens after the 1x4 H-Reducer, + vit_eos = 17.
CROP = 56
ANCHOR_MAX = 9


def tiny_docowl_config(vision_layers: int = 2) -> MPLUGDocOwlConfig:
    vis = MplugOwlVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                               num_attention_heads=4, image_size=CROP, patch_size=7).to_dict()
    reducer = MplugDocOwlHReducerConfig(hidden_size=32, conv_shape="1x4").to_dict()
    return MPLUGDocOwlConfig(visual_config={"visual_model": vis, "visual_hreducer": reducer}, vocab_size=1000,
                             hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, pad_token_id=0)


def tiny_docowl(seed: int = 0) -> MPLUGDocOwlLlamaForCausalLM:
    torch.manual_seed(seed)
    model = MPLUGDocOwlLlamaForCausalLM(tiny_docowl_config()).eval()
    with torch.no_grad():  # upstream initialises these with randn (std 1), which drowns the patch content
        model.model.vision_model.embeddings.position_embedding.mul_(0.02)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def save_remote_code_dir(model: MPLUGDocOwlLlamaForCausalLM, directory: str | Path) -> Path:
    """Write ``model`` as a remote-code checkpoint: weights, ``config.json`` with ``auto_map``, and the code."""
    directory = Path(directory)
    model.config.auto_map = dict(AUTO_MAP)
    model.save_pretrained(directory)
    for name in REMOTE_FILES:
        shutil.copy(SOURCE / name, directory / name)
    return directory


def page_inputs(grid: tuple[int, int], seed: int = 0, with_global: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [C, 3, 56, 56], patch_positions [C, 2])`` of one page cut into ``grid`` crops (+ global)."""
    g = torch.Generator().manual_seed(seed)
    cells = [[r, c] for r in range(grid[0]) for c in range(grid[1])]
    if with_global:
        cells = [[ANCHOR_MAX, ANCHOR_MAX], *cells]
    return torch.randn(len(cells), 3, CROP, CROP, generator=g), torch.tensor(cells)


def prompt_ids(num_crops: int, seed: int, prefix: int = 3, suffix: int = 4) -> list[int]:
    """BOS, text, then one placeholder per crop separated by a crop-indicator word, then text."""
    g = torch.Generator().manual_seed(1000 + seed)

    def text(n):
        return torch.randint(3, 990, (n,), generator=g).tolist()

    ids = [1, *text(prefix)]
    for _ in range(num_crops):
        ids += [*text(1), IMAGE_TOKEN_INDEX]
    return ids + text(suffix)


def docowl_batch(pages: list[tuple[tuple[int, int], int]], pad_id: int = 0) -> dict:
    """A left-padded batch, one page per row: ``(crop grid, seed)`` each (a row alone gets the same pixels
    and text as in a batch)."""
    images, positions, rows = [], [], []
    for grid, seed in pages:
        img, pos = page_inputs(grid, seed=seed)
        images.append(img)
        positions.append(pos)
        rows.append(prompt_ids(img.shape[0], seed=seed, prefix=2 + seed))
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = torch.tensor(r)
        mask[i, length - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask, "images": torch.cat(images),
            "patch_positions": torch.cat(positions)}
