"""Score the synthetic benchmark through vLLM and through ``tr.wrap``, on the same samples.

Both paths use the benchmark's own prompt (``"<question> <image> answer :"``), greedy decoding of the
one-word answer, and its exact-match metric; the vLLM engine gets the reduction through
``hf_overrides`` (:mod:`tokenreduce.integrations.vllm`), the transformers model through ``tr.wrap``.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any

import tokenreduce as tr
from tokenreduce.eval.sample import Sample
from tokenreduce.eval.synthetic.prompting import encode_batch, exact_match, parse_answer, prompt

MAX_NEW_TOKENS = 2  # one answer word, then EOS


def vllm_answers(path: str, samples: Sequence[Sample], reduction: dict[str, Any] | None = None,
                 **engine: Any) -> list[str]:
    """The parsed answer of every sample from one vLLM engine (started and shut down here)."""
    from vllm import LLM, SamplingParams

    options = {"dtype": "float32", "enforce_eager": True, "max_model_len": 1024, "max_num_seqs": 32, "seed": 0,
               "limit_mm_per_prompt": {"image": 1, "video": 1}, **engine}
    llm = LLM(model=str(path), hf_overrides=None if reduction is None else {"tokenreduce": reduction}, **options)
    try:
        inputs = [{"prompt": prompt(s), "multi_modal_data": _media(s)} for s in samples]
        outs = llm.generate(inputs, SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0), use_tqdm=False)
        return [parse_answer(o.outputs[0].text) for o in outs]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def _media(sample: Sample) -> dict[str, Any]:
    return {"video": sample.video} if sample.video is not None else {"image": sample.images[0]}


def hf_answers(path: str, samples: Sequence[Sample], reduction: dict[str, Any] | None = None,
               batch_size: int = 16) -> list[str]:
    """The parsed answer of every sample from the transformers model, wrapped with ``reduction``."""
    import torch
    import transformers as T

    processor = T.AutoProcessor.from_pretrained(path)
    model = T.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    if reduction is not None:
        options = dict(reduction)
        tr.wrap(model, options.pop("method"), **options)
    answers = []
    for start in range(0, len(samples), batch_size):
        batch = list(samples[start : start + batch_size])
        inputs = encode_batch(batch, processor)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        answers += [parse_answer(t) for t in processor.batch_decode(new, skip_special_tokens=True)]
    return answers


def accuracy(samples: Sequence[Sample], answers: Sequence[str]) -> float:
    """Exact-match accuracy in percent."""
    return 100.0 * sum(exact_match(a, s.answer) for s, a in zip(samples, answers)) / max(1, len(samples))
