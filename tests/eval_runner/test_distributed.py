"""Two processes under ``accelerate launch`` (gloo on the CPU) give the single-process run, sample for sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tokenreduce.cli import main
from tokenreduce.eval.runner import Dist, read_records, shard

REPO = Path(__file__).resolve().parents[2]
ARGS = ["eval", "--task", "synthetic-image", "--limit", "5", "--methods", "none", "fastv", "--budgets", "0.5",
        "--name", "grid", "--batch-size", "2", "--quiet", "--threads", "1", "--no-plots"]
SAME = ("text", "prediction", "score", "visual_tokens_in", "visual_tokens_out", "visual_tokens_layer_mean", "layers",
        "prefill_flops", "prefill_flops_full", "kv_cache_bytes", "new_tokens")


def test_shard_takes_every_nth_sample():
    assert [list(shard(range(7), r, 3)) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert Dist.detect().world == int(os.environ.get("WORLD_SIZE", "1"))


def test_two_process_run_equals_single_process(synthetic_models, tmp_path):
    args = [*ARGS, "--model", str(synthetic_models / "synthetic-llava-image")]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               MASTER_PORT=str(29500 + os.getpid() % 1000))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", env["MASTER_PORT"], "-m", "tokenreduce.cli", *args, "--out", str(tmp_path / "multi")]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "multi" / "grid"
    assert not list(run.glob("records.rank*.jsonl"))  # rank 0 merged the rank files
    multi = read_records(run)
    single = read_records(tmp_path / "single" / "grid")
    assert set(multi) == set(single) and len(multi) == 10
    assert {r["rank"] for r in multi.values()} == {0, 1}
    for key, rec in multi.items():
        index = int(rec["sample_id"].rsplit("-", 1)[1])
        assert rec["rank"] == index % 2  # rank r takes samples r, r+2, ...
        for field in SAME:
            assert rec[field] == single[key][field], (key, field)
    summary = json.loads((run / "summary.json").read_text())
    assert [c["samples"] for c in summary["cells"]] == [5, 5]
