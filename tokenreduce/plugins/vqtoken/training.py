"""Training VQ-attention on video question answering, with the VLM's weights frozen.

The model is wrapped with ``vqtoken`` exactly as at inference (same clustering, same code order, same
positions). Only the VQ-attention module being trained is plugged in, so the LLM reads the module's code
tokens and gradients reach the module through the LLM. With ``--llm-rank R`` the module also carries
rank-``R`` adapters on the LLM's projections, trained with it and hooked in only while the model is
wrapped. The paper tunes the whole model, so there a checkpoint is a whole model. Here it is a small module
that ``tr.wrap(model, "vqtoken", attention=...)`` plugs into the unchanged model.

Loss, per answer token (the answer words and EOS ending each row):

* next-token cross-entropy on the answer;
* with ``distill > 0``, plus ``distill * KL(teacher || student)``. The teacher is the same frozen model
  reading the full, unreduced video, which tells the module what the LLM expects, not only which word is
  right. This is ours; the paper trains on the answers only;
* with ``hidden_distill > 0``, plus ``hidden_distill`` x the squared error of every decoder layer's
  output at those positions, relative to the teacher's (ours too): the full-token model's answer position
  has already gathered what the video says about the question, which is a denser target than the logits.
  The text after the video is the same in both sequences, so right-aligned positions correspond.

To save time the frozen vision tower runs once per batch. Its output is cached and passed back as
``mm_encoder_outputs``, next to a zero-stride stand-in for the pixels that carries the shapes the layouts
are read from. The teacher's answer logits (and hidden states) are cached the same way.

    python -m tokenreduce.plugins.vqtoken.training --model assets/models/synthetic-onevision-video \\
        --out runs/vqattn --keep 5 --samples 12000 --steps 10000 --llm-rank 8 --bins 16 6 6 --own-hash \\
        --rms-residual --moments --trajectory 8 --changes --blocks 1 --hidden-distill 1.0

Several processes: ``accelerate launch -m tokenreduce.plugins.vqtoken.training ...``. Each process takes
every ``world``-th batch; the DDP wrapper accelerate puts around the trained module averages the gradients
during ``backward``.

Every run behind the shipped module, with what it measured: ``research/RESULTS.md`` (in a checkout).
"""

from __future__ import annotations

import argparse
import itertools
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import get_cosine_schedule_with_warmup
from transformers.modeling_outputs import BaseModelOutputWithPooling

import tokenreduce as tr
from tokenreduce.adapters import get_adapter
from tokenreduce.adapters.base import PIXEL_KEYS
from tokenreduce.core.api import get_handle
from tokenreduce.core.lowrank import LLM_TARGETS, llm_linear_layers
from tokenreduce.core.training import TrainStep, atomic_directory, training_accelerator
from tokenreduce.eval.predict import predict
from tokenreduce.eval.synthetic import load_model, load_synthetic
from tokenreduce.eval.synthetic.benchmark import iter_synthetic
from tokenreduce.eval.synthetic.prompting import exact_match, prompt

from .attention import VQAttention, VQAttentionConfig


@dataclass
class CachedBatch:
    """One training batch with its frozen-tower features and the teacher's answer logits cached."""

    inputs: dict[str, Any]
    answer_lengths: torch.Tensor  # [B] labelled tokens at the end of each row (answer words + EOS)
    teacher: torch.Tensor | None  # [B, max_len, V] log-probabilities (right-aligned, NaN where unused)
    teacher_hidden: torch.Tensor | None = None  # [B, layers, max_len, D] hidden states at those positions


def answer_lengths(labels: torch.Tensor) -> torch.Tensor:
    """Per row, the number of labelled tokens, which must be the row's last tokens (left padding)."""
    valid = labels != -100
    lengths = valid.sum(1)
    for r in range(labels.shape[0]):
        n = int(lengths[r])
        if n == 0 or not bool(valid[r, labels.shape[1] - n :].all()):
            raise ValueError(
                f"row {r}: the labelled tokens must be the last tokens of the row (the answer after a "
                "left-padded "
                "prompt); got labels elsewhere or none"
            )
    return lengths


