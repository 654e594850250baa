"""Tiny VLMs with a chosen vocabulary and peaked logits, and direct (float64, full-softmax) references."""

from __future__ import annotations

import numpy as np
import torch

from tokenreduce.testing.tiny import model_class, tiny_config


def tiny_vlm(family: str = "qwen2_vl", vocab: int | None = None, sharpness: float = 25.0, seed: int = 0):
    """A tiny random VLM of ``family`` (optionally with ``vocab`` ids) whose output layer is scaled so
    next-token distributions are peaked and their entropies vary from step to step."""
    config = tiny_config(family)
    if vocab is not None:
        config.text_config.vocab_size = vocab
    torch.manual_seed(seed)
    model = model_class(family)(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and p.abs().max() == 0 and p.numel() > 1:
                p.normal_(0, 0.5)
        model.lm_head.weight.mul_(sharpness)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model.eval()


def text_batch(rows: int = 2, length: int = 6, seed: int = 0) -> dict:
    """A left-padded text-only batch (no visual placeholders)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 990, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    if rows > 1:
        ids[1, :2] = 0
        mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def direct_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of the full softmax in float64: ``-sum p log p``."""
    z = logits.double() / temperature
    return -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)


def forward_windows(values: list[float], window: int, offset: int = 0) -> list[float | None]:
    """``mean(values[t+offset : t+offset+window])`` where the window fits, else None (a plain loop)."""
    out: list[float | None] = []
    for t in range(len(values)):
        lo = t + offset
        chunk = values[lo : lo + window]
        out.append(float(np.mean(chunk)) if len(chunk) == window else None)
    return out
