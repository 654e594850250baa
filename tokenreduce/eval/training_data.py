"""Batches for teacher-forced answer training: the task's prompt, then the answer and EOS.

    from tokenreduce.eval.tasks import get_task
    from tokenreduce.eval.training_data import answer_batches

    batches = answer_batches(get_task("synthetic-image"), processor, model.config.model_type,
                             split="train", limit=512, batch_size=8)
    loss = model(**batches[0]).loss          # next-token loss on the answer tokens and EOS only

Each sample is encoded exactly as the runner encodes it (``task.encode``: for the synthetic tasks the shipped
models' own prompt, otherwise the family's prompt format), then the answer's tokens and EOS are appended.
Rows are padded on the left like the runner's batches; ``labels`` are ``-100`` everywhere except the answer
tokens and EOS. Media tensors (``pixel_values``, ``pixel_values_videos``, ``image_sizes``, ...) are whatever
the processor returns, batched as the runner batches them. Samples whose media cannot be read are skipped
and counted in a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from itertools import islice
from typing import Any

import torch

from tokenreduce.eval.media import MediaError
from tokenreduce.eval.sample import Sample
from tokenreduce.eval.synthetic import SPLIT_SIZES, iter_synthetic
from tokenreduce.eval.task import SEQUENCE_KEYS, Task, collate
from tokenreduce.eval.tasks.synthetic import SyntheticTask

IGNORE_INDEX = -100


def answer_batches(
    task: Task,
    processor: Any,
    family: str,
    split: str = "train",
    limit: int = 512,
    batch_size: int = 8,
    start: int = 0,
    *,
    eos_token_id: int | None = None,
) -> list[dict[str, Any]]:
    """Batches of model inputs with ``labels`` for samples ``start .. start + limit`` of ``split``.

    Args:
        task: the runner task whose prompt the model is trained on.
        processor: the model's processor (its tokenizer gives the answer tokens, EOS and padding).
        family: the model family (``model.config.model_type``), for the task's prompt format.
        split, limit, start: which samples: ``limit`` of them after skipping the first ``start``.
        batch_size: samples per batch (the last batch may be smaller).
        eos_token_id: the end token appended after the answer (default: the tokenizer's EOS).

    Returns:
        A list of batches; each has the processor's keys, ``input_ids`` / ``attention_mask`` padded on the
        left, and ``labels`` of the same shape as ``input_ids``.
    """
    for name, value, low in (("limit", limit, 1), ("batch_size", batch_size, 1), ("start", start, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}")
    tokenizer = getattr(processor, "tokenizer", processor)
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; pass `eos_token_id`")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    examples, skipped = [], []
    for sample in _samples(task, split, start, limit):
        try:
            inputs = task.encode(sample, processor, family)
        except (MediaError, OSError) as error:
            skipped.append(f"{sample.id}: {error}")
            continue
        examples.append(with_answer(inputs, answer_ids(tokenizer, sample.answer), eos))
    if skipped:
        warnings.warn(f"answer_batches: skipped {len(skipped)} of {len(skipped) + len(examples)} {task.name} "
                      f"samples whose media could not be read (first: {skipped[0]})", stacklevel=2)
    if not examples:
        raise ValueError(f"no usable samples in {task.name!r} {split!r} [{start}, {start + limit})")
    return [collate_with_labels(examples[i: i + batch_size], pad) for i in range(0, len(examples), batch_size)]


def answer_ids(tokenizer: Any, answer: str) -> list[int]:
    """The answer's token ids, without special tokens (word-start markers are the tokenizer's own)."""
    ids = list(tokenizer(answer.strip(), add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"the answer {answer!r} has no tokens")
    return ids


def with_answer(inputs: Mapping[str, Any], answer: Sequence[int], eos_token_id: int) -> dict[str, Any]:
    """One sample's inputs (a batch of one) with ``answer`` + EOS appended and its ``labels``."""
    out = dict(inputs)
    ids = inputs["input_ids"].reshape(1, -1)
    target = torch.tensor([[*answer, eos_token_id]], dtype=ids.dtype, device=ids.device)
    for key in SEQUENCE_KEYS:
        value = inputs.get(key)
        if value is None:
            continue
        value = value.reshape(1, -1)
        tail = target if key == "input_ids" else value.new_full(target.shape, 1 if key == "attention_mask" else 0)
        out[key] = torch.cat([value, tail], dim=1)
    out["labels"] = torch.cat([torch.full_like(ids, IGNORE_INDEX), target], dim=1)
    return out


def collate_with_labels(examples: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """:func:`~tokenreduce.eval.task.collate` (left padding) plus ``labels`` padded with ``-100``."""
    batch = collate([{k: v for k, v in x.items() if k != "labels"} for x in examples], pad_token_id)
    length = batch["input_ids"].shape[1]
    rows = [x["labels"].reshape(1, -1) for x in examples]
    batch["labels"] = torch.cat([torch.cat([r.new_full((1, length - r.shape[1]), IGNORE_INDEX), r], dim=1)
                                 for r in rows])
    return batch


def _samples(task: Task, split: str, start: int, limit: int) -> Iterator[Sample]:
    if isinstance(task, SyntheticTask):  # generated lazily: start where asked
        if split not in SPLIT_SIZES:
            raise ValueError(f"`split` must be one of {tuple(SPLIT_SIZES)}, got {split!r}")
        stop = min(start + limit, SPLIT_SIZES[split])
        return iter_synthetic(task.kind, split, min(start, stop), stop, task.seed)
    return islice(task.samples(split, start + limit), start, None)
