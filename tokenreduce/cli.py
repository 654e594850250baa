"""The ``tokenreduce`` command."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    """Wrap a tiny model of every family with every method; print tokens in/out and logits agreement."""
    import torch

    import tokenreduce as tr
    from tokenreduce.core.registry import get_method
    from tokenreduce.testing.tiny import FAMILIES, default_rows, tiny_batch, tiny_model

    torch.manual_seed(0)
    print("visual tokens: per sample at the LLM input, and kept averaged over the LLM's layers")
    print(f"{'family':<18}{'method':<12}{'budget':>7}{'tokens in':>11}{'tokens out':>12}{'FLOPs':>10}{'keep-all |dlogits|':>20}")
    for family in FAMILIES:
        model = tiny_model(family, num_layers=8)
        batch = tiny_batch(model, default_rows(family, video=True))
        with torch.no_grad():
            reference = model(**batch).logits
        layers = model.config.get_text_config().num_hidden_layers
        for name in tr.list_methods():
            if not set(get_method(name).stages) & {"vision", "projector", "llm"}:
                continue  # decode-stage methods (ares) keep every visual token: no visual budget to show
            config_cls = get_method(name).config_cls
            tr.wrap(model, config_cls.at_budget(1.0, num_layers=layers))
            with torch.no_grad():
                same = model(**batch).logits
            tr.unwrap(model)
            valid = batch["attention_mask"].bool()
            diff = (same[valid] - reference[valid]).abs().max().item() if same.shape == reference.shape else float("nan")
            tr.wrap(model, config_cls.at_budget(args.budget, num_layers=layers))
            with torch.no_grad():
                model(**batch)
            s = tr.stats(model).summary()
            tr.unwrap(model)
            kept = s["visual_tokens_in"] * s["layer_mean_keep_ratio"]
            print(
                f"{family:<18}{name:<12}{args.budget:>7.2f}{s['visual_tokens_in']:>11.1f}"
                f"{kept:>12.1f}{s['prefill_flops_ratio']:>10.2f}{diff:>20.2e}"
            )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenreduce", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run every method on the built-in tiny models and print a table")
    demo.add_argument("--budget", type=float, default=0.25, help="fraction of visual tokens kept (default 0.25)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
