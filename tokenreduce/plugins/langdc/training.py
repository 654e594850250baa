"""Training LangDC's captioner, post-projector and VLM adapters on the synthetic video benchmark.

    python -m tokenreduce.plugins.langdc.training --model assets/models/synthetic-onevision-video \
        --out runs/langdc --differences neighbourhood --frame-tokens 0 --vlm-rank 32 --no-base
    accelerate launch -m tokenreduce.plugins.langdc.training --model ... --out ...   # several processes

The shipped captioner (``assets/langdc/synthetic-onevision-video``) came from two commands, a whole run
and a second alignment (``--stage align``) continuing it; both are in
``benchmarks/results/langdc_synthetic_cpu.md`` and the last entries below.

Two stages (the paper's stages II and III with the VLM frozen; its stage I, cross-modal pretraining of
the projectors on CC-595K, has no counterpart: the captioner learns its input projector in stage II):

1. **Captions (semantic density-aware supervision).** The captioner (input projector + a small causal LM,
   built from scratch over the VLM's vocabulary unless ``--lm`` names a pretrained one) learns next-token
   prediction of the benchmark's ground-truth segment captions from the segment's pooled visual tokens.
   Their length follows content (``nothing happens .`` for a static segment, one sentence per event), so
   the captioner learns to stop early on static segments and to write more where more happens: the number
   of soft tokens becomes a function of the content.
2. **Alignment (post-projector, and VLM adapters).** Captioner frozen; the VLM's weights frozen; the
   post-projector is trained, through the real wrapped path (``tr.wrap(model, "langdc")``, base branch
   included unless ``--no-base``), so that the VLM answers the training questions from base + soft caption
   tokens: cross-entropy on the answer and EOS, plus (``--distill``) the KL divergence to the full-token
   VLM's answer distribution, which also teaches what the VLM would answer on questions it gets wrong and
   is a denser signal than one answer token. The soft tokens come from the captions the frozen captioner
   itself generates (``--align-captions generated``, default: the exposure it has at inference) or from
   the ground truth teacher-forced (``gt``, the paper's SFT). The paper fine-tunes the LLM with LoRA
   r=128; here ``--vlm-rank R`` trains rank-``R`` adapters on the LLM's projections with the
   post-projector. They are saved with the captioner and hooked into the LLM only while the model is
   wrapped, so the VLM's own weights never change (``--vlm-rank 0``: the post-projector alone).

The VLM's projected video tokens are computed once per video (frozen tower) and reused by both stages.
Validation videos (never the test split) give caption exact-match, the correlation of caption length with
content, and answer accuracy with full tokens, ``pool`` and ``langdc``. Everything goes to
``training_summary.json`` and into the captioner's config (``training``).

Every run behind the shipped captioner, with what it measured: ``research/RESULTS.md`` (in a checkout).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import get_cosine_schedule_with_warmup

import tokenreduce as tr
from tokenreduce.adapters import get_adapter
from tokenreduce.core.api import get_handle
from tokenreduce.core.layout import TokenLayout
from tokenreduce.core.lowrank import LLM_TARGETS, LowRankAdapters, llm_linear_layers
from tokenreduce.core.training import (
    TrainStep,
    atomic_directory,
    atomic_save,
    atomic_write_text,
    training_accelerator,
)
from tokenreduce.eval.synthetic.videos import VIDEO_CATEGORIES

from .captioner import Captioner, CaptionerConfig, count_parameters, default_hidden_layer
from .data import IGNORE, Question, VideoExample, build_examples
from .method import DIFFERENCES, LangDCConfig, LangDCMethod, segment_groups

# ----------------------------------------------------------------------------------------------------
# Stage 1: captions
# ----------------------------------------------------------------------------------------------------


def group_inputs(examples: Sequence[VideoExample], layout: TokenLayout, config: CaptionerConfig) -> torch.Tensor:
    """``[videos, segments, K, D]`` pooled captioner inputs of every video (float32)."""
    out = []
    for ex in examples:
        groups = segment_groups(ex.features.float(), layout, config.segment_frames, config.frame_tokens,
                                config.differences)
        out.append(torch.stack([g.visual for g in groups]))
    return torch.stack(out)


def _report(stage: str, entry: dict[str, float], accelerator) -> None:
    """Print a training log entry (main process only) as one JSON line."""
    if accelerator is None or accelerator.is_main_process:
        print(json.dumps({"stage": stage, **{k: round(v, 4) for k, v in entry.items()}}), flush=True)


def _warmup_cosine(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 5% of ``steps``, then cosine decay to zero (transformers' schedule)."""
    return get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)


