"""Vision-stage speed, measured side by side in one run.

1. ViT throughput with ``tome`` on a timm ViT and an open_clip ViT (random weights, real geometry):
   images/s wrapped vs unwrapped at a few ``r``, and the ratio.
2. Reducer overhead of each baseline at LLaVA-1.5 geometry (576 visual tokens of width 4096 from a
   24-layer ViT-L/14@336 tower): time in the reducer per image, against the tower's own forward time.

    python benchmarks/vision.py            # CPU
    python benchmarks/vision.py --quick    # small shapes, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

import tokenreduce as tr
from tokenreduce.core.registry import get_method
from tokenreduce.eval.bench import median_ms

RESULTS = Path(__file__).parent / "results"


def tome_throughput(quick: bool, repeats: int, device: str) -> list[dict]:
    import open_clip
    import timm

    batch = 4 if quick else 16
    towers = {
        "timm vit_base_patch16_224": lambda: timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0),
        "open_clip ViT-B-16": lambda: open_clip.create_model("ViT-B-16", pretrained=None).visual,
    }
    if quick:
        towers = {"timm vit_tiny_patch16_224": lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0),
                  "open_clip ViT-B-32": lambda: open_clip.create_model("ViT-B-32", pretrained=None).visual}
    rows = []
    x = torch.randn(batch, 3, 224, 224, device=device)
    for name, build in towers.items():
        torch.manual_seed(0)
        model = build().eval().to(device)
        with torch.no_grad():
            base = median_ms(lambda model=model: model(x), repeats, device=device)
        rows.append({"tower": name, "r": 0, "images_per_s": batch / base * 1e3, "speedup": 1.0})
        for r in (8, 16):
            tr.wrap(model, "tome", r=r)
            with torch.no_grad():
                ms = median_ms(lambda model=model: model(x), repeats, device=device)
            tokens = tr.stats(model).samples[-1].visual_tokens_out
            tr.unwrap(model)
            rows.append({"tower": name, "r": r, "images_per_s": batch / ms * 1e3, "speedup": base / ms,
                         "tokens_out": tokens})
    return rows


def reducer_overhead(quick: bool, repeats: int, device: str) -> list[dict]:
    """Time in each baseline's reducer per image vs the tower forward, LLaVA-1.5 geometry."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    vision = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14)
    text = dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=32, num_key_value_heads=32)
    if quick:
        vision.update(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
        text.update(hidden_size=512, num_attention_heads=8, num_key_value_heads=8)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval().to(device)
    pixels = torch.randn(1, 3, 336, 336, device=device)
    ids = torch.cat([torch.tensor([[1, 5, 6]]), torch.full((1, 576), 32000), torch.tensor([[7, 8]])], 1).to(device)
    with torch.no_grad():
        tower_ms = median_ms(lambda: model.model.vision_tower(pixels), repeats, device=device)
        features = model.model.get_image_features(pixel_values=pixels).pooler_output
    rows = []
    for name, budget in (("random", 64 / 576), ("pool", 64 / 576), ("divprune", 64 / 576),
                         ("visionzip", 64 / 576), ("prumerge", None), ("prumerge_plus", None), ("tome", 64 / 576)):
        cls = get_method(name).config_cls
        config = cls() if budget is None else cls.at_budget(budget)
        tr.wrap(model, config)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if name in ("random", "pool", "divprune"):  # projector stage: reduce precomputed features
            inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
        else:
            inputs["pixel_values"] = pixels
        with torch.no_grad():
            for _ in range(repeats + 1):
                model(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in inputs.items()}, logits_to_keep=1)
        samples = tr.stats(model).samples[1:]
        tr.unwrap(model)
        reducer = statistics.median(s.reducer_ms for s in samples)
        rows.append({"method": name, "tokens_out": samples[-1].visual_tokens_out, "reducer_ms": reducer,
                     "tower_ms": tower_ms, "reducer_share_of_tower": reducer / tower_ms})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    tome = tome_throughput(args.quick, args.repeats, args.device)
    overhead = reducer_overhead(args.quick, args.repeats, args.device)
    report = {"device": args.device, "device_name": device_name, "threads": torch.get_num_threads(),
              "quick": args.quick, "tome_throughput": tome, "reducer_overhead": overhead}
    out = RESULTS / f"vision_{'quick_' if args.quick else ''}{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{device_name} ({args.device}, {torch.get_num_threads()} threads)")
    print(f"\n{'tower':<28}{'r':>4}{'images/s':>11}{'speedup':>9}{'tokens out':>12}")
    for row in tome:
        print(f"{row['tower']:<28}{row['r']:>4}{row['images_per_s']:>11.2f}{row['speedup']:>9.2f}"
              f"{row.get('tokens_out', ''):>12}")
    print(f"\n{'method':<15}{'tokens out':>11}{'reducer ms':>12}{'tower ms':>10}{'share':>8}")
    for row in overhead:
        print(f"{row['method']:<15}{row['tokens_out']:>11}{row['reducer_ms']:>12.2f}{row['tower_ms']:>10.1f}"
              f"{row['reducer_share_of_tower']:>8.1%}")
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
