"""Batched greedy prediction: samples in, generated answer texts out.

Kept minimal so the evaluation runner can wrap it with timing: left padding, ``model.generate`` with
greedy decoding, only the new tokens decoded. Works on plain and on ``tokenreduce``-wrapped models (a
wrapped model's ``generate`` returns the caller's prompt followed by the new tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tokenreduce.eval.sample import Sample
from tokenreduce.eval.synthetic.prompting import encode_batch


def predict(
    model, processor, samples: Sequence[Sample], batch_size: int = 8, max_new_tokens: int = 4,
    encode: Callable[[Sequence[Sample], object], dict] | None = None,
) -> list[str]:
    """Generated text (new tokens only, special tokens skipped, stripped) for every sample, in order.

    ``encode(samples, processor)`` turns a batch into model inputs, left padded; by default the synthetic
    benchmark's :func:`~tokenreduce.eval.synthetic.prompting.encode_batch`. Batches are formed in order, so
    a batch holds one modality as long as consecutive samples share it.
    """
    if encode is None:
        encode = encode_batch
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    out: list[str] = []
    for start in range(0, len(samples), batch_size):
        batch = list(samples[start : start + batch_size])
        inputs = encode(batch, processor)
        prompt_len = inputs["input_ids"].shape[1]
        with torch.inference_mode():
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=pad_id, eos_token_id=eos_id)
        sequences = generated if torch.is_tensor(generated) else generated.sequences
        texts = tokenizer.batch_decode(sequences[:, prompt_len:], skip_special_tokens=True)
        out.extend(t.strip() for t in texts)
    return out
