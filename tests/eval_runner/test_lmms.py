"""The lmms-eval model: discovery through the entry point, generate_until and loglikelihood on a tiny model."""

from __future__ import annotations

from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance
from lmms_eval.models.registry_v2 import ModelRegistryV2

import tokenreduce as tr
from tokenreduce.eval.lmms import TokenReduceLMM, manifest, parse_option
from tokenreduce.eval.task import build_prompt

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenreduce.testing.tiny import tiny_model, tiny_processor

    path = tmp_path_factory.mktemp("tiny-llava")
    tiny_model("llava", num_layers=4).save_pretrained(path)
    tiny_processor("llava").save_pretrained(path)
    return path


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 60), (70, 50))]


def _requests(kind, items):
    out = []
    for i, args in enumerate(items):
        out.append(Instance(request_type=kind, arguments=(*args, lambda doc: [doc["image"]], i, "t", "test"), idx=0,
                            metadata={"task": "t", "doc_id": i, "repeats": 1}))
    return out


def _lmm(model_dir, **kw):
    lm = TokenReduceLMM(pretrained=str(model_dir), device="cpu", dtype="float32", **kw)
    lm.task_dict = {"t": {"test": {i: {"image": im} for i, im in enumerate(_images())}}}
    return lm


def test_entry_point_declared_in_pyproject_resolves_to_the_model():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    assert declared == {"tokenreduce": "tokenreduce.eval.lmms:manifest"}
    ep = EntryPoint(name="tokenreduce", value=declared["tokenreduce"], group="lmms_eval.models")
    registry = ModelRegistryV2()
    registry._select_entry_points = lambda group: [ep] if group == "lmms_eval.models" else []
    registry.load_entrypoint_manifests()  # lmms-eval's own discovery path, fed our declaration
    assert registry.get_model_class("tokenreduce") is TokenReduceLMM
    assert registry.get_model_class("token_reduce") is TokenReduceLMM  # alias
    assert registry.resolve("tokenreduce").model_type == "simple"


def test_discovery_from_the_manifest_object():
    registry = ModelRegistryV2()
    for m in registry._coerce_payload_to_manifests(manifest):
        registry.register_manifest(m)
    assert "tokenreduce" in registry.list_canonical_model_ids()
    assert registry.get_model_class("tokenreduce").is_simple


def test_generate_until_matches_the_wrapped_model(model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    lm = _lmm(model_dir, method="pool", budget=0.5, batch_size=2)
    gen = {"max_new_tokens": 3, "until": ["w999"]}
    contexts = ["w5 w6 w7", "<image>\nw8 w9 w10 w11 w12"]
    texts = lm.generate_until(_requests("generate_until", [(c, dict(gen)) for c in contexts]))
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    # Direct: the same checkpoint wrapped the same way, one unpadded prompt at a time.
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    tr.wrap(model, tr.PoolConfig.at_budget(0.5, num_layers=4))
    for context, image, text in zip(contexts, _images(), texts):
        prompt = build_prompt(processor, "llava", context.replace("<image>", "").strip(), n_images=1)
        inputs = processor(text=[prompt], images=[image], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id,
                             eos_token_id=processor.tokenizer.eos_token_id)
        new = out[0, inputs["input_ids"].shape[1]:]
        assert text == processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    assert tr.stats(model).samples[-1].visual_tokens_out == 9
    # The stop string cuts the text; the prompt never appears in it.
    first_word = texts[0].split()[0]
    cut = lm.generate_until(_requests("generate_until", [(contexts[0], {"max_new_tokens": 3, "until": [first_word]})]))
    assert cut == [""]


def test_loglikelihood_alignment_for_projector_and_in_llm_methods(model_dir):
    items = [("w5 w6 w7", " w8 w9"), ("w10", " w11")]
    full = _lmm(model_dir).loglikelihood(_requests("loglikelihood", items))
    # Independent reference: the unwrapped model's label loss over the continuation tokens.
    lm = _lmm(model_dir)
    prompt, media = lm._prompt(items[0][0], [_images()[0]])
    enc = lm._encode([prompt + items[0][1]], [media])
    n = enc["input_ids"].shape[1] - lm._encode([prompt], [media])["input_ids"].shape[1]
    labels = enc["input_ids"].clone()
    labels[:, :-n] = -100
    with torch.inference_mode():
        loss = lm.model(**enc, labels=labels).loss
    assert full[0][0] == pytest.approx(-loss.item() * n, rel=1e-5)
    # Keeping every token, a projector method (pool) and an in-LLM one (fastv) score exactly like the original.
    for method in ("pool", "fastv"):
        same = _lmm(model_dir, method=method, budget=1.0).loglikelihood(_requests("loglikelihood", items))
        for (a, ga), (b, gb) in zip(same, full):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-4) and ga == gb
    reduced = _lmm(model_dir, method="fastv", keep=2, layer=1).loglikelihood(_requests("loglikelihood", items))
    assert all(np.isfinite(s) for s, _ in reduced) and reduced != full


def test_model_args_parsing_and_errors(model_dir):
    assert parse_option("8:16:24") == (8, 16, 24)
    assert parse_option("[2, 3]") == (2, 3)
    assert parse_option("0.5:0.25") == (0.5, 0.25)
    assert parse_option("text") == "text" and parse_option(3) == 3
    lm = _lmm(model_dir, method="pdrop", layers="1:2", keep="[0.5,0.25]")
    assert lm.config.layers == (1, 2) and lm.config.keep == (0.5, 0.25)
    with pytest.raises(ValueError, match="unknown method"):
        _lmm(model_dir, method="nope")
    with pytest.raises(TypeError, match="accepted options"):
        _lmm(model_dir, method="pool", colour="red")
    with pytest.raises(ValueError, match="method 'none'"):
        _lmm(model_dir, keep=3)


@pytest.mark.slow
def test_lmms_eval_command_runs_a_local_task_end_to_end(tmp_path):
    """The ``lmms-eval`` command itself (not the in-process API): entry point discovery, a task YAML from
    ``--include_path`` on local data, the shipped synthetic image model wrapped with pool, a results file."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    from tokenreduce.eval.synthetic.benchmark import write_split
    from tokenreduce.eval.synthetic.models import model_dir

    command = shutil.which("lmms-eval", path=str(Path(sys.executable).parent)) or shutil.which("lmms-eval")
    assert command, "the lmms-eval command is not installed next to this Python"
    write_split("image", "test", tmp_path, n=4)  # image-test.jsonl + PNGs, read relative to the working dir
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(tmp_path / "hf"), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    out = tmp_path / "results"
    args = [command, "--model", "tokenreduce", "--model_args",
            f"pretrained={model_dir('image')},method=pool,budget=0.25,device=cpu,dtype=float32",
            "--tasks", "tokenreduce_synthetic_image_local", "--include_path", str(Path(__file__).parent / "lmms_task"),
            "--limit", "4", "--output_path", str(out)]
    run = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    files = list(out.rglob("*_results.json"))
    assert len(files) == 1, f"no results file under {out}: {run.stderr[-2000:]}"
    results = json.loads(files[0].read_text())
    task = "tokenreduce_synthetic_image_local"
    assert results["n-samples"][task] == {"original": 4, "effective": 4}
    assert 0.0 <= results["results"][task]["exact_match,none"] <= 1.0
    assert "method=pool" in results["config"]["model_args"]