def _prepared(trainable: nn.Module | dict[str, nn.Module], step, optimizer, accelerator):
    """The step module and optimizer, prepared by ``accelerator`` (DDP averages the gradients) when given."""
    module = TrainStep(trainable, step)
    return accelerator.prepare(module, optimizer) if accelerator is not None else (module, optimizer)


def train_captioner(captioner: Captioner, inputs: torch.Tensor, captions: Sequence[Sequence[list[int]]], *,
                    steps: int, batch_size: int, lr: float, seed: int = 0, accelerator=None,
                    log_every: int = 250) -> list[dict[str, float]]:
    """Next-token prediction of the segment captions (and EOS) from ``inputs`` ``[V, S, K, D]``."""
    segments = [(v, s) for v in range(inputs.shape[0]) for s in range(inputs.shape[1])]
    params = [*captioner.in_proj.parameters(), *captioner.lm.parameters()]
    for p in [*captioner.post_proj.parameters(), *captioner.vlm_adapters.parameters()]:
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = _warmup_cosine(optimizer, steps)
    step_module, optimizer = _prepared(captioner, captioner.teacher_force, optimizer, accelerator)
    gen = torch.Generator().manual_seed(seed)
    device = next(captioner.parameters()).device
    captioner.train()
    log, running = [], []
    for step in range(steps):
        pick = torch.randint(len(segments), (batch_size,), generator=gen).tolist()
        visual = torch.stack([inputs[segments[i][0], segments[i][1]] for i in pick]).to(device)
        targets = [captions[segments[i][0]][segments[i][1]] for i in pick]
        logits, labels, _ = step_module(visual, targets)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
        optimizer.zero_grad()
        (accelerator.backward(loss) if accelerator is not None else loss.backward())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step == steps - 1:
            log.append({"step": step + 1, "loss": sum(running) / len(running)})
            _report("caption", log[-1], accelerator)
            running = []
    for p in [*captioner.post_proj.parameters(), *captioner.vlm_adapters.parameters()]:
        p.requires_grad_(True)
    captioner.eval()
    return log


@torch.no_grad()
def generate_captions(captioner: Captioner, inputs: torch.Tensor, batch_size: int = 256) -> list[list[list[int]]]:
    """Greedy captions of every segment of every video: ``[video][segment] -> ids``."""
    videos, segments = inputs.shape[:2]
    flat = inputs.flatten(0, 1)
    device = next(captioner.parameters()).device
    ids: list[list[int]] = []
    for lo in range(0, flat.shape[0], batch_size):
        ids.extend(captioner.generate(flat[lo : lo + batch_size].to(device)).ids)
    return [ids[v * segments : (v + 1) * segments] for v in range(videos)]


