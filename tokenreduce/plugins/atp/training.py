"""Training ATP's threshold heads (and optionally the LLM) with soft masks through attention.

During training no token is dropped: at each ATP layer K the heads predict the instance's thresholds,
each visual token gets a soft keep mask ``M = max(sigmoid((S_red - theta_r) T), sigmoid((S_sp - theta_s) T))``
(the spatial term only on the SAP grid), masks multiply across stages, and every layer >= K sees them
through attention: key ``j`` gets the additive bias ``log M_j`` (its own query excepted), which is
DynamicViT's "scale the attention column and renormalise". The loss is next-token prediction on the answer
plus the budget terms ``lambda_depth * sum_i (K_i / L) * kept_i + lambda_target * |average kept - target|``
(kept as a share of the visual tokens, the average over all L layers). Scores are read without gradient;
gradients reach the thresholds through the masks (and the LLM, when it is trained, through attention).

    python -m tokenreduce.plugins.atp.training --model assets/models/synthetic-llava-image --out runs/atp-heads \
        --target 0.25 --steps 300 --layers 1 2 4 --spatial-rates 0.1 0.05 0.0

The batches are the task's train split with the answer and EOS appended
(:func:`tokenreduce.eval.training_data.answer_batches`). ATP's default stages and spatial rates cannot
average 25% of the visual tokens over a 6-layer LLM (the shipped synthetic models), hence the explicit
``--layers`` / ``--spatial-rates`` above. The heads are saved with their layers and spatial rates, so
``tr.wrap(model, "atp", heads="runs/atp-heads")`` prunes where they were trained.

Soft masks overstate what the hard thresholds keep at inference (tokens near a threshold count partly):
on the synthetic image model, ``--temperature 25 --target-weight 5 --target 0.287`` gave a soft average of
about 0.29 and 0.249 of the visual tokens kept at inference; at the default temperature 10 and target 0.25
inference kept 0.22. Measure the kept share (``benchmarks/atp_synthetic.py`` does) before comparing.

The recipe recorded in ``benchmarks/results/atp_synthetic_cpu.md`` (98.7% of full accuracy at 25.0% of the
tokens on the whole synthetic image test split) prunes at layers 1 and 2 without SAP, scores with
``--cross all_text --score-layer current``, pins the stage profile with ``--stage-targets 0.2 0.12``
(``--target 0.28 --depth-weight 0``) and tunes the LLM with the heads at ``--llm-lr 3e-5`` on 2048 samples
(its full-token accuracy stayed at 0.902; at 3e-4 with the paper's scoring an earlier model lost 13 points).
The same heads without the LLM: 97.5%. Without stage targets the heads kept 98 tokens at layer 1 and 9 at
layer 2 (0.879 at 25.1%); the soft masks overstate the second stage most (a soft 0.14 kept 0.093 hard).

Multi-process: ``accelerate launch -m tokenreduce.plugins.atp.training ...``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from tokenreduce.adapters import get_adapter
from tokenreduce.core.handle import VisualItem
from tokenreduce.core.layout import TokenLayout
from tokenreduce.core.llm import AttentionCapture, LLMContext
from tokenreduce.core.training import atomic_directory, training_accelerator
from tokenreduce.eval.tasks import get_task
from tokenreduce.eval.training_data import answer_batches

from .heads import ThresholdHeads
from .method import ATPConfig, default_layers
from .scores import CROSS, SCORE_LAYERS, redundancy_scores, spatial_sample


@dataclass
class SoftMaskState:
    """Per forward: visual columns, the running soft mask, the per-stage kept shares."""

    visual: list[torch.Tensor]
    tokens: list[torch.Tensor]
    items: list[VisualItem]
    mask2d: torch.Tensor
    running: torch.Tensor | None = None  # [B, L] soft keep of every column (1 for text)
    kept: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B] kept share of visual tokens


class SoftMaskATP(nn.Module):
    """Wraps a VLM for training: the forward applies ATP soft masks at the configured layers."""

    def __init__(self, model: nn.Module, config: ATPConfig, heads: ThresholdHeads | None = None,
                 temperature: float = 10.0):
        super().__init__()
        self.model = model
        self.config = config
        self.adapter = get_adapter(model)
        layers = self.adapter.decoder_layers
        self.layers = list(config.layers or default_layers(len(layers)))
        self.heads = heads if heads is not None else ThresholdHeads(
            self.layers, spatial_rates=config.spatial_rates, spatial_score_scale=config.spatial_score_scale,
            cross=config.cross, self_weight=config.self_weight, score_layer=config.score_layer)
        self.temperature = temperature
        self.state: SoftMaskState | None = None
        self._captures: dict[int, AttentionCapture] = {}
        self._hooks = []
        lm = self.adapter.language_model
        for k in self.layers:
            self._hooks.append(layers[k - 1].self_attn.register_forward_hook(self._capture(k), with_kwargs=True))
        for i in range(self.layers[0], len(layers)):
            self._hooks.append(layers[i].register_forward_pre_hook(self._mask_layer(i), with_kwargs=True))
        self._lm = lm

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # ----- hooks ---------------------------------------------------------------------------------------
    def _capture(self, k: int):
        def hook(module, args, kwargs, output):
            if self.state is None:
                return None
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            b = hidden.shape[0]
            self._captures[k] = AttentionCapture(module, hidden.detach(), cos.expand(b, -1, -1), sin.expand(b, -1, -1))
            return None

        return hook

    def _mask_layer(self, i: int):
        def hook(module, args, kwargs):
            state = self.state
            if state is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if i in self.layers:
                self._update_masks(i, hidden)
            kwargs["attention_mask"] = self._attention_bias(hidden, state)
            return args, kwargs

        return hook

    def _update_masks(self, k: int, hidden: torch.Tensor) -> None:
        state = self.state
        capture = self._captures.pop(k)
        b, length = state.mask2d.shape
        ctx = LLMContext(
            layer=k, hidden=hidden.detach(), attention_mask=state.mask2d, visual=state.visual,
            visual_tokens=state.tokens, text=_text_columns(state), items=state.items,
            original_visual=[v.numel() for v in state.visual], capture=capture,
            layer_module=self.adapter.decoder_layers[k],
        )
        stage = self.layers.index(k)
        rate = self.config.spatial_rates[stage]
        with torch.no_grad():
            if self.config.score_layer == "current":
                ctx = ctx.at_current_layer()
            scores, features = redundancy_scores(ctx, self.config.self_weight, self.config.cross)
        theta_r, theta_s = self.heads(k, features)
        if state.running is None:
            state.running = torch.ones(b, length, device=capture.hidden.device)
        running = state.running.clone()
        kept = []
        for r, cols in enumerate(state.visual):
            if cols.numel() == 0:
                kept.append(running.new_ones(()))
                continue
            m_r = torch.sigmoid((scores[r].float() - theta_r[r]) * self.temperature)
            sampled = spatial_sample(ctx, r, rate).float()
            spatial_score = 1.0 - rate * self.config.spatial_score_scale
            m_s = torch.sigmoid((spatial_score - theta_s[r]) * self.temperature) * sampled
            m = torch.maximum(m_r, m_s)
            running[r, cols] = running[r, cols] * m
            kept.append(running[r, cols].mean())
        state.running = running
        state.kept[k] = torch.stack(kept)

    def _attention_bias(self, hidden: torch.Tensor, state: SoftMaskState) -> torch.Tensor:
        b, q = hidden.shape[:2]
        length = state.mask2d.shape[1]
        dtype = hidden.dtype
        allowed = torch.ones(q, length, dtype=torch.bool, device=hidden.device).tril()[None] & state.mask2d.bool()[:, None, :]
        bias = torch.zeros(b, q, length, dtype=dtype, device=hidden.device).masked_fill(~allowed, torch.finfo(dtype).min)
        if state.running is not None:
            log_keep = torch.log(state.running.clamp_min(1e-6)).to(dtype)[:, None, :].expand(b, q, length).clone()
            log_keep.diagonal(dim1=1, dim2=2).zero_()
            bias = bias + log_keep.masked_fill(~allowed, 0.0)
        return bias[:, None]

    # ----- forward -------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Model outputs (with the NTP loss when ``labels`` are given) and, per ATP layer, ``[B]`` kept shares."""
        self.state = _state_for(self.adapter, batch)
        try:
            out = self.model(**batch)
            return out, dict(self.state.kept)
        finally:
            self.state = None
            self._captures.clear()