def _cache_pixels(model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` with every modality's encoder output precomputed and its pixels replaced by a zero-stride
    tensor of the same shape (the layouts read shapes only; the handle drops pixel inputs anyway)."""
    adapter = get_adapter(model)
    out = dict(inputs)
    cached = {}
    for m in adapter.modalities:
        if not adapter.has_pixels(m, inputs):
            continue
        with torch.no_grad():
            feats = adapter.encode(m, inputs)
        cached[m] = BaseModelOutputWithPooling(pooler_output=[f.detach() for f in feats])
        for key in PIXEL_KEYS[m]:
            value = inputs.get(key)
            if torch.is_tensor(value):
                out[key] = torch.zeros((), dtype=value.dtype, device=value.device).expand(value.shape)
    if cached:
        out["mm_encoder_outputs"] = cached
    return out


def _answer_log_probs(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``[B, max_len, V]`` log-probabilities of the positions that predict each row's labelled tokens."""
    most = int(lengths.max())
    logp = F.log_softmax(logits[:, -most - 1 : -1].float(), dim=-1)
    return logp


def _answer_hidden(hidden_states: Sequence[torch.Tensor], most: int) -> torch.Tensor:
    """``[B, layers, most, D]``: every decoder layer's output at the positions predicting the answer."""
    return torch.stack([h[:, -most - 1 : -1] for h in hidden_states[1:]], 1)


def prepare_batches(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    distill: bool,
    device: torch.device | None = None,
    hidden: bool = False,
) -> list[CachedBatch]:
    """Cache the tower features (and, for distillation, the full-token teacher's answer log-probabilities;
    with ``hidden``, also its hidden states at those positions).

    ``batches`` is consumed one at a time and each batch's pixels are dropped once encoded, so a generator
    keeps only the cached features in memory (4000 videos as float pixels would take 22 GB).
    """
    out = []
    handle = get_handle(model)
    for batch in batches:
        batch = {
            k: (v.to(device) if device is not None and torch.is_tensor(v) else v) for k, v in batch.items()
        }
        labels = batch.pop("labels")
        lengths = answer_lengths(labels)
        teacher = teacher_hidden = None
        if distill or hidden:
            ctx = tr.disabled(model) if handle is not None else _null()
            most = int(lengths.max())
            with torch.no_grad(), ctx:
                output = model(**batch, logits_to_keep=most + 1, output_hidden_states=hidden)
            teacher = _answer_log_probs(output.logits, lengths).cpu() if distill else None
            teacher_hidden = _answer_hidden(output.hidden_states, most).cpu() if hidden else None
        out.append(CachedBatch(_cache_pixels(model, batch), lengths, teacher, teacher_hidden))
    return out


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def batch_loss(
    model: nn.Module, batch: CachedBatch, distill: float, hidden_distill: float = 0.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Answer cross-entropy (+ ``distill`` x KL to the teacher, + ``hidden_distill`` x the relative squared
    error of every layer's hidden state at the answer positions) of the wrapped model on one cached batch."""
    lengths = batch.answer_lengths
    most = int(lengths.max())
    ids = batch.inputs["input_ids"]
    hidden = hidden_distill > 0 and batch.teacher_hidden is not None
    output = model(**batch.inputs, logits_to_keep=most + 1, output_hidden_states=hidden)
    logp = _answer_log_probs(output.logits, lengths)  # [B, most, V]
    targets = ids[:, -most:]
    positions = torch.arange(most, device=ids.device)[None]
    mask = positions >= (most - lengths.to(ids.device))[:, None]  # right-aligned answer tokens
    nll = -logp.gather(-1, targets[..., None]).squeeze(-1)
    ce = nll[mask].mean()
    stats = {"ce": float(ce.detach())}
    loss = ce
    if distill > 0 and batch.teacher is not None:
        teacher = batch.teacher.to(logp.device)
        kl = (teacher.exp() * (teacher - logp)).sum(-1)
        kl = kl[mask].mean()
        loss = loss + distill * kl
        stats["kl"] = float(kl.detach())
    if hidden:
        target = batch.teacher_hidden.to(logp.device)  # [B, layers, most, D]
        student = _answer_hidden(output.hidden_states, most).float()
        err = (student - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-6)  # [B, layers, most]
        rel = err.transpose(1, 2)[mask].mean()
        loss = loss + hidden_distill * rel
        stats["hidden"] = float(rel.detach())
    # share of answer tokens predicted right (greedy), a training-time accuracy proxy
    stats["token_acc"] = float((logp.argmax(-1) == targets)[mask].float().mean())
    return loss, stats


def train_attention(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    *,
    steps: int,
    keep: int | float | Sequence[int | float] = 5,
    method_options: dict[str, Any] | None = None,
    module: VQAttention | None = None,
    module_options: dict[str, Any] | None = None,
    lr: float = 1e-3,
    llm_lr: float | None = None,
    weight_decay: float = 0.01,
    warmup: int = 50,
    distill: float = 1.0,
    hidden_distill: float = 0.0,
    accelerator: Any = None,
    seed: int = 0,
    log_every: int = 25,
    evaluate: Callable[[VQAttention], dict[str, float]] | None = None,
    eval_every: int = 0,
    log: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[VQAttention, list[dict[str, Any]]]:
    """Train VQ-attention on ``batches`` (model inputs with ``labels`` on the answer) for ``steps`` steps.

    ``batches`` may be a generator: it is read once, and each batch is reduced to its cached features.

    ``llm_lr``: learning rate of the module's LLM adapters (default ``lr``). Both follow ``warmup`` steps of
    linear warm-up, then a cosine decay to 0 (transformers' ``get_cosine_schedule_with_warmup``).
    ``keep``: the fixed code count(s) to train at; with several, each step draws one, so the module serves
    several budgets. ``method_options``: further ``vqtoken`` options (``anchor``, ``codeword``...), the same
    ones inference must use. ``evaluate(module)``: called every ``eval_every`` steps and at the end; its
    numbers go into the log. Returns the trained module (eval mode, on the CPU) and the log.
    """
    if steps < 1:
        raise ValueError(f"`steps` must be >= 1, got {steps!r}")
    keeps = list(keep) if isinstance(keep, (list, tuple)) else [keep]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    adapter = get_adapter(model)
    width = int(adapter.text_config.hidden_size)
    if module is None:
        options = dict(module_options or {})
        targets = options.pop("llm_targets", LLM_TARGETS)
        if options.get("llm_rank", 0) and "llm_modules" not in options:
            options["llm_modules"] = llm_linear_layers(adapter.language_model, tuple(targets))
        module = VQAttention(VQAttentionConfig(dim=width, **options))
    device = next(model.parameters()).device if accelerator is None else accelerator.device
    model.to(device)
    module.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    cached = prepare_batches(
        model,
        (b for i, b in enumerate(batches) if i % world == rank),
        distill > 0,
        device,
        hidden_distill > 0,
    )
    if not cached:
        raise ValueError(f"`batches` holds no batch for process {rank} of {world}")
    params = [p for p in module.parameters() if p.requires_grad]
    adapters = {id(p) for p in module.llm.parameters()}
    groups = [
        {"params": [p for p in params if id(p) not in adapters], "lr": lr},
        {"params": [p for p in params if id(p) in adapters], "lr": llm_lr or lr},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    # gradients are averaged over processes by the DDP wrapper accelerate puts around the step module
    step_module = TrainStep(module, lambda batch: batch_loss(model, batch, distill, hidden_distill))
    if accelerator is not None:
        step_module, optimizer = accelerator.prepare(step_module, optimizer)
    options = {k: v for k, v in (method_options or {}).items() if k != "keep"}
    tr.wrap(model, "vqtoken", keep=keeps[0], **options)
    method = get_handle(model).method
    method.set_attention(module)
    history: list[dict[str, Any]] = []
    order: list[int] = []
    start = time.perf_counter()
    try:
        for step in range(steps):
            if not order:
                order = list(range(len(cached)))
                rng.shuffle(order)
            batch = cached[order.pop()]
            method.config.keep = keeps[rng.randrange(len(keeps))] if len(keeps) > 1 else keeps[0]
            current_lr = schedule.get_last_lr()[0]
            module.train()
            loss, stats = step_module(batch)
            optimizer.zero_grad(set_to_none=True)
            (accelerator.backward(loss) if accelerator is not None else loss.backward())
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            last = step == steps - 1
            if step % log_every == 0 or last:
                row = {
                    "step": step,
                    "loss": float(loss.detach()),
                    **stats,
                    "lr": current_lr,
                    "elapsed_s": round(time.perf_counter() - start, 1),
                }
                if evaluate is not None and eval_every and (step % eval_every == 0 or last) and step > 0:
                    module.eval()
                    with torch.no_grad():
                        row.update(evaluate(module))
                history.append(row)
                if log is not None:
                    log(row)
    finally:
        tr.unwrap(model)
    module.eval()
    return module.cpu(), history


# ----------------------------------------------------------------------------------------------------
# The synthetic video benchmark
# ----------------------------------------------------------------------------------------------------


def synthetic_answer_batches(processor, samples: Iterable[Any], batch_size: int) -> Iterator[dict[str, Any]]:
    """Left-padded inputs ``"<question> <video> answer : <answer>" + EOS``, labels on the answer and EOS.

    A generator over ``samples`` (itself possibly a generator), one batch of ``batch_size`` at a time.
    """
    tokenizer = processor.tokenizer
    eos = tokenizer.eos_token_id
    samples = iter(samples)
    while chunk := list(itertools.islice(samples, batch_size)):
        texts = [f"{prompt(s)} {s.answer}" for s in chunk]
        enc = dict(
            processor(
                text=texts,
                videos=[s.video for s in chunk],
                padding=True,
                padding_side="left",
                return_tensors="pt",
            )
        )
        ids, mask = enc["input_ids"], enc["attention_mask"]
        b = ids.shape[0]
        enc["input_ids"] = torch.cat([ids, torch.full((b, 1), eos, dtype=ids.dtype)], 1)
        enc["attention_mask"] = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype)], 1)
        labels = torch.full_like(enc["input_ids"], -100)
        for r, s in enumerate(chunk):
            n = len(tokenizer(s.answer, add_special_tokens=False)["input_ids"]) + 1
            labels[r, -n:] = enc["input_ids"][r, -n:]
        enc["labels"] = labels
        yield enc


def synthetic_accuracy(
    model,
    processor,
    samples: Sequence[Any],
    module: VQAttention | None,
    method_options: dict[str, Any],
    batch_size: int = 16,
) -> dict[str, float]:
    """Exact-match accuracy of ``vqtoken`` (with ``module``) on ``samples`` (greedy generation):
    ``{"all": ..., <category>: ...}``, categories from ``sample.meta["category"]`` where present."""
    handle = get_handle(model)
    was_wrapped = handle is not None
    if was_wrapped:
        saved = handle.method.attention, handle.method.config.keep
        handle.method.set_attention(module)
        handle.method.config.keep = method_options.get("keep", handle.method.config.keep)
    else:
        tr.wrap(model, "vqtoken", **method_options)
        get_handle(model).method.set_attention(module)
    try:
        predictions = predict(model, processor, samples, batch_size=batch_size, max_new_tokens=3)
    finally:
        if was_wrapped:
            handle.method.set_attention(saved[0])
            handle.method.config.keep = saved[1]
        else:
            tr.unwrap(model)
    scores: dict[str, list[bool]] = {"all": []}
    for p, s in zip(predictions, samples):
        hit = exact_match(p, s.answer)
        scores["all"].append(hit)
        category = (s.meta or {}).get("category")
        if category is not None:
            scores.setdefault(str(category), []).append(hit)
    return {name: round(sum(hits) / max(1, len(hits)), 4) for name, hits in scores.items()}


def _parse_keep(values: list[str]) -> list[int | float]:
    out: list[int | float] = []
    for v in values:
        out.append(float(v) if "." in v else int(v))
    return out


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - exercised through the CLI
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="saved video VLM (default: the shipped synthetic video model)"
    )
    parser.add_argument("--out", required=True, help="directory for vq_attention.safetensors / .json")
    parser.add_argument(
        "--keep", nargs="+", default=["5"], help="code count(s) (int) or fraction(s) to train at"
    )
    parser.add_argument("--samples", type=int, default=4000, help="training samples from the train split")
    parser.add_argument("--val-samples", type=int, default=200, help="validation samples for the eval log")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--distill", type=float, default=1.0)
    parser.add_argument(
        "--hidden-distill", type=float, default=0.0, help="weight of matching the teacher's hidden states"
    )
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--bins", type=int, nargs=3, default=[8, 4, 4])
    parser.add_argument("--no-ffn", action="store_true")
    parser.add_argument("--own-hash", action="store_true", help="each code also adds its own hash embedding")
    parser.add_argument("--rms-residual", action="store_true", help="updates in units of each code's RMS")
    parser.add_argument(
        "--moments", action="store_true", help="the hash MLP also reads mass and centroid per time bin"
    )
    parser.add_argument(
        "--trajectory", type=int, default=0, help="time bins of each code's member means the module reads"
    )
    parser.add_argument("--trajectory-dim", type=int, default=16)
    parser.add_argument(
        "--changes", action="store_true", help="the module also reads each code's change per trajectory bin"
    )
    parser.add_argument("--blocks", type=int, default=0, help="further self-attention blocks among the codes")
    parser.add_argument(
        "--llm-rank", type=int, default=0, help="rank of LLM adapters trained with the module (0: LLM as is)"
    )
    parser.add_argument("--llm-alpha", type=float, default=16.0)
    parser.add_argument("--llm-lr", type=float, default=None, help="adapters' learning rate (default --lr)")
    parser.add_argument("--anchor", default="first")
    parser.add_argument("--codeword", default="mean")
    parser.add_argument("--keep-newline", action="store_true")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = training_accelerator()
    if args.model:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(args.model)
        processor = AutoProcessor.from_pretrained(args.model)
    else:
        model, processor = load_model("video")
    model.eval()
    keeps = _parse_keep(args.keep)
    options = {"anchor": args.anchor, "codeword": args.codeword, "keep_newline": args.keep_newline}
    val = load_synthetic("video", "validation", n=args.val_samples) if args.val_samples else []
    # generated and encoded batch by batch: only the tower features stay in memory
    batches = synthetic_answer_batches(
        processor, iter_synthetic("video", "train", 0, args.samples), args.batch_size
    )

    def evaluate(module: VQAttention) -> dict[str, float]:
        if not val or not accelerator.is_main_process:
            return {}
        out = {}
        for k in keeps:
            acc = synthetic_accuracy(model, processor, val, module, {**options, "keep": k})
            out[f"val_acc@{k}"] = acc.pop("all")
            out.update({f"val_{name}@{k}": value for name, value in acc.items()})
        return out

    module, history = train_attention(
        model,
        batches,
        steps=args.steps,
        keep=keeps,
        method_options=options,
        module_options={
            "heads": args.heads,
            "hidden": args.hidden,
            "bins": tuple(args.bins),
            "ffn": not args.no_ffn,
            "own_hash": args.own_hash,
            "rms_residual": args.rms_residual,
            "moments": args.moments,
            "trajectory": args.trajectory,
            "trajectory_dim": args.trajectory_dim,
            "changes": args.changes,
            "blocks": args.blocks,
            "llm_rank": args.llm_rank,
            "llm_alpha": args.llm_alpha,
        },
        lr=args.lr,
        llm_lr=args.llm_lr,
        warmup=args.warmup,
        distill=args.distill,
        hidden_distill=args.hidden_distill,
        accelerator=accelerator,
        seed=args.seed,
        evaluate=evaluate,
        eval_every=args.eval_every,
        log=(lambda row: print(row, flush=True)) if accelerator.is_main_process else None,
    )
    if accelerator.is_main_process:
        with atomic_directory(args.out) as staging:
            module.save_pretrained(
                staging,
                model=args.model or "synthetic-onevision-video",
                keep=keeps,
                method_options=options,
                samples=args.samples,
                steps=args.steps,
                lr=args.lr,
                llm_lr=args.llm_lr,
                llm_rank=args.llm_rank,
                distill=args.distill,
                hidden_distill=args.hidden_distill,
                seed=args.seed,
                final=history[-1] if history else None,
            )
        print(f"saved to {args.out}", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
