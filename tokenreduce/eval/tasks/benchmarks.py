"""The real benchmarks: VQAv2, GQA, TextVQA, DocVQA, ChartQA, POPE, MME, NExT-QA (MC) and MVBench.

Each reads rows in the benchmark's hub schema (from the hub or a local copy, see
:mod:`tokenreduce.eval.tasks.source`), prompts with the benchmark's usual answer-format hint, and scores
with the official metric of :mod:`tokenreduce.eval.metrics`. A sample whose image or video cannot be
read is still yielded, with ``meta["media_error"]``, so the runner records the error and goes on.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenreduce.eval import metrics as M
from tokenreduce.eval.media import MediaError, find_video, load_image, load_video
from tokenreduce.eval.sample import Sample
from tokenreduce.eval.task import Task
from tokenreduce.eval.tasks.source import DataSource, Loader, base_dir, iter_rows, resolve_source

SHORT_ANSWER = "Answer the question using a single word or phrase."


class HubTask(Task):
    """A benchmark whose rows come from a :class:`DataSource`; subclasses turn a row into a sample."""

    kind = "image"

    def __init__(self, source: DataSource | None = None, loader: Loader | None = None, **data_options: Any):
        self.source = source if source is not None else resolve_source(self.name, **data_options)
        if source is not None and data_options:
            self.source = source.with_(**{k: v for k, v in data_options.items() if v is not None})
        self.loader = loader
        self.streaming = False

    def rows(self, split: str | None = None, name: str | None = None) -> Iterator[dict[str, Any]]:
        """Rows of the split (streamed when the last :meth:`samples` call had a ``limit``)."""
        return iter_rows(self.source, self.loader, split=split, name=name, streaming=self.streaming)

    def samples(self, split: str | None = None, limit: int | None = None) -> Iterator[Sample]:
        if limit is not None and limit < 0:
            raise ValueError(f"`limit` must be >= 0 or None, got {limit}")
        self.streaming = limit is not None
        media_root = base_dir(self.source, split)
        rows = self.rows(split)
        for row in itertools.islice(rows, limit):
            yield self.to_sample(row, media_root)

    def to_sample(self, row: dict[str, Any], media_root: Path | None) -> Sample:
        raise NotImplementedError

    # Images: decoding errors become a recorded error for the sample, not a crash.
    def _image_sample(self, row: dict[str, Any], media_root: Path | None, image_value: Any, **fields: Any) -> Sample:
        meta = dict(fields.pop("meta", {}))
        images = []
        try:
            images = [load_image(image_value, media_root)]
        except MediaError as exc:
            meta["media_error"] = str(exc)
        return Sample(task=self.name, modality="image", images=images, meta=meta, **fields)


def _answers(value: Any) -> list[str]:
    """Answer strings from a list of strings or of ``{"answer": ...}`` dicts (the VQA annotation form)."""
    if value is None:
        return []
    return [str(a["answer"]) if isinstance(a, Mapping) else str(a) for a in value]


def _most_common(answers: Sequence[str]) -> str:
    return Counter(answers).most_common(1)[0][0] if answers else ""


class VQAv2Task(HubTask):
    """VQAv2: VQA accuracy (10-choose-9, EvalAI normalisation) over the ten human answers."""

    name = "vqav2"
    instruction = SHORT_ANSWER
    max_new_tokens = 16
    answer_field = "answers"
    lmms_processing = "lmms"  # the metric's mode that reproduces lmms-eval's scorer of this benchmark

    def __init__(self, *args: Any, gt_processing: str = "official", **kwargs: Any):
        super().__init__(*args, **kwargs)
        if gt_processing not in ("official", "lmms"):
            raise ValueError(f"`gt_processing` must be 'official' or 'lmms', got {gt_processing!r}")
        self.gt_processing = gt_processing

    def to_sample(self, row, media_root):
        answers = _answers(row.get(self.answer_field))
        answer = row.get("multiple_choice_answer") or _most_common(answers)
        meta = {"answers": answers, "answer_type": row.get("answer_type"), "question_type": row.get("question_type")}
        return self._image_sample(row, media_root, row.get("image"), id=str(row["question_id"]),
                                  question=str(row["question"]), answer=str(answer), meta=meta)

    def score(self, prediction, sample):
        answers = sample.meta.get("answers") or []
        mode = self.lmms_processing if self.gt_processing == "lmms" else "official"
        return M.vqa_accuracy(str(prediction), answers, mode) if answers else None

    def record_fields(self, sample):
        kind = sample.meta.get("answer_type")
        return {"category": kind} if kind else {}


class TextVQATask(VQAv2Task):
    """TextVQA: VQA accuracy over ten answers; OCR tokens optionally listed in the prompt."""

    name = "textvqa"
    lmms_processing = "lmms_textvqa"

    def __init__(self, *args: Any, ocr_in_prompt: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.ocr_in_prompt = bool(ocr_in_prompt)

    def to_sample(self, row, media_root):
        sample = super().to_sample(row, media_root)
        sample.meta["ocr_tokens"] = list(row.get("ocr_tokens") or [])
        return sample

    def prompt_text(self, sample):
        text = sample.question
        if self.ocr_in_prompt and sample.meta.get("ocr_tokens"):
            text += "\nReference OCR token: " + ", ".join(sample.meta["ocr_tokens"])
        return f"{text}\n{self.instruction}"

    def record_fields(self, sample):
        return {}


class GQATask(HubTask):
    """GQA (testdev balanced): exact match after lower-casing and punctuation removal.

    Questions reference images by ``imageId``; on the hub the images are a second config
    (``images_name``), locally an ``image`` cell / path in the row or ``<media_dir or data dir>/images/<imageId>.*``.
    """

    name = "gqa"
    instruction = SHORT_ANSWER
    max_new_tokens = 16

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._images: dict[str, Any] = {}
        self._image_rows: Iterator[dict[str, Any]] | None = None
        self._image_rows_opened = False

    def _hub_image(self, image_id: str) -> Any:
        """The undecoded image cell of ``image_id`` from the images config, read only as far as needed."""
        if self.source.is_local or not self.source.images_name:
            return None
        if not self._image_rows_opened:
            self._image_rows_opened = True
            self._image_rows = self.rows(split=self.source.images_split or self.source.split,
                                         name=self.source.images_name)
        while image_id not in self._images and self._image_rows is not None:
            row = next(self._image_rows, None)
            if row is None:
                self._image_rows = None
                break
            self._images[str(row["id"])] = row["image"]
        return self._images.get(image_id)

    def to_sample(self, row, media_root):
        image_id = str(row["imageId"])
        value = row.get("image")
        if value is None:
            value = self._hub_image(image_id)
        if value is None and media_root is not None:
            folder = media_root / "images" if (media_root / "images").is_dir() else media_root
            found = [folder / f"{image_id}{ext}" for ext in (".jpg", ".jpeg", ".png")]
            value = next((str(p) for p in found if p.is_file()), str(found[0]))
        meta = {"image_id": image_id, "full_answer": row.get("fullAnswer")}
        return self._image_sample(row, media_root, value, id=str(row["id"]), question=str(row["question"]),
                                  answer=str(row["answer"]), meta=meta)

    def score(self, prediction, sample):
        return M.gqa_exact_match(str(prediction), sample.answer)


class DocVQATask(HubTask):
    """DocVQA: ANLS (tau 0.5) against the accepted answers."""

    name = "docvqa"
    instruction = SHORT_ANSWER
    primary_metric = "anls"
    max_new_tokens = 32

    def to_sample(self, row, media_root):
        answers = _answers(row.get("answers"))
        meta = {"answers": answers, "question_types": row.get("question_types")}
        return self._image_sample(row, media_root, row.get("image"), id=str(row["questionId"]),
                                  question=str(row["question"]), answer=answers[0] if answers else "", meta=meta)

    def score(self, prediction, sample):
        answers = sample.meta.get("answers") or []
        return M.anls(str(prediction), answers) if answers else None


class ChartQATask(HubTask):
    """ChartQA: relaxed accuracy (5% numeric tolerance), overall and per human / augmented split."""

    name = "chartqa"
    instruction = "Answer the question with a single word."
    primary_metric = "relaxed_accuracy"
    max_new_tokens = 16

    def to_sample(self, row, media_root):
        kind = str(row.get("type") or "")
        split = "human" if "human" in kind else "augmented" if "augmented" in kind else kind or "unknown"
        row_id = row.get("id", row.get("question_id"))
        return self._image_sample(row, media_root, row.get("image"), id="" if row_id is None else str(row_id),
                                  question=str(row["question"]), answer=str(row["answer"]), meta={"split": split})

    def samples(self, split=None, limit=None):
        # ChartQA rows have no id: number them in order.
        for i, sample in enumerate(super().samples(split, limit)):
            if not sample.id:
                sample.id = str(i)
            yield sample

    def score(self, prediction, sample):
        return M.relaxed_correctness(str(prediction), sample.answer)

    def record_fields(self, sample):
        return {"split": sample.meta["split"]}

    def aggregate(self, records):
        scored = [r for r in records if r.get("score") is not None]
        out: dict[str, Any] = {"relaxed_accuracy": _mean(r["score"] for r in scored), "scored": len(scored)}
        for part in ("human", "augmented"):
            sub = [r["score"] for r in scored if r["fields"].get("split") == part]
            out[part] = _mean(sub) if sub else None
        return out


class POPETask(HubTask):
    """POPE: official yes/no parsing; accuracy, precision, recall, F1 and predicted-yes ratio, per split."""

    name = "pope"
    instruction = SHORT_ANSWER
    primary_metric = "f1"
    max_new_tokens = 8

    def to_sample(self, row, media_root):
        return self._image_sample(row, media_root, row.get("image"), id=str(row["question_id"]),
                                  question=str(row["question"]), answer=str(row["answer"]).strip().lower(),
                                  meta={"category": row.get("category")})

    def parse(self, text, sample):
        return M.pope_parse(text)

    def score(self, prediction, sample):
        return float(prediction == sample.answer)

    def aggregate(self, records):
        scored = [r for r in records if r.get("prediction") is not None]
        out: dict[str, Any] = M.pope_metrics([r["prediction"] for r in scored], [r["answer"] for r in scored])
        out["scored"] = len(scored)
        cats = sorted({str(r["fields"].get("category")) for r in scored if r["fields"].get("category")})
        if cats:
            out["splits"] = {
                c: M.pope_metrics([r["prediction"] for r in scored if r["fields"].get("category") == c],
                                  [r["answer"] for r in scored if r["fields"].get("category") == c])
                for c in cats
            }
        return out


class MMETask(HubTask):
    """MME: yes/no parsing; per-category acc and acc+, perception (max 2000) and cognition (max 800)."""

    name = "mme"
    instruction = SHORT_ANSWER
    primary_metric = "total"
    max_new_tokens = 8

    def to_sample(self, row, media_root):
        qid = str(row["question_id"])
        meta = {"category": row["category"], "image_key": qid}
        sample = self._image_sample(row, media_root, row.get("image"), id="", question=str(row["question"]),
                                    answer=str(row["answer"]).strip(), meta=meta)
        return sample

    def samples(self, split=None, limit=None):
        # question_id names the image; its two questions share it, so number the questions per image.
        seen: Counter = Counter()
        for sample in super().samples(split, limit):
            key = f"{sample.meta['category']}/{sample.meta['image_key']}"
            sample.id = f"{key}#{seen[key]}"
            seen[key] += 1
            yield sample

    def parse(self, text, sample):
        return M.mme_parse(text)

    def score(self, prediction, sample):
        return float(prediction == sample.answer.lower())

    def record_fields(self, sample):
        return {"category": sample.meta["category"], "image": f"{sample.meta['category']}/{sample.meta['image_key']}"}

    def aggregate(self, records):
        scored = [r for r in records if r.get("prediction") is not None]
        out = M.mme_scores({"category": r["fields"]["category"], "image": r["fields"]["image"],
                            "prediction": r["prediction"], "answer": r["answer"]} for r in scored)
        out["scored"] = len(scored)
        return out


class _VideoMCTask(HubTask):
    """Multiple choice over a video: the answer is parsed to an option; unparseable answers are wrong."""

    kind = "video"
    max_new_tokens = 16

    def __init__(self, *args: Any, num_frames: int = 8, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"`num_frames` must be an int >= 1, got {num_frames!r}")
        self.num_frames = num_frames

    def _video_roots(self, media_root: Path | None, *subdirs: str) -> list[Path]:
        if media_root is None:
            raise MediaError(
                f"{self.name}: the hub rows do not contain the videos; pass `media_dir=` (the folder holding them)"
            )
        roots = [media_root / s for s in subdirs if s] + [media_root]
        return roots

    def _video_sample(self, video_name: str, roots_fn, **fields: Any) -> Sample:
        meta = dict(fields.pop("meta", {}))
        video = None
        try:
            video = load_video(find_video(video_name, roots_fn()), self.num_frames)
        except MediaError as exc:
            meta["media_error"] = str(exc)
        return Sample(task=self.name, modality="video", video=video, meta=meta, **fields)

    def parse(self, text, sample):
        return M.parse_choice(text, sample.choices).letter

    def score(self, prediction, sample):
        return float(prediction is not None and prediction == sample.answer)

    def aggregate(self, records):
        out = super().aggregate(records)
        out["unparsed"] = sum(1 for r in records if r.get("prediction") is None)
        return out


class NExTQATask(_VideoMCTask):
    """NExT-QA multiple choice: five options A-E, exact match with the answer's letter."""

    name = "nextqa"
    instruction = "Answer with the option's letter from the given choices directly."

    def to_sample(self, row, media_root):
        choices = tuple(str(row[f"a{i}"]) for i in range(5))
        answer = M.LETTERS[int(row["answer"])]
        video = str(row["video"])
        return self._video_sample(
            video, lambda: self._video_roots(media_root, "NExTVideo"), id=f"{video}-{row.get('qid', '')}",
            question=str(row["question"]), answer=answer, choices=choices, meta={"category": row.get("type")},
        )

    def prompt_text(self, sample):
        options = "\n".join(f"{M.LETTERS[i]}. {c}" for i, c in enumerate(sample.choices))
        return f"{sample.question}\n{options}\n{self.instruction}"


