"""vLLM with the tokenreduce plugin, run for real on the CPU, against the transformers path.

Every case starts one engine (in this process) and sends a batch of prompts with different images
(sizes, seeds) and a video; each prompt's greedy tokens and first-step log-probabilities must equal what
``tr.wrap`` gives on the transformers model for that prompt alone. The references never touch vLLM.
"""

from __future__ import annotations

import pytest

from .helpers import Request, assert_same, image, prompt, run_hf, run_vllm, video


def requests(family: str, videos: bool = True) -> list[Request]:
    out = [
        Request(prompt(family, "image"), images=[image(112, 140, 0)]),
        Request(prompt(family, "image", "w11 w12 w13"), images=[image(168, 112, 1)]),
        Request(prompt(family, "image", "w20"), images=[image(224, 224, 4)]),
    ]
    if family in ("llava_next", "llava_onevision"):
        # anyres: 2 x 3 and 3 x 2 crops, a square image (OneVision: 4 x 4 crops whose canvas exceeds
        # anyres_max_9, downsampled; NeXT: 2 x 2), one crop
        out.append(Request(prompt(family, "image", "w21 w22"), images=[image(56, 56, 5)]))
    if videos:
        # 140 x 140: the video's time span stays within its spatial span, where vLLM and transformers
        # 5.24 number Qwen2.5-VL's text after a video alike (they differ beyond, with or without reduction).
        out.append(Request(prompt(family, "video"), videos=[video(4, 140, 140, 2)]))
    return out


CASES = [
    ("qwen2_vl", {"method": "pool", "keep": 8}),
    ("qwen2_vl", {"method": "divprune", "keep": 6}),
    ("qwen2_vl", {"method": "random", "keep": 0.3, "seed": 5}),
    ("qwen2_vl", {"method": "tome_projector", "keep": 7}),
    ("qwen2_vl", {"method": "divprune", "keep": 0.25, "renumber_positions": True}),
    ("qwen2_5_vl", {"method": "divprune", "keep": 6}),
    ("qwen2_5_vl", {"method": "pool", "keep": 0.25}),
    ("llava", {"method": "divprune", "keep": 5}),
    ("llava", {"method": "pool", "keep": 0.25, "renumber_positions": True}),
    # Tower-reading methods: signals from vLLM's own CLIP tower (which vLLM builds up to the feature layer,
    # here its first layer: the tiny tower has 2 and LLaVA reads layer -2).
    ("llava", {"method": "visionzip", "dominant": 5, "contextual": 3}),
    ("llava", {"method": "doc_correlation", "keep": 0.4, "shallow_layer": 0}),
    # Videos only (the images of the batch pass through); torch k-means: no FAISS in .venv-vllm.
    # LLaVA-OneVision: anyres images (base grid + unpadded canvas with newline slots) and a video.
    ("llava_onevision", {"method": "pool", "keep": 0.25}),
    ("llava_onevision", {"method": "random", "keep": 0.3, "seed": 5}),
    ("llava_onevision", {"method": "tome_projector", "keep": 9}),
    # visionzip on OneVision's videos (per frame: 2 dominant + 1 contextual of 2 x 2 pooled tokens), its
    # signals from vLLM's own SigLIP tower, pooled as the frames are.
    ("llava_onevision", {"method": "visionzip", "dominant": 2, "contextual": 1, "modalities": ["video"]}),
    # LLaVA-NeXT: anyres images (unpadded canvas, newline slots, no downsampling).
    ("llava_next", {"method": "pool", "keep": 0.25}),
    ("llava_next", {"method": "random", "keep": 0.4, "seed": 3}),
    ("llava_next", {"method": "tome_projector", "keep": 11}),
    ("llava_next", {"method": "divprune", "keep": 0.3}),
    ("qwen2_vl", {"method": "vqtoken", "keep": 6, "kmeans": "torch"}),
    ("qwen2_5_vl", {"method": "vqtoken", "keep": 0.2, "kmeans": "torch", "renumber_positions": False}),
]


def video_only(family: str, reduction: dict) -> bool:
    return reduction["method"] == "vqtoken" or reduction.get("modalities") == ["video"]


@pytest.mark.parametrize(("family", "reduction"), CASES, ids=[f"{f}-{r['method']}-{i}" for i, (f, r) in enumerate(CASES)])
def test_method_equals_transformers(model_dir, family, reduction):
    path = model_dir(family)
    reqs = requests(family, videos=family not in ("llava", "llava_next"))
    got = run_vllm(path, reqs, reduction)
    want = run_hf(path, reqs, reduction)
    assert_same(got, want)
    first = len(reqs) - 1 if video_only(family, reduction) else 0
    full = run_hf(path, reqs[first : first + 1], None)
    assert got[first].prompt_len < full[0].prompt_len  # the prompt really was reduced


def test_divprune_on_onevision_anyres_images(model_dir):
    """divprune on OneVision's anyres images: the canvas rows' newline slots are candidates, the count is
    fixed by ``keep``. The one-crop image is left out: its crop repeats the base grid's pixels and its
    newline slots share one vector, so twins tie at distance 0 and each backend's float noise picks a
    different twin (the same features at other positions)."""
    path = model_dir("llava_onevision")
    reqs = [r for i, r in enumerate(requests("llava_onevision")) if i != 3]
    reduction = {"method": "divprune", "keep": 12}
    got = run_vllm(path, reqs, reduction)
    assert_same(got, run_hf(path, reqs, reduction))
    assert got[0].prompt_len < run_hf(path, reqs[:1], None)[0].prompt_len


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_keep_all_equals_plain_vllm(model_dir, family):
    path = model_dir(family)
    reqs = requests(family)
    plain = run_vllm(path, reqs, None)
    kept = run_vllm(path, reqs, {"method": "pool", "keep": 1.0})
    assert_same(kept, plain, atol=1e-5)
    assert_same(plain, run_hf(path, reqs, None))


@pytest.mark.parametrize(("family", "reduction", "message"), [
    ("qwen2_vl", {"method": "fastv"}, r"method 'fastv' cannot run in vLLM .*methods that can: divprune, doc_correlation, pool"),
    ("llava", {"method": "doc_correlation", "keep": 0.5}, "tower layer 1 of doc_correlation is not built by vLLM"),
    ("llava_onevision", {"method": "visionzip", "modalities": ["image"]}, "on llava_onevision's anyres images"),
])
def test_refused_method_fails_at_engine_start(model_dir, family, reduction, message):
    from vllm import LLM

    with pytest.raises(ValueError, match=message):
        LLM(model=model_dir(family), dtype="float32", enforce_eager=True, max_model_len=512,
            distributed_executor_backend="uni", hf_overrides={"tokenreduce": reduction})
