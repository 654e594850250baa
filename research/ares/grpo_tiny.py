"""A short ARES GRPO run with TRL on a tiny local causal LM (CPU, seconds); prints what happened.

The same run the test suite does (``tests/ares/test_grpo.py``), with knobs: the released-code reward and
per-bucket KL controller (``--variant code``) or the paper's reward (``--variant paper``) on the toy task of
:mod:`research.ares.toy`. Nothing is downloaded.

    python -m research.ares.grpo_tiny --steps 5
    python -m research.ares.grpo_tiny --variant paper --steps 3 --out runs/ares_grpo_tiny
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variant", choices=("code", "paper"), default="code")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--generations", type=int, default=4, help="rollouts per prompt")
    parser.add_argument("--batch", type=int, default=8, help="per-device batch (a multiple of --generations)")
    parser.add_argument("--length", type=int, default=12, help="max completion tokens")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="folder for the trainer's files and summary.json")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from research.ares.toy import run_grpo

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ares_grpo_"))
    result = run_grpo(out, steps=args.steps, prompts=args.prompts, num_generations=args.generations,
                      batch_size=args.batch, completion_length=args.length, variant=args.variant)
    for h in result["log_history"]:
        if "loss" in h:
            print(f"step {h['step']}: loss {h['loss']:+.4f}  reward {h['reward']:.3f}  kl {h.get('kl', 0):.4f}  "
                  f"N_HE {h.get('ares/n_hwe', 0):.2f}  threshold {h.get('ares/hwe_threshold', 0):.3f}  "
                  f"beta e/m/h {h['ares/beta_easy']:.4f}/{h['ares/beta_medium']:.4f}/{h['ares/beta_hard']:.4f}")
    print(f"{result['steps']} steps in {result['seconds']:.1f} s; parameter change {result['parameter_change']:.3f}")
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"summary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
