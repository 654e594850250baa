"""Trainers' shared parts: atomic caches and checkpoints, gradients averaged by accelerate's DDP wrapper."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenreduce.core.training import TrainStep, atomic_directory, atomic_save, atomic_write_text

REPO = Path(__file__).resolve().parents[1]


def test_atomic_save_leaves_the_previous_file_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "cache.pt"
    atomic_save({"step": 1}, target)
    real_save = torch.save

    def interrupted_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a pick")  # what an interrupted torch.save leaves behind
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"step": 2}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(target) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.pt"]  # no temporary file left
    atomic_save({"step": 3}, target)
    assert torch.load(target) == {"step": 3}


def test_atomic_directory_replaces_files_only_when_the_save_completes(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_directory(out) as staging:
        (staging / "config.json").write_text("{}")
        (staging / "lm").mkdir()
        (staging / "lm" / "model.safetensors").write_bytes(b"v1")
    assert (out / "lm" / "model.safetensors").read_bytes() == b"v1"
    with pytest.raises(RuntimeError), atomic_directory(out) as staging:
        (staging / "lm").mkdir()
        (staging / "lm" / "model.safetensors").write_bytes(b"v2 trunc")
        raise RuntimeError("killed while saving")
    assert (out / "lm" / "model.safetensors").read_bytes() == b"v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    atomic_write_text(out / "summary.json", "[1]\n")
    assert (out / "summary.json").read_text() == "[1]\n"


def test_train_step_registers_the_trainable_module_only():
    frozen = torch.nn.Linear(4, 4)
    head = torch.nn.Linear(4, 2)
    step = TrainStep(head, lambda x: head(frozen(x)).sum())
    assert {id(p) for p in step.parameters()} == {id(p) for p in head.parameters()}
    step(torch.ones(1, 4)).backward()
    assert head.weight.grad is not None


RANK_SCRIPT = """
import sys
import torch
from tests.langdc.helpers import tiny_captioner
from tokenreduce.core.training import training_accelerator
from tokenreduce.plugins.langdc.training import train_captioner

accelerator = training_accelerator()
rank = accelerator.process_index
captioner = tiny_captioner()  # the same initial weights on every process
gen = torch.Generator().manual_seed(100 + rank)  # but different data
inputs = torch.randn(4, 1, 8, 64, generator=gen)
captions = [[[3 + (rank + v + k) % 5 for k in range(1 + v % 3)]] for v in range(4)]
train_captioner(captioner, inputs, captions, steps=3, batch_size=4, lr=1e-2, accelerator=accelerator, log_every=100)
torch.save({k: v.detach().clone() for k, v in captioner.state_dict().items()}, f"{sys.argv[1]}/rank{rank}.pt")
"""


def test_two_processes_end_with_the_same_weights(tmp_path):
    """Each process sees other data; DDP's averaged gradients keep their weights identical."""
    pytest.importorskip("accelerate")
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               MASTER_PORT=str(30500 + os.getpid() % 1000), ACCELERATE_USE_CPU="true")  # gloo, not a GPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", env["MASTER_PORT"], str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))

    sys.path.insert(0, str(REPO))
    from tests.langdc.helpers import tiny_captioner

    initial = tiny_captioner().state_dict()
    trained = [k for k in rank0 if not torch.equal(rank0[k], initial[k])]
    assert trained, "training changed nothing"
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=1e-6, msg=key)


def test_langdc_alignment_trains_the_post_projector_through_the_step_module():
    """``train_alignment`` on the shipped video model and captioner: the forced-caption forward runs inside
    the step module, and only the post-projector and the VLM adapters move."""
    import tokenreduce as tr
    from tokenreduce.core.api import get_handle
    from tokenreduce.eval.synthetic import load_model
    from tokenreduce.plugins.langdc import Captioner, LangDCConfig
    from tokenreduce.plugins.langdc.data import build_examples
    from tokenreduce.plugins.langdc.training import train_alignment

    path = REPO / "assets" / "langdc" / "synthetic-onevision-video"
    model, processor = load_model("video")
    train, layout = build_examples(model, processor, "train", 0, 2, seed=0)
    captioner = Captioner.from_pretrained(path)
    before = {k: v.clone() for k, v in captioner.state_dict().items()}
    pairs = [(ex, q) for ex in train for q in ex.questions]
    tr.wrap(model, LangDCConfig(captioner=str(path)))
    try:
        method = get_handle(model).method
        method.set_captioner(captioner)
        log = train_alignment(model, method, pairs, {ex.sample_id: ex.captions for ex in train}, layout,
                              int(processor.tokenizer.pad_token_id or 0), steps=3, batch_size=2, lr=1e-2, distill=0.0)
    finally:
        tr.unwrap(model)
    assert len(log) == 1 and log[0]["step"] == 3
    moved = {k for k, v in captioner.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("post_proj.") for k in moved)
    assert all(k.startswith(("post_proj.", "vlm_adapters.")) for k in moved)  # the captioner LM stays frozen
