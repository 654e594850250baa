"""What the runner needs from a benchmark, the per-family prompt, and batching of per-sample inputs.

A task yields :class:`~tokenreduce.eval.sample.Sample` objects, turns one into model inputs for a given
model family (the prompt format differs per family), reads the answer out of the generated text, scores
it, and summarises scored records the way the benchmark's official scorer does. The runner never looks
inside a task beyond this interface, so the synthetic benchmark and the real ones plug in the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from tokenreduce.eval.media import MediaError, check_video
from tokenreduce.eval.sample import Sample

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


class Task:
    """Base class of an evaluation task; subclasses set ``name`` and override what differs.

    Attributes:
        name: the task's name in records and summaries.
        primary_metric: key of :meth:`aggregate`'s result that plots and tables lead with.
        max_new_tokens: generation length the benchmark needs (short answers: a few tokens).
        instruction: text appended after the question (the benchmark's usual answer-format hint).
    """

    name: str = ""
    primary_metric: str = "accuracy"
    max_new_tokens: int = 16
    instruction: str = ""

    # ----- samples -----------------------------------------------------------------------------------
    def samples(self, split: str | None = None, limit: int | None = None) -> Iterator[Sample]:
        """The task's samples in a fixed order (at most ``limit``)."""
        raise NotImplementedError

    # ----- prompting ---------------------------------------------------------------------------------
    def prompt_text(self, sample: Sample) -> str:
        """The user turn's text: question, options, answer-format hint (no media placeholders)."""
        text = sample.question
        return f"{text}\n{self.instruction}" if self.instruction else text

    def encode(self, sample: Sample, processor: Any, family: str) -> dict[str, Any]:
        """Model inputs (tensors, batch of one) for ``sample`` in the prompt format of ``family``.

        Raises :class:`~tokenreduce.eval.media.MediaError` when the sample's media are missing or empty.
        """
        check_media(sample)
        text = build_prompt(processor, family, self.prompt_text(sample), n_images=len(sample.images),
                            n_videos=int(sample.video is not None))
        kwargs: dict[str, Any] = {}
        if sample.images:
            kwargs["images"] = list(sample.images)
        if sample.video is not None:
            kwargs["videos"] = [check_video(sample.video)]
        return dict(processor(text=[text], return_tensors="pt", **kwargs))

    # ----- answers -----------------------------------------------------------------------------------
    def parse(self, text: str, sample: Sample) -> Any:
        """The prediction read from the generated text (JSON-serialisable)."""
        return text.strip()

    def score(self, prediction: Any, sample: Sample) -> float | None:
        """Per-sample score in [0, 1] (None when the split has no ground truth)."""
        raise NotImplementedError

    def record_fields(self, sample: Sample) -> dict[str, Any]:
        """What :meth:`aggregate` needs from the sample beyond prediction and score (kept in the record)."""
        category = sample.meta.get("category")
        return {} if category is None else {"category": category}

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The benchmark's official summary of scored records (each has prediction, score, fields)."""
        scores = [r["score"] for r in records if r.get("score") is not None]
        out: dict[str, Any] = {self.primary_metric: sum(scores) / len(scores) if scores else 0.0,
                               "scored": len(scores)}
        cats: dict[str, list[float]] = {}
        for r in records:
            cat = (r.get("fields") or {}).get("category")
            if cat is not None and r.get("score") is not None:
                cats.setdefault(str(cat), []).append(r["score"])
        if cats:
            out["categories"] = {c: sum(v) / len(v) for c, v in sorted(cats.items())}
        return out


class FunctionTask(Task):
    """A task assembled from plain functions: how a benchmark module that already has ``load``,
    ``encode``, ``parse`` and ``score`` functions (the synthetic benchmark) plugs into the runner.

    ``load(split, limit)`` yields samples; ``encode(sample, processor, family)`` builds inputs (default:
    :meth:`Task.encode` with ``prompt(sample)`` as the text); ``parse(text, sample)``, ``score(prediction,
    sample)``, ``aggregate(records)`` default to the base class behaviour.
    """

    def __init__(
        self, name: str, load: Callable[[str | None, int | None], Iterable[Sample]],
        score: Callable[[Any, Sample], float | None], *, parse: Callable[[str, Sample], Any] | None = None,
        encode: Callable[[Sample, Any, str], dict] | None = None, prompt: Callable[[Sample], str] | None = None,
        aggregate: Callable[[Sequence[Mapping[str, Any]]], dict] | None = None,
        primary_metric: str = "accuracy", max_new_tokens: int = 8,
    ) -> None:
        self.name, self._load, self._score = name, load, score
        self._parse, self._encode, self._prompt, self._aggregate = parse, encode, prompt, aggregate
        self.primary_metric, self.max_new_tokens = primary_metric, max_new_tokens

    def samples(self, split: str | None = None, limit: int | None = None) -> Iterator[Sample]:
        yield from self._load(split, limit)

    def prompt_text(self, sample: Sample) -> str:
        return self._prompt(sample) if self._prompt else super().prompt_text(sample)

    def encode(self, sample: Sample, processor: Any, family: str) -> dict[str, Any]:
        if self._encode is not None:
            check_media(sample)
            return dict(self._encode(sample, processor, family))
        return super().encode(sample, processor, family)

    def parse(self, text: str, sample: Sample) -> Any:
        return self._parse(text, sample) if self._parse else super().parse(text, sample)

    def score(self, prediction: Any, sample: Sample) -> float | None:
        return self._score(prediction, sample)

    def aggregate(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return self._aggregate(records) if self._aggregate else super().aggregate(records)


def check_media(sample: Sample) -> None:
    """Raise :class:`MediaError` when a sample lacks the media its modality needs (or failed to load)."""
    error = sample.meta.get("media_error")
    if error:
        raise MediaError(str(error))
    if sample.modality == "video":
        check_video(sample.video)
    elif sample.modality == "image":
        if not sample.images:
            raise MediaError(f"image sample {sample.id!r} has no image")
    else:
        raise MediaError(f"sample {sample.id!r} has modality {sample.modality!r}; accepted: 'image', 'video'")


# ----------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------


def _chat_template(processor: Any) -> str | None:
    template = getattr(processor, "chat_template", None)
    if template:
        return template
    tokenizer = getattr(processor, "tokenizer", None)
    return getattr(tokenizer, "chat_template", None) if tokenizer is not None else None


def placeholder(processor: Any, family: str, modality: str) -> str:
    """The text the processor expands into one image's (video's) visual tokens, for ``family``."""
    token = getattr(processor, f"{modality}_token", None)
    if token is None:
        tokenizer = getattr(processor, "tokenizer", None)
        token = getattr(tokenizer, f"{modality}_token", None)
    if token is None:
        raise ValueError(f"processor {type(processor).__name__} has no `{modality}_token`; cannot place the {modality}")
    if family in QWEN_FAMILIES:
        vocab = processor.tokenizer.get_vocab()
        if "<|vision_start|>" in vocab and "<|vision_end|>" in vocab:
            return f"<|vision_start|>{token}<|vision_end|>"
    return token


def build_prompt(processor: Any, family: str, text: str, n_images: int = 0, n_videos: int = 0) -> str:
    """The full prompt for one turn: the processor's chat template when it has one, else the family's
    conversation format (LLaVA-1.5 ``USER: .. ASSISTANT:``, LLaVA-NeXT ``[INST] .. [/INST]``,
    OneVision / Qwen ChatML). Media placeholders come first, then the text."""
    if _chat_template(processor) is not None:
        content = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    media = " ".join([placeholder(processor, family, "image")] * n_images
                     + [placeholder(processor, family, "video")] * n_videos)
    body = f"{media}\n{text}" if media else text
    if family == "llava_next":
        return f"[INST] {body} [/INST]"
    if family in ("llava_onevision", *QWEN_FAMILIES):
        return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"
    return f"USER: {body} ASSISTANT:"


# ----------------------------------------------------------------------------------------------------
# Batching per-sample inputs
# ----------------------------------------------------------------------------------------------------

SEQUENCE_KEYS = {"input_ids": None, "attention_mask": 0, "mm_token_type_ids": 0, "token_type_ids": 0}


def collate(inputs: Sequence[Mapping[str, Any]], pad_token_id: int, padding_side: str = "left") -> dict[str, Any]:
    """One batch from per-sample processor outputs (each a batch of one), padded on ``padding_side``.

    Sequence tensors are padded; media tensors are concatenated along the item axis (images, crops and
    videos are counted per item, not per row), LLaVA-NeXT-style ``[items, crops, C, H, W]`` padded on the
    crop axis as the processor itself does for a batch.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}")
    if not inputs:
        raise ValueError("`inputs` is empty")
    keys: list[str] = []
    for x in inputs:
        keys.extend(k for k in x if k not in keys)
    length = max(int(x["input_ids"].shape[-1]) for x in inputs)
    out: dict[str, Any] = {}
    for key in keys:
        values = [x[key] for x in inputs if key in x and x[key] is not None]
        if key in SEQUENCE_KEYS:
            if len(values) != len(inputs):
                raise ValueError(f"`{key}` is missing from some samples of the batch")
            fill = pad_token_id if key == "input_ids" else SEQUENCE_KEYS[key]
            rows = []
            for v in values:
                v = v.reshape(1, -1)
                pad = v.new_full((1, length - v.shape[-1]), fill)
                rows.append(torch.cat([pad, v] if padding_side == "left" else [v, pad], dim=-1))
            out[key] = torch.cat(rows, dim=0)
        elif all(torch.is_tensor(v) for v in values):
            out[key] = _concat_items(key, values)
        elif all(v == values[0] for v in values):
            out[key] = values[0]
        else:
            raise ValueError(f"cannot batch `{key}`: samples disagree ({values[:2]} ...)")
    return out


def _concat_items(key: str, values: list[torch.Tensor]) -> torch.Tensor:
    if all(v.shape[1:] == values[0].shape[1:] for v in values):
        return torch.cat(values, dim=0)
    if all(v.dim() >= 3 and v.shape[2:] == values[0].shape[2:] for v in values):
        width = max(v.shape[1] for v in values)
        padded = [torch.cat([v, v.new_zeros(v.shape[0], width - v.shape[1], *v.shape[2:])], dim=1) for v in values]
        return torch.cat(padded, dim=0)
    shapes = [tuple(v.shape) for v in values]
    raise ValueError(f"cannot batch `{key}`: item shapes {shapes} differ beyond the first two axes "
                     "(e.g. videos with different frame counts); use batch_size=1 for this task")