def budget_loss(kept: dict[int, torch.Tensor], num_layers: int, target: float,
                depth_weight: float, target_weight: float,
                stage_targets: tuple[float, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ATP's budget terms and the layer-averaged kept share ``[B]`` they are computed from.

    With ``stage_targets`` (ours), the batch-mean share kept after each stage is pulled toward its own target
    (same weight as the average's): the heads then vary the counts per instance around that profile
    instead of choosing the profile from soft masks, which overstate what hard pruning keeps.
    """
    layers = sorted(kept)
    total = torch.zeros_like(kept[layers[0]])
    previous, share = 0, torch.ones_like(total)
    depth_term = torch.zeros_like(total)
    for k in layers:
        total = total + (k - previous) * share
        previous, share = k, kept[k]
        depth_term = depth_term + (k / num_layers) * kept[k]
    total = total + (num_layers - previous) * share
    average = total / num_layers
    loss = depth_weight * depth_term.mean() + target_weight * (average.mean() - target).abs()
    if stage_targets is not None:
        if len(stage_targets) != len(layers):
            raise ValueError(f"`stage_targets` needs one share per stage ({len(layers)}), got {stage_targets}")
        loss = loss + target_weight * sum((kept[k].mean() - t).abs() for k, t in zip(layers, stage_targets))
    return loss, average


def _state_for(adapter, batch: dict) -> SoftMaskState:
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    visual, tokens, items = [], [], []
    for r in range(ids.shape[0]):
        cols = torch.zeros(0, dtype=torch.long, device=ids.device)
        for modality in adapter.modalities:
            cols = torch.cat([cols, (ids[r] == adapter.placeholder_id(modality)).nonzero().flatten()])
        cols = cols.sort().values
        layout = _grid_layout(cols.numel())
        items.append(VisualItem("image", r, layout, cols, torch.arange(cols.numel(), device=ids.device)))
        visual.append(cols)
        tokens.append(torch.stack([torch.full_like(cols, r), torch.arange(cols.numel(), device=ids.device)], 1))
    return SoftMaskState(visual=visual, tokens=tokens, items=items, mask2d=mask)


def _grid_layout(n: int) -> TokenLayout:
    side = math.isqrt(n)
    return TokenLayout.grid("image", side, side) if side * side == n else TokenLayout.flat("image", n)


def _text_columns(state: SoftMaskState) -> list[torch.Tensor]:
    out = []
    for r, cols in enumerate(state.visual):
        is_text = state.mask2d[r].bool().clone()
        is_text[cols] = False
        out.append(is_text.nonzero().flatten())
    return out


def train_heads(
    model: nn.Module,
    batches: Iterable[dict],
    config: ATPConfig,
    *,
    steps: int,
    target: float = 0.25,
    lr: float = 1e-2,
    llm_lr: float = 0.0,
    temperature: float = 10.0,
    depth_weight: float = 0.02,
    target_weight: float = 1.0,
    stage_targets: tuple[float, ...] | None = None,
    accelerator=None,
    log_every: int = 10,
    on_log: Callable[[dict], None] | None = None,
) -> tuple[ThresholdHeads, list[dict]]:
    """Train threshold heads (and the LLM when ``llm_lr > 0``) for ``steps`` batches; returns heads and a log.

    ``on_log`` is called with each log row as it is written (every ``log_every`` steps and the last).
    """
    trainer = SoftMaskATP(model, config, temperature=temperature)
    params = [{"params": trainer.heads.parameters(), "lr": lr}]
    for p in model.parameters():
        p.requires_grad_(False)
    if llm_lr > 0:
        lm_params = list(get_adapter(model).language_model.parameters())
        for p in lm_params:
            p.requires_grad_(True)
        params.append({"params": lm_params, "lr": llm_lr})
    optimizer = torch.optim.AdamW(params, weight_decay=0.0)
    num_layers = len(get_adapter(model).decoder_layers)
    if accelerator is not None:
        trainer, optimizer = accelerator.prepare(trainer, optimizer)
    module = trainer.module if hasattr(trainer, "module") else trainer
    model.train(llm_lr > 0)
    log = []
    for step, batch in zip(range(steps), _cycle(batches)):
        out, kept = trainer(batch)
        budget, average = budget_loss(kept, num_layers, target, depth_weight, target_weight, stage_targets)
        loss = out.loss + budget
        optimizer.zero_grad()
        (accelerator.backward(loss) if accelerator is not None else loss.backward())
        optimizer.step()
        if step % log_every == 0 or step == steps - 1:
            log.append({"step": step, "loss": loss.item(), "ntp": out.loss.item(), "budget": budget.item(),
                        "average_kept": average.mean().item()})
            if on_log is not None:
                on_log(log[-1])
    module.remove_hooks()
    model.eval()
    return module.heads, log


def _cycle(batches: Iterable[dict]) -> Iterator[dict]:
    cached = list(batches)
    while True:
        yield from cached


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local directory of a saved VLM (and processor)")
    parser.add_argument("--out", required=True, help="directory for atp_heads.safetensors")
    parser.add_argument("--task", default="synthetic-image", help="runner task whose train split is used")
    parser.add_argument("--split", default="train")
    parser.add_argument("--samples", type=int, default=512, help="training samples (per process)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--target", type=float, default=0.25,
                        help="visual tokens kept, averaged over the LLM's layers")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--llm-lr", type=float, default=0.0)
    parser.add_argument("--temperature", type=float, default=10.0)
    parser.add_argument("--depth-weight", type=float, default=0.02)
    parser.add_argument("--target-weight", type=float, default=1.0)
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="ATP stages (default: 4/32, 14/32, 24/32 of the depth)")
    parser.add_argument("--spatial-rates", type=float, nargs="+", default=None,
                        help="spatial augmented pruning rate per stage (default: 0.25 0.0625 0)")
    parser.add_argument("--stage-targets", type=float, nargs="+", default=None,
                        help="share of the visual tokens to keep after each stage, on average (with --target)")
    parser.add_argument("--cross", default="text", choices=CROSS,
                        help="cross-modality queries of the redundancy score (see ATPConfig.cross)")
    parser.add_argument("--self-weight", type=float, default=0.5, help="weight of self-modality importance")
    parser.add_argument("--score-layer", default="previous", choices=SCORE_LAYERS,
                        help="attention the scores come from (see ATPConfig.score_layer)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(args.seed)
    accelerator = training_accelerator()
    model = AutoModelForImageTextToText.from_pretrained(args.model, attn_implementation="eager")
    processor = AutoProcessor.from_pretrained(args.model)
    layers = len(get_adapter(model).decoder_layers)
    options = {"cross": args.cross, "self_weight": args.self_weight, "score_layer": args.score_layer}
    if args.layers:
        options["layers"] = tuple(args.layers)
    if args.spatial_rates:
        options["spatial_rates"] = tuple(args.spatial_rates)
    try:
        config = ATPConfig.at_budget(args.target, num_layers=layers, **options)
    except ValueError as error:
        parser.error(f"{error}; choose --layers / --spatial-rates that can (e.g. --layers 1 2 4 "
                     "--spatial-rates 0.1 0.05 0.0 on 6 layers) or a larger --target")
    task = get_task(args.task)
    batches = answer_batches(task, processor, model.config.model_type, split=args.split, limit=args.samples,
                             batch_size=args.batch_size, start=accelerator.process_index * args.samples)
    batches = [{k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    accelerator.print(f"{sum(len(b['input_ids']) for b in batches)} samples in {len(batches)} batches; ATP stages "
                      f"{config.layers}, spatial rates {config.spatial_rates}, target {args.target:g} of "
                      f"{layers} layers")
    heads, log = train_heads(model, batches, config, steps=args.steps, target=args.target, lr=args.lr,
                             llm_lr=args.llm_lr, temperature=args.temperature, depth_weight=args.depth_weight,
                             target_weight=args.target_weight, stage_targets=args.stage_targets,
                             accelerator=accelerator, log_every=args.log_every,
                             on_log=accelerator.print)
    if accelerator.is_main_process:
        with atomic_directory(args.out) as staging:  # each file complete or not there
            heads.save_pretrained(staging)
            record = {"args": vars(args), "config": config.to_dict(), "log": log}
            (staging / "atp_training.json").write_text(json.dumps(record, indent=2) + "\n")
            if args.llm_lr > 0:
                model.save_pretrained(staging)
                processor.save_pretrained(staging)
        print(f"heads saved to {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