def caption_metrics(predicted: Sequence[Sequence[list[int]]], examples: Sequence[VideoExample]) -> dict[str, float]:
    """Exact match of segment captions, mean lengths, and how caption length follows content."""
    pairs = [(p, ex.captions[s], ex.happenings[s]) for ex, pred in zip(examples, predicted) for s, p in enumerate(pred)]
    exact = sum(p == t for p, t, _ in pairs) / len(pairs)
    lengths = [float(len(p)) for p, _, _ in pairs]
    content = [float(h) for _, _, h in pairs]
    static = [n for n, h in zip(lengths, content) if h == 0]
    busy = [n for n, h in zip(lengths, content) if h > 0]
    return {
        "segments": len(pairs),
        "exact_match": exact,
        "mean_tokens": sum(lengths) / len(lengths),
        "mean_tokens_static": sum(static) / max(1, len(static)),
        "mean_tokens_busy": sum(busy) / max(1, len(busy)),
        "pearson_tokens_vs_events": pearson(lengths, content),
        "spearman_tokens_vs_events": spearman(lengths, content),
    }


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else 0.0


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of average ranks (ties share their mean rank)."""

    def ranks(values: Sequence[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    return pearson(ranks(x), ranks(y))


# ----------------------------------------------------------------------------------------------------
# Stage 2: alignment of the post-projector with the frozen VLM
# ----------------------------------------------------------------------------------------------------


def answer_batch(pairs: Sequence[tuple[VideoExample, Question]], layout: TokenLayout, pad_id: int,
                 device: torch.device | str = "cpu") -> dict[str, Any]:
    """Left-padded inputs for ``(video, question)`` pairs with the videos' cached tokens as precomputed
    encoder outputs. ``pixel_values_videos`` is a zero-stride stand-in carrying the video shape only: the
    adapter reads the layout from it, and tokenreduce drops it before the model runs."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    length = max(q.input_ids.numel() for _, q in pairs)
    ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(pairs), length), dtype=torch.long)
    for r, (_, q) in enumerate(pairs):
        n = q.input_ids.numel()
        ids[r, length - n :] = q.input_ids
        labels[r, length - n :] = q.labels
        mask[r, length - n :] = 1
    feats = torch.stack([ex.features for ex, _ in pairs]).to(device, torch.float32)
    frames = sum(1 for s in layout.segments if s.kind == "frame")
    height, width = layout.image_size or (1, 1)
    return {
        "input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
        "mm_encoder_outputs": {"video": BaseModelOutputWithPooling(pooler_output=feats)},
        "pixel_values_videos": torch.zeros((), device=device).expand(len(pairs), frames, 3, height, width),
    }


def _label_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits predicting the (trailing) labelled tokens of each left-padded row, flattened, and those labels."""
    rows, targets = [], []
    for r in range(labels.shape[0]):
        n = int((labels[r] != IGNORE).sum())
        length = logits.shape[1]
        rows.append(logits[r, length - n - 1 : length - 1])
        targets.append(labels[r, labels.shape[1] - n :])
    return torch.cat(rows), torch.cat(targets)


@torch.no_grad()
def teacher_log_probs(model, pairs: Sequence[tuple[VideoExample, Question]], layout: TokenLayout, pad_id: int,
                      batch_size: int = 16) -> list[torch.Tensor]:
    """The full-token VLM's log-probabilities at every labelled position, per pair (``[n_labels, V]``)."""
    device = next(model.parameters()).device
    out = []
    for lo in range(0, len(pairs), batch_size):
        chunk = pairs[lo : lo + batch_size]
        inputs = answer_batch(chunk, layout, pad_id, device)
        inputs.pop("pixel_values_videos")
        labels = inputs.pop("labels")
        logits = model(**inputs).logits
        flat, _ = _label_logits(logits, labels)
        counts = [int((labels[r] != IGNORE).sum()) for r in range(len(chunk))]
        out.extend(t.float().log_softmax(-1).cpu() for t in flat.split(counts))
    return out


def add_vlm_adapters(captioner: Captioner, language_model: nn.Module, rank: int, alpha: float = 16.0,
                     targets: tuple[str, ...] = LLM_TARGETS) -> None:
    """Give ``captioner`` fresh rank-``rank`` adapters for ``language_model``'s ``targets`` layers (the
    alignment stage trains them with the post-projector); rank 0 removes them."""
    config = captioner.config
    config.vlm_rank, config.vlm_alpha = int(rank), float(alpha)
    config.vlm_modules = llm_linear_layers(language_model, tuple(targets)) if rank else ()
    param = next(captioner.parameters())
    captioner.vlm_adapters = LowRankAdapters(config.vlm_modules, config.vlm_rank, config.vlm_alpha,
                                             owner="the LangDC captioner").to(param.device)


