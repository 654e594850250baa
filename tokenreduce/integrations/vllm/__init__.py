"""Serve reduced VLMs with vLLM: tokenreduce's fixed-count methods inside vLLM's own model classes.

Installed with ``pip install "tokenreduce[vllm]"``; vLLM loads :func:`register` through its
``vllm.general_plugins`` entry point in every process. A reduction is chosen per engine::

    LLM(model=path, hf_overrides={"tokenreduce": {"method": "divprune", "keep": 64}})
    vllm serve PATH --hf-overrides '{"tokenreduce": {"method": "pool", "keep": 0.25}}'

Without the ``tokenreduce`` entry the registered classes behave exactly as vLLM's own. Methods whose
output count is not fixed by the image size are refused when the engine starts (see
:mod:`tokenreduce.integrations.vllm.reducer`).
"""

from __future__ import annotations

from .reducer import HF_CONFIG_KEY, SUPPORTED, EngineReducer, parse_reducer

# Architecture name -> "module:class" of the reducing subclass (imported lazily by vLLM).
MODEL_CLASSES = {
    "Qwen2VLForConditionalGeneration": "tokenreduce.integrations.vllm.models:Qwen2VLReduced",
    "Qwen2_5_VLForConditionalGeneration": "tokenreduce.integrations.vllm.models:Qwen2_5_VLReduced",
    "LlavaForConditionalGeneration": "tokenreduce.integrations.vllm.models:LlavaReduced",
    "LlavaOnevisionForConditionalGeneration": "tokenreduce.integrations.vllm.models:LlavaOnevisionReduced",
    "LlavaNextForConditionalGeneration": "tokenreduce.integrations.vllm.models:LlavaNextReduced",
}


def register() -> None:
    """vLLM general plugin: put the reducing classes under their families' architecture names."""
    from vllm import ModelRegistry

    for arch, target in MODEL_CLASSES.items():
        ModelRegistry.register_model(arch, target)


__all__ = ["HF_CONFIG_KEY", "MODEL_CLASSES", "SUPPORTED", "EngineReducer", "parse_reducer", "register"]
