"""LangDC's data on the synthetic video benchmark: the VLM's video tokens, segment captions, questions.

Every video of the benchmark comes with a ground-truth caption per 4-frame segment whose length follows
how much happens in it (``nothing happens .`` for a static segment, one sentence per motion, colour change,
appearance or disappearance; :func:`tokenreduce.eval.synthetic.videos.segment_captions`): the semantic
density-aware supervision of the paper, where teacher captions are refined so that their length is
whatever content survives. Here the generator knows the content, so no teacher model is needed.

:func:`build_examples` turns a range of a split into :class:`VideoExample` records holding what training
and analysis read: the frozen VLM's projected video tokens (exactly what the projector stage gives
``langdc``), the caption ids per segment, a content measure per segment (the number of happenings), and
the questions (the sample's own and, for training, the generator's further questions about the same video)
as prompt + answer + EOS ids in the format the shipped models were trained on.

The placeholder expansion follows families whose processor turns one video token into one placeholder
per visual token (LLaVA-OneVision, LLaVA-NeXT-Video); the synthetic video model is a OneVision model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tokenreduce.adapters import get_adapter
from tokenreduce.core.layout import TokenLayout
from tokenreduce.eval.synthetic.benchmark import generate
from tokenreduce.eval.synthetic.prompting import PROMPT_TEMPLATE, encode_batch
from tokenreduce.eval.synthetic.videos import ask_more_video, segment_captions
from tokenreduce.eval.synthetic.vocab import VIDEO_TOKEN

IGNORE = -100


@dataclass
class Question:
    """One question about a video: ``input_ids`` = prompt (placeholders expanded) + answer + EOS."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    category: str
    answer: str


@dataclass
class VideoExample:
    """One video of a split, ready for training or analysis."""

    sample_id: str
    features: torch.Tensor  # [N, D] the VLM's projected video tokens (stored in half precision)
    captions: list[list[int]]  # ground-truth caption ids per segment
    caption_texts: list[str]
    happenings: list[int]  # events per segment (0: static)
    questions: list[Question] = field(default_factory=list)


def happenings(caption: str) -> int:
    """Events a ground-truth segment caption describes: its sentences, 0 for ``nothing happens .``."""
    text = caption.strip()
    return 0 if text == "nothing happens ." else text.count(" .")


def prompt_ids(tokenizer, question: str, placeholder: int, count: int) -> list[int]:
    """Ids of ``"<question> <video> answer :"`` (BOS first) with the video token repeated ``count`` times."""
    ids = tokenizer(PROMPT_TEMPLATE.format(question=question, placeholder=VIDEO_TOKEN))["input_ids"]
    if ids.count(placeholder) != 1:
        raise ValueError(f"expected one video token (id {placeholder}) in the prompt, got {ids.count(placeholder)}")
    at = ids.index(placeholder)
    return ids[:at] + [placeholder] * count + ids[at + 1 :]


def build_examples(model, processor, split: str, start: int, stop: int, *, extra_questions: bool = False,
                   batch_size: int = 8, seed: int = 0) -> tuple[list[VideoExample], TokenLayout]:
    """Examples of videos ``start..stop`` of ``split`` and the (shared) layout of their tokens."""
    adapter = get_adapter(model)
    tokenizer = getattr(processor, "tokenizer", processor)
    placeholder = adapter.placeholder_id("video")
    eos = tokenizer.eos_token_id
    examples: list[VideoExample] = []
    layout: TokenLayout | None = None
    for lo in range(start, stop, batch_size):
        generated = [generate("video", split, i, seed) for i in range(lo, min(stop, lo + batch_size))]
        samples = [g[0] for g in generated]
        device = next(model.parameters()).device
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in encode_batch(samples, processor).items()}
        with torch.no_grad():
            feats = adapter.encode("video", inputs)
        if layout is None:
            layout = adapter.layouts("video", inputs, [f.shape[0] for f in feats])[0]
        for row, ((sample, _maps, tracks, _refs), f) in enumerate(zip(generated, feats)):
            caps = [c["caption"] for c in segment_captions(tracks)]
            asked = [(sample.meta["category"], sample.question, sample.answer)]
            if extra_questions:
                rng = np.random.default_rng([seed, lo + row])
                asked += [(c, q, a) for c, q, a, _ in ask_more_video(rng, tracks) if q != sample.question]
            questions = []
            for category, text, answer in asked:
                prompt = prompt_ids(tokenizer, text, placeholder, int(f.shape[0]))
                answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [eos]
                ids = torch.tensor(prompt + answer_ids)
                labels = torch.full_like(ids, IGNORE)
                labels[len(prompt) :] = torch.tensor(answer_ids)
                questions.append(Question(ids, labels, category, answer))
            if lo == start and row == 0:  # the expansion agrees with the processor's own
                expected = inputs["input_ids"][0][inputs["attention_mask"][0].bool()].cpu().tolist()
                if expected != questions[0].input_ids[: len(expected)].tolist():
                    raise ValueError("the processor expands the video placeholder differently from prompt_ids")
            examples.append(VideoExample(
                sample_id=sample.id, features=f.detach().to(torch.float16).cpu(),
                captions=[tokenizer(c, add_special_tokens=False)["input_ids"] for c in caps],
                caption_texts=caps, happenings=[happenings(c) for c in caps], questions=questions,
            ))
    if layout is None:
        raise ValueError(f"no videos in [{start}, {stop}) of {split!r}")
    return examples, layout
