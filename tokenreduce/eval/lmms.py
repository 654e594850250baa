"""A ``tokenreduce`` model for lmms-eval: any supported transformers VLM, wrapped with a reduction method.

    lmms-eval --model tokenreduce \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=fastv,budget=0.25,dtype=bfloat16 \\
        --tasks docvqa_val --batch_size 4

lmms-eval discovers the model through the entry point group ``lmms_eval.models`` (declared in
``pyproject.toml``; the payload is :func:`manifest`). ``--model_args`` takes ``pretrained`` (hub id or
local directory), ``method`` (a registered method, or ``none``), ``budget`` (as ``tr.wrap``'s ``budget=``:
the share of the full visual-token x layer work, through the method's ``at_budget(budget, num_layers=...)``)
and / or the method's own options (``keep=64,layer=2``; a list as ``layers=[8,16,24]`` or
``layers=8:16:24``), and loading options (``revision``, ``dtype``,
``device``, ``device_map``, ``attn_implementation``, ``batch_size``, ``max_frames_num``).

``generate_until`` batches requests with left padding and returns only the new text;
``loglikelihood`` scores the continuation from logits aligned with the original sequence (the wrapped
model restores the positions an in-LLM method dropped; a projector-stage method keeps every text token,
so the continuation's logits are the last ones either way).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

import tokenreduce as tr
from tokenreduce.core.api import get_handle
from tokenreduce.eval.media import load_video
from tokenreduce.eval.task import build_prompt

MODEL_ID = "tokenreduce"
CLASS_PATH = "tokenreduce.eval.lmms.TokenReduceLMM"
MAX_ROUNDS = 64


def manifest():
    """The lmms-eval model manifest (the entry point's payload)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH, aliases=("token_reduce",))


def parse_option(value: Any) -> Any:
    """``--model_args`` values: JSON lists/objects, ``a:b:c`` tuples of numbers, else as lmms-eval parsed them."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text[:1] in "[{":
        try:
            parsed = json.loads(text)
            return tuple(parsed) if isinstance(parsed, list) else parsed
        except json.JSONDecodeError:
            return value
    if ":" in text:
        parts = text.split(":")
        try:
            return tuple(int(p) if p.lstrip("-").isdigit() else float(p) for p in parts)
        except ValueError:
            return value
    return value


class TokenReduceLMM(lmms):
    """lmms-eval model: a transformers VLM wrapped by ``tokenreduce.wrap`` (or left as is: ``method=none``)."""

    is_simple = True

    def __init__(
        self, pretrained: str, method: str = "none", budget: float | None = None, batch_size: int | str = 1,
        max_frames_num: int = 8, max_new_tokens: int = 128, revision: str | None = None, dtype: str | None = "auto",
        device: str | None = None, device_map: str | None = None, attn_implementation: str | None = None,
        trust_remote_code: bool = False, model: Any = None, processor: Any = None, **method_options: Any,
    ) -> None:
        super().__init__()
        from accelerate import Accelerator

        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        if device is None:
            device = (f"cuda:{self.accelerator.local_process_index}" if torch.cuda.is_available() else "cpu")
        self._device = torch.device(device)
        if model is None:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
            if dtype:
                kwargs["dtype"] = dtype if dtype == "auto" else getattr(torch, dtype)
            if device_map:
                kwargs["device_map"] = device_map
            if attn_implementation:
                kwargs["attn_implementation"] = attn_implementation
            model = AutoModelForImageTextToText.from_pretrained(pretrained, **kwargs)
            processor = AutoProcessor.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code)
        elif processor is None:
            raise ValueError("`processor` is required together with `model`")
        if not device_map:
            model.to(self._device)
        self._model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "left"
        self.family = model.config.model_type
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 1
        if not isinstance(max_frames_num, int) or max_frames_num < 1:
            raise ValueError(f"`max_frames_num` must be an int >= 1, got {max_frames_num!r}")
        self.max_frames_num, self.max_new_tokens = max_frames_num, int(max_new_tokens)
        self.method = method
        self.config = self._wrap(method, budget, {k: parse_option(v) for k, v in method_options.items()})

    def _wrap(self, method: str, budget: float | None, options: dict[str, Any]):
        if method in (None, "", "none"):
            if budget is not None or options:
                raise ValueError(f"method 'none' takes no budget or options, got budget={budget!r}, options={sorted(options)}")
            return None
        # one path with tr.wrap's `budget=`: the same config, and tr.stats reports the budget
        tr.wrap(self._model, method, **({"budget": float(budget)} if budget is not None else {}), **options)
        return get_handle(self._model).config

    # ----- lmms-eval properties ----------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def eot_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    # ----- inputs ------------------------------------------------------------------------------------
    def _visuals(self, request: Instance) -> list[Any]:
        args = request.args
        doc_to_visual, doc_id, task, split = args[2], args[-3], args[-2], args[-1]
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        flat: list[Any] = []
        for v in visuals or []:
            flat.extend(v if isinstance(v, (list, tuple)) else [v])
        return flat

    def _prompt(self, context: str, visuals: Sequence[Any]) -> tuple[str, dict[str, Any]]:
        from PIL import Image

        images = [v for v in visuals if isinstance(v, Image.Image)]
        videos = [load_video(v, self.max_frames_num) for v in visuals if isinstance(v, str)]
        context = context.replace("<image>", "").replace("<video>", "").strip()
        text = build_prompt(self.processor, self.family, context, n_images=len(images), n_videos=len(videos))
        media: dict[str, Any] = {}
        if images:
            media["images"] = images
        if videos:
            media["videos"] = videos
        return text, media

    def _encode(self, texts: list[str], media: list[dict[str, Any]]) -> dict[str, Any]:
        images = [im for m in media for im in m.get("images", [])]
        videos = [v for m in media for v in m.get("videos", [])]
        kwargs: dict[str, Any] = {}
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = videos
        inputs = self.processor(text=texts, padding=True, return_tensors="pt", **kwargs)
        dtype = next(self._model.parameters()).dtype
        return {k: (v.to(self._device).to(dtype) if torch.is_tensor(v) and v.is_floating_point() else
                    v.to(self._device) if torch.is_tensor(v) else v) for k, v in dict(inputs).items()}

    def _generate(self, texts: list[str], media: list[dict[str, Any]], gen_kwargs: dict[str, Any]) -> list[str]:
        gen_kwargs = dict(gen_kwargs)
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_new = int(gen_kwargs.pop("max_new_tokens", self.max_new_tokens))
        temperature = float(gen_kwargs.pop("temperature", 0) or 0)
        top_p = gen_kwargs.pop("top_p", None)
        num_beams = int(gen_kwargs.pop("num_beams", 1) or 1)
        inputs = self._encode(texts, media)
        sample = temperature > 0
        with torch.inference_mode():
            out = self._model.generate(
                **inputs, max_new_tokens=max_new, do_sample=sample, temperature=temperature if sample else None,
                top_p=top_p if sample else None, num_beams=num_beams, pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.eot_token_id,
            )
        sequences = out if torch.is_tensor(out) else out.sequences
        new = sequences[:, inputs["input_ids"].shape[1]:]
        answers = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        cleaned = []
        for text in answers:
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            cleaned.append(text.strip())
        return cleaned

    # ----- lmms-eval API -----------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (unless ``temperature > 0``) text for each request, prompt excluded, batched by settings."""
        prepared = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args[0], req.args[1]
            text, media = self._prompt(context, self._visuals(req))
            prepared.append((i, text, media, dict(gen_kwargs or {})))
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[tuple]] = {}
        for item in prepared:
            groups.setdefault(json.dumps(item[3], sort_keys=True, default=str), []).append(item)
        for items in groups.values():
            items.sort(key=lambda x: -len(x[1]))
            for start in range(0, len(items), self.batch_size):
                chunk = items[start : start + self.batch_size]
                texts = self._generate([c[1] for c in chunk], [c[2] for c in chunk], chunk[0][3])
                for (i, *_), text in zip(chunk, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], chunk[0][3]), text)
        return [r if r is not None else "" for r in results]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of each continuation given its context (and whether it is greedy)."""
        out = []
        for req in requests:
            context, target = req.args[0], req.args[1]
            if not isinstance(target, str):
                doc_id, task, split = req.args[-3], req.args[-2], req.args[-1]
                target = target(self.task_dict[task][split][doc_id])
            prompt, media = self._prompt(context, self._visuals(req))
            full = self._encode([prompt + target], [media])
            prompt_len = self._encode([prompt], [media])["input_ids"].shape[1]
            n = full["input_ids"].shape[1] - prompt_len
            if n <= 0:
                raise ValueError(f"continuation {target!r} adds no tokens to the context")
            with torch.inference_mode():
                logits = self._model(**full).logits
            logprobs = torch.log_softmax(logits[0, -n - 1 : -1].float(), dim=-1)
            targets = full["input_ids"][0, -n:]
            score = logprobs.gather(-1, targets[:, None]).sum().item()
            greedy = bool((logprobs.argmax(-1) == targets).all())
            out.append((score, greedy))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Rounds per request: round 0 from the request's context; round ``i`` from the task's
        ``doc_to_text(doc, previous_output=..., round_idx=i, previous_round_info=...)`` until it signals the end."""
        results = []
        for req in requests:
            context, gen_kwargs, _, doc_to_text, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            visuals = self._visuals(req)
            rounds: list[str] = []
            info = None
            round_idx = 0
            while True:
                if round_idx >= MAX_ROUNDS:
                    raise RuntimeError(f"task {task!r} doc {doc_id}: no terminal signal after {MAX_ROUNDS} rounds")
                if round_idx > 0:
                    visuals, context, terminal, _, info = doc_to_text(
                        doc, previous_output=list(rounds), round_idx=round_idx, previous_round_info=info)
                    if terminal:
                        break
                    visuals = [v for group in (visuals or []) for v in (group if isinstance(group, (list, tuple)) else [group])]
                text, media = self._prompt(context, visuals)
                rounds.append(self._generate([text], [media], dict(gen_kwargs or {}))[0])
                round_idx += 1
            results.append(rounds)
        return results