MVBENCH_SUBTASKS = (
    "action_sequence", "action_prediction", "action_antonym", "fine_grained_action", "unexpected_action",
    "object_existence", "object_interaction", "object_shuffle", "moving_direction", "action_localization",
    "scene_transition", "action_count", "moving_count", "moving_attribute", "state_change", "fine_grained_pose",
    "character_order", "egocentric_navigation", "episodic_reasoning", "counterfactual_inference",
)


class MVBenchTask(_VideoMCTask):
    """MVBench: 20 subtasks (one hub config each); overall = mean of the subtask accuracies.

    Samples interleave the subtasks round-robin, so any ``limit`` covers them evenly. Videos resolve under
    ``media_dir/<subtask>/`` then ``media_dir/``; a frame folder works like a video file. Clip start/end
    bounds of some subtasks are not applied (the whole video is sampled).
    """

    name = "mvbench"
    instruction = "Only give the best option."

    def __init__(self, *args: Any, subtasks: Sequence[str] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        subtasks = tuple(subtasks) if subtasks else MVBENCH_SUBTASKS
        bad = [s for s in subtasks if s not in MVBENCH_SUBTASKS]
        if bad:
            raise ValueError(f"unknown MVBench subtask(s) {bad}; known: {', '.join(MVBENCH_SUBTASKS)}")
        self.subtasks = subtasks

    def samples(self, split=None, limit=None):
        if limit is not None and limit < 0:
            raise ValueError(f"`limit` must be >= 0 or None, got {limit}")
        self.streaming = limit is not None
        media_root = self.source.media_dir and Path(self.source.media_dir).expanduser()

        def stream(sub: str):
            try:
                root = media_root or base_dir(self.source, split, sub)
            except FileNotFoundError:
                root = None
            for i, row in enumerate(self.rows(split, name=sub)):
                yield self._to_sample(sub, i, row, root)

        streams = [stream(s) for s in self.subtasks]
        merged = (s for group in itertools.zip_longest(*streams) for s in group if s is not None)
        yield from itertools.islice(merged, limit)

    def _to_sample(self, subtask: str, index: int, row: dict[str, Any], media_root: Path | None) -> Sample:
        choices = tuple(str(c) for c in row["candidates"])
        answer_text = str(row["answer"])
        if answer_text not in choices:
            raise ValueError(f"MVBench {subtask} row {index}: answer {answer_text!r} is not among the candidates {choices}")
        return self._video_sample(
            str(row["video"]), lambda: self._video_roots(media_root, subtask), id=f"{subtask}/{index}",
            question=str(row["question"]), answer=M.LETTERS[choices.index(answer_text)], choices=choices,
            meta={"subtask": subtask},
        )

    def prompt_text(self, sample):
        options = "\n".join(f"({M.LETTERS[i]}) {c}" for i, c in enumerate(sample.choices))
        return f"Question: {sample.question}\nOption:\n{options}\n{self.instruction}"

    def record_fields(self, sample):
        return {"subtask": sample.meta["subtask"]}

    def aggregate(self, records):
        scored = [r for r in records if r.get("score") is not None]
        groups = M.mean_over_groups((r["fields"]["subtask"], r["score"]) for r in scored)
        return {"accuracy": groups["overall"], "subtasks": groups["groups"], "counts": groups["counts"],
                "missing_subtasks": [s for s in self.subtasks if s not in groups["groups"]],
                "unparsed": sum(1 for r in scored if r.get("prediction") is None), "scored": len(scored)}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


TASK_CLASSES: dict[str, type[HubTask]] = {
    cls.name: cls for cls in (VQAv2Task, GQATask, TextVQATask, DocVQATask, ChartQATask, POPETask, MMETask,
                              NExTQATask, MVBenchTask)
}