def train_alignment(model, method: LangDCMethod, pairs: Sequence[tuple[VideoExample, Question]],
                    captions: dict[str, list[list[int]]], layout: TokenLayout, pad_id: int, *, steps: int,
                    batch_size: int, lr: float, distill: float = 1.0, teacher: Sequence[torch.Tensor] | None = None,
                    seed: int = 0, accelerator=None, log_every: int = 100,
                    category_weights: dict[str, float] | None = None) -> list[dict[str, float]]:
    """Train ``method.captioner.post_proj`` (and its VLM adapters, if any) so that the frozen, wrapped
    ``model`` answers from the soft tokens.

    ``category_weights`` draws questions of a category that much more often (1 for any other).

    ``captions`` maps a video's sample id to the caption ids of its segments (teacher-forced through the
    frozen captioner); ``teacher`` gives the full-token log-probabilities for the KL term (``distill``)."""
    captioner = method.captioner
    for p in model.parameters():
        p.requires_grad_(False)
    for p in captioner.parameters():
        p.requires_grad_(False)
    params = [*captioner.post_proj.parameters(), *captioner.vlm_adapters.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = _warmup_cosine(optimizer, steps)

    def forward(inputs: dict[str, torch.Tensor], captions_: list[list[list[int]]]) -> torch.Tensor:
        with method.forced_captions(captions_):
            return model(**inputs).logits

    trainable = {"post_proj": captioner.post_proj, "vlm_adapters": captioner.vlm_adapters}
    step_module, optimizer = _prepared(trainable, forward, optimizer, accelerator)
    gen = torch.Generator().manual_seed(seed)
    weights = torch.tensor([float((category_weights or {}).get(q.category, 1.0)) for _, q in pairs])
    device = next(model.parameters()).device
    log, running = [], {"loss": [], "ce": [], "kl": [], "acc": []}
    for step in range(steps):
        pick = torch.multinomial(weights, batch_size, replacement=True, generator=gen).tolist()
        chunk = [pairs[i] for i in pick]
        inputs = answer_batch(chunk, layout, pad_id, device)
        labels = inputs["labels"]
        logits = step_module(inputs, [captions[ex.sample_id] for ex, _ in chunk])
        student, targets = _label_logits(logits, labels)
        ce = F.cross_entropy(student.float(), targets)
        loss = ce
        kl = torch.zeros((), device=device)
        if distill > 0 and teacher is not None:
            t = torch.cat([teacher[i] for i in pick]).to(device)
            kl = F.kl_div(student.float().log_softmax(-1), t, log_target=True, reduction="batchmean")
            loss = ce + distill * kl
        optimizer.zero_grad()
        (accelerator.backward(loss) if accelerator is not None else loss.backward())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        counts = (labels != IGNORE).sum(1)
        first = counts.cumsum(0) - counts  # each row's first labelled token: the answer
        acc = (student[first].argmax(-1) == targets[first]).float().mean()
        for key, value in (("loss", loss), ("ce", ce), ("kl", kl), ("acc", acc)):
            running[key].append(float(value.detach()))
        if (step + 1) % log_every == 0 or step == steps - 1:
            log.append({"step": step + 1, **{k: sum(v) / len(v) for k, v in running.items()}})
            _report("align", log[-1], accelerator)
            running = {k: [] for k in running}
    for p in params:
        p.requires_grad_(False)
    return log


@torch.no_grad()
def answer_accuracy(model, pairs: Sequence[tuple[VideoExample, Question]], layout: TokenLayout, pad_id: int,
                    batch_size: int = 16) -> dict[str, float]:
    """Accuracy of the first answer token (argmax at the position that predicts it), overall and per question
    category, and visual tokens."""
    device = next(model.parameters()).device
    hits, tokens = [], []
    handle = get_handle(model)
    for lo in range(0, len(pairs), batch_size):
        chunk = pairs[lo : lo + batch_size]
        inputs = answer_batch(chunk, layout, pad_id, device)
        labels = inputs.pop("labels")
        if handle is None:
            inputs.pop("pixel_values_videos")
        logits = model(**inputs).logits
        for r in range(len(chunk)):
            n = int((labels[r] != IGNORE).sum())
            pred = int(logits[r, logits.shape[1] - n - 1].argmax())
            hits.append(pred == int(labels[r, labels.shape[1] - n]))
        if handle is not None:
            tokens.extend(s.visual_tokens_out for s in tr.stats(model).last)
    out: dict[str, Any] = {"accuracy": sum(hits) / len(hits), "questions": len(hits)}
    categories: dict[str, list[bool]] = {}
    for (_, q), hit in zip(pairs, hits):
        categories.setdefault(q.category, []).append(hit)
    out["by_category"] = {c: round(sum(v) / len(v), 4) for c, v in sorted(categories.items())}
    if tokens:
        out["visual_tokens"] = sum(tokens) / len(tokens)
    return out


# ----------------------------------------------------------------------------------------------------
# The script
# ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local directory of the saved VLM and its processor")
    parser.add_argument("--out", required=True, help="directory the captioner is saved to")
    parser.add_argument("--train-videos", type=int, default=3000)
    parser.add_argument("--val-videos", type=int, default=200)
    parser.add_argument("--cache", default=None, help="file caching the VLM's video tokens (.pt) across runs")
    parser.add_argument("--lm", default=None, help="a pretrained causal LM (dir or hub id) instead of a new one")
    parser.add_argument("--lm-hidden", type=int, default=64)
    parser.add_argument("--lm-layers", type=int, default=3)
    parser.add_argument("--lm-heads", type=int, default=4)
    parser.add_argument("--hidden-layer", type=int, default=None, help="hidden_states index (default 2/3 depth)")
    parser.add_argument("--frame-tokens", type=int, default=9, help="captioner input tokens per frame (0: all)")
    parser.add_argument("--segment-frames", type=int, default=4)
    parser.add_argument("--differences", default="none", choices=DIFFERENCES,
                        help="captioner input tokens also carry their difference from the frame before (cell) and "
                             "those of the cells around them (neighbourhood)")
    parser.add_argument("--in-projector", default="linear", choices=("linear", "mlp2x_gelu"))
    parser.add_argument("--max-caption-tokens", type=int, default=32)
    parser.add_argument("--post-projector", default="mlp2x_gelu", choices=("linear", "mlp2x_gelu"))
    parser.add_argument("--caption-steps", type=int, default=3000)
    parser.add_argument("--caption-batch", type=int, default=64)
    parser.add_argument("--caption-lr", type=float, default=2e-3)
    parser.add_argument("--align-steps", type=int, default=1500)
    parser.add_argument("--align-batch", type=int, default=16)
    parser.add_argument("--align-lr", type=float, default=1e-3)
    parser.add_argument("--align-captions", default="generated", choices=("generated", "gt"))
    parser.add_argument("--vlm-rank", type=int, default=0,
                        help="rank of adapters on the VLM's LLM trained in alignment (0: the VLM as it is)")
    parser.add_argument("--vlm-alpha", type=float, default=16.0)
    parser.add_argument("--distill", type=float, default=1.0, help="weight of the KL to the full-token VLM")
    parser.add_argument("--category-weight", action="append", default=[], metavar="CATEGORY=W",
                        help="draw alignment questions of CATEGORY W times as often (e.g. change=3)")
    parser.add_argument("--base-keep", type=float, default=0.11, help="base branch share during alignment")
    parser.add_argument("--no-base", action="store_true", help="align without the base branch (captions only)")
    parser.add_argument("--stage", default="all", choices=("all", "caption", "align", "features"),
                        help="features: only build the --cache file (e.g. once before several runs share it)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _category_weights(items: Sequence[str]) -> dict[str, float]:
    """``["change=3"]`` -> ``{"change": 3.0}``, with clear errors."""
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if name not in VIDEO_CATEGORIES or weight <= 0:
            raise SystemExit(f"--category-weight must be CATEGORY=W with CATEGORY in {VIDEO_CATEGORIES} and W > 0, "
                             f"got {item!r}")
        out[name] = weight
    return out


def _examples(args, model, processor, accelerator) -> tuple[list[VideoExample], list[VideoExample], TokenLayout]:
    """Train (this process's shard) and validation examples, from ``--cache`` when it matches."""
    rank, world = accelerator.process_index, accelerator.num_processes
    cache = Path(args.cache) if args.cache else None
    key = {"model": str(Path(args.model).resolve()), "train": args.train_videos, "val": args.val_videos, "seed": args.seed}
    if cache is not None and cache.is_file():
        data = torch.load(cache, weights_only=False)
        if data.get("key") == key:
            return data["train"][rank::world], data["val"], data["layout"]
    train, layout = build_examples(model, processor, "train", 0, args.train_videos, extra_questions=True, seed=args.seed)
    val, _ = build_examples(model, processor, "validation", 0, args.val_videos, seed=args.seed)
    if cache is not None and accelerator.is_main_process:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({"key": key, "train": train, "val": val, "layout": layout}, cache)
    return train[rank::world], val, layout


def _save(captioner: Captioner, out_dir: Path) -> None:
    """Save the captioner into ``out_dir`` file by file through ``os.replace`` (never half-written)."""
    with atomic_directory(out_dir) as staging:
        captioner.save_pretrained(staging)


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - exercised through the script and tests
    args = parse_args(argv)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    accelerator = training_accelerator()
    device = accelerator.device
    started = time.time()
    timings: dict[str, float] = {}
    model = AutoModelForImageTextToText.from_pretrained(args.model).to(device).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    tokenizer = processor.tokenizer
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    vlm_hidden = int(model.config.get_text_config().hidden_size)

    t = time.time()
    train, val, layout = _examples(args, model, processor, accelerator)
    timings["features_s"] = time.time() - t
    if args.stage == "features":
        return 0
    out_dir = Path(args.out)

    # ----- stage 1 -----
    if args.stage in ("all", "caption"):
        if args.lm:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            lm = AutoModelForCausalLM.from_pretrained(args.lm)
            cap_tokenizer = AutoTokenizer.from_pretrained(args.lm)
        else:
            lm = dict(vocab_size=len(tokenizer), hidden_size=args.lm_hidden, intermediate_size=2 * args.lm_hidden,
                      num_hidden_layers=args.lm_layers, num_attention_heads=args.lm_heads,
                      num_key_value_heads=max(1, args.lm_heads // 2), max_position_embeddings=1024,
                      tie_word_embeddings=True, pad_token_id=pad_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
            cap_tokenizer = tokenizer
        layers = args.lm_layers if not args.lm else int(lm.config.num_hidden_layers)
        config = CaptionerConfig(
            vlm_hidden=vlm_hidden, eos_token_id=int(cap_tokenizer.eos_token_id),
            hidden_layer=args.hidden_layer if args.hidden_layer is not None else default_hidden_layer(layers),
            frame_tokens=args.frame_tokens or None, segment_frames=args.segment_frames,
            differences=args.differences, in_projector=args.in_projector,
            max_caption_tokens=args.max_caption_tokens,
            prompt_ids=(cap_tokenizer.bos_token_id,) if cap_tokenizer.bos_token_id is not None else (),
            post_projector=args.post_projector, vlm=Path(args.model).name,
        )
        captioner = Captioner.build(config, lm, cap_tokenizer, seed=args.seed).to(device)

        def retokenize(examples):
            if cap_tokenizer is tokenizer:
                return [ex.captions for ex in examples]
            return [[cap_tokenizer(c, add_special_tokens=False)["input_ids"] for c in ex.caption_texts] for ex in examples]

        inputs = group_inputs(train, layout, config)
        t = time.time()
        log1 = train_captioner(captioner, inputs, retokenize(train), steps=args.caption_steps,
                               batch_size=args.caption_batch, lr=args.caption_lr, seed=args.seed,
                               accelerator=accelerator)
        timings["caption_train_s"] = time.time() - t
        if accelerator.is_main_process:
            _save(captioner, out_dir)
    else:
        captioner = Captioner.from_pretrained(out_dir).to(device)
        log1 = []
    previous = dict(captioner.config.training) if args.stage == "align" else None
    summary: dict[str, Any] = {"args": vars(args), "captioner_parameters": count_parameters(captioner.lm)
                               + count_parameters(captioner.in_proj), "post_projector_parameters":
                               count_parameters(captioner.post_proj), "caption_log": log1}
    config = captioner.config
    val_inputs = group_inputs(val, layout, config)
    t = time.time()
    val_captions = generate_captions(captioner, val_inputs)
    summary["validation_captions"] = caption_metrics(val_captions, val)
    timings["caption_eval_s"] = time.time() - t
    if accelerator.is_main_process:
        print(json.dumps({"stage": "caption", **summary["validation_captions"]}), flush=True)

    # ----- stage 2 -----
    if args.stage in ("all", "align"):
        add_vlm_adapters(captioner, get_adapter(model).language_model, args.vlm_rank, args.vlm_alpha)
        _save(captioner, out_dir) if accelerator.is_main_process else None
        accelerator.wait_for_everyone()
        method_config = LangDCConfig(captioner=str(out_dir), base=not args.no_base, base_keep=args.base_keep)
        pairs = [(ex, q) for ex in train for q in ex.questions]
        t = time.time()
        if args.align_captions == "generated":
            generated = generate_captions(captioner, group_inputs(train, layout, config))
            captions = {ex.sample_id: caps for ex, caps in zip(train, generated)}
        else:
            captions = {ex.sample_id: ex.captions for ex in train}
        teacher = teacher_log_probs(model, pairs, layout, pad_id) if args.distill > 0 else None
        timings["align_setup_s"] = time.time() - t
        tr.wrap(model, method_config)
        try:
            method = get_handle(model).method
            method.set_captioner(captioner)
            t = time.time()
            summary["align_log"] = train_alignment(
                model, method, pairs, captions, layout, pad_id, steps=args.align_steps, batch_size=args.align_batch,
                lr=args.align_lr, distill=args.distill, teacher=teacher, seed=args.seed, accelerator=accelerator,
                category_weights=_category_weights(args.category_weight),
            )
            timings["align_train_s"] = time.time() - t
        finally:
            tr.unwrap(model)

    # ----- validation answers: full tokens, pool and langdc at the same base share -----
    if accelerator.is_main_process:
        t = time.time()
        val_pairs = [(ex, q) for ex in val for q in ex.questions]
        results = {"full": answer_accuracy(model, val_pairs, layout, pad_id)}
        cfg = LangDCConfig(captioner=str(out_dir), base=not args.no_base, base_keep=args.base_keep)
        _save(captioner, out_dir)
        tr.wrap(model, cfg)
        try:
            get_handle(model).method.set_captioner(captioner)
            results["langdc"] = answer_accuracy(model, val_pairs, layout, pad_id)
        finally:
            tr.unwrap(model)
        keep = max(1, round(results["langdc"]["visual_tokens"]))
        tr.wrap(model, "pool", keep=keep)
        try:
            results["pool_same_tokens"] = answer_accuracy(model, val_pairs, layout, pad_id)
        finally:
            tr.unwrap(model)
        timings["answer_eval_s"] = time.time() - t
        summary["validation_answers"] = results
        timings["total_s"] = time.time() - started
        summary["timings"] = timings
        trained = {"caption": args.stage in ("all", "caption"), "align": args.stage in ("all", "align")}
        captioner.config.training = {
            "stage": args.stage,
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "validation_captions": summary["validation_captions"],
            "validation_answers": results,
            "train_videos": args.train_videos,
            **({"caption_steps": args.caption_steps} if trained["caption"] else {}),
            **({"align_steps": args.align_steps, "align_lr": args.align_lr, "align_captions": args.align_captions,
                "distill": args.distill, "vlm_rank": args.vlm_rank, "category_weights":
                _category_weights(args.category_weight)} if trained["align"] else {}),
            "base_keep": args.base_keep, "base": not args.no_base,
            **({"continued_from": previous} if previous else {}),
        }
        _save(captioner, out_dir)
        atomic_write_text(out_dir / "training_summary.json", json.dumps(summary, indent=2, default=str) + "\n")
        print(json.dumps({"stage": "answers", **results, "timings_s": timings}), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
