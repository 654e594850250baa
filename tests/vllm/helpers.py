"""Running the same requests through vLLM (with the tokenreduce plugin) and through transformers."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

MAX_TOKENS = 6
TOP = 5


def image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def video(frames: int, height: int, width: int, seed: int, fps: float = 2.0) -> tuple[np.ndarray, dict]:
    """Decoded frames and the metadata vLLM and transformers read their timing from."""
    rng = np.random.default_rng(seed)
    metadata = {"total_num_frames": frames, "fps": fps, "duration": frames / fps, "width": width, "height": height,
                "frames_indices": list(range(frames)), "video_backend": "opencv", "do_sample_frames": False}
    return rng.integers(0, 255, (frames, height, width, 3), dtype=np.uint8), metadata


def prompt(family: str, modality: str, words: str = "w5 w6") -> str:
    from tokenreduce.testing.tiny_vllm import PLACEHOLDERS

    token = PLACEHOLDERS[family][0 if modality == "image" else 1]
    if family.startswith("qwen"):
        return f"<s> {words} <|vision_start|> {token} <|vision_end|> w7 w8 w9"
    return f"<s> {words} {token} w7 w8 w9"


@dataclass
class Request:
    prompt: str
    images: list = None
    videos: list = None


@dataclass
class Result:
    tokens: list[int]
    # First step's top log-probabilities: {token: logprob}
    first: dict[int, float]
    prompt_len: int


def run_vllm(path: str, requests: list[Request], reduction: dict | None = None, **engine: Any) -> list[Result]:
    """Greedy outputs of one engine (started, used, shut down here)."""
    from vllm import LLM, SamplingParams

    overrides = None if reduction is None else {"tokenreduce": reduction}
    llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=8,
              distributed_executor_backend="uni", hf_overrides=overrides, seed=0,
              limit_mm_per_prompt={"image": 2, "video": 1}, **engine)
    try:
        inputs = []
        for r in requests:
            data = {}
            if r.images:
                data["image"] = r.images if len(r.images) > 1 else r.images[0]
            if r.videos:
                data["video"] = r.videos[0]
            inputs.append({"prompt": r.prompt, "multi_modal_data": data})
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=TOP)
        outs = llm.generate(inputs, params, use_tqdm=False)
        return [
            Result(list(o.outputs[0].token_ids), {t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()},
                   len(o.prompt_token_ids))
            for o in outs
        ]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def run_hf(path: str, requests: list[Request], reduction: dict | None = None) -> list[Result]:
    """Greedy outputs of the transformers model, wrapped with ``reduction`` (one request at a time)."""
    import transformers as T

    import tokenreduce as tr

    processor = T.AutoProcessor.from_pretrained(path)
    model = T.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    if reduction is not None:
        options = dict(reduction)
        tr.wrap(model, options.pop("method"), **options)
    out = []
    for r in requests:
        kwargs = {"text": [r.prompt], "return_tensors": "pt"}
        if r.images:
            kwargs["images"] = r.images
        if r.videos:
            frames, metadata = r.videos[0]
            kwargs["videos"] = [frames]
            fields = {k: v for k, v in metadata.items() if k != "do_sample_frames"}
            kwargs["video_metadata"] = [T.video_utils.VideoMetadata(**fields)]
            kwargs["do_sample_frames"] = False
        inputs = processor(**kwargs)
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        n = inputs["input_ids"].shape[1]
        tokens = gen.sequences[0, n:].tolist()
        logprobs = torch.log_softmax(gen.scores[0][0].float(), -1)
        top = torch.topk(logprobs, TOP)
        kept = n
        if reduction is not None:
            sample = next(s for s in tr.stats(model, reset=True).samples if s.items)
            kept = n - sample.visual_tokens_in + sample.visual_tokens_out
        out.append(Result(tokens, dict(zip(top.indices.tolist(), top.values.tolist())), kept))
    return out


def assert_same(got: list[Result], want: list[Result], atol: float = 2e-3) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.prompt_len == w.prompt_len, f"request {i}: prompt length {g.prompt_len} != {w.prompt_len}"
        assert g.tokens == w.tokens, f"request {i}: tokens {g.tokens} != {w.tokens}"
        common = set(g.first) & set(w.first)
        assert len(common) >= TOP - 1, f"request {i}: top tokens differ: {sorted(g.first)} vs {sorted(w.first)}"
        for t in common:
            assert abs(g.first[t] - w.first[t]) < atol, f"request {i}: logprob of {t}: {g.first[t]} vs {w.first[t]}"
