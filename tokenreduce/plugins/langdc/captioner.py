"""The language expert of LangDC ("CapPruner"): a small causal LM that captions a segment of video frames.

One :class:`Captioner` bundles three (or four) trained parts and how they were trained to be used:

* ``in_proj`` maps the VLM's visual tokens (what the projector stage sees: the VLM's own projected
  features, width ``vlm_hidden``) into the LM's embedding space. The paper's ``cap_mm_projector`` reads
  the video encoder's features before the LLM projector; the projector stage here only sees projected
  tokens, so the captioner reads those (one feature space for every family, no second tower pass).
* ``lm``: any transformers causal LM (``AutoModelForCausalLM``); the shipped one is a 3-layer Qwen2 of
  width 64 over the synthetic benchmark's vocabulary. It reads ``[visual tokens][prompt ids]`` and
  writes a caption greedily until end-of-sequence or ``max_caption_tokens``.
* ``post_proj`` maps the LM's hidden state at layer ``hidden_layer`` of every caption position (a "soft
  caption token") into the VLM's embedding space (the paper's ``llm_projector``; linear in the paper,
  ``mlp2x_gelu`` by default here because the VLM stays frozen and the post-projector alone adapts).
* optionally (``vlm_rank > 0``) ``vlm_adapters``: low-rank adapters for the VLM's LLM, trained with the
  post-projector and hooked in only while the model is wrapped (the paper tunes the LLM with LoRA r=128).

``hidden_layer`` indexes ``hidden_states`` of the LM: 0 is the embedding output, ``k`` the output of
decoder layer ``k``. The paper reads layer 15 of 24 (Table B4; its eval scripts: output of layer 16 of
24), noting that middle layers beat the last and layer 0 is worst; the released dual-branch code reads
``hidden_states[0]``. The default of :func:`default_hidden_layer` is two thirds of the depth.

Saved as a folder (local or hub repo): ``langdc_captioner.json`` (this config), ``lm/`` (the causal LM's
``save_pretrained``: ``config.json`` + ``model.safetensors``), ``langdc_projectors.safetensors`` and, when
given, ``tokenizer/`` (to turn caption ids into text in the stats).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenreduce.core.flops import Geometry
from tokenreduce.core.lowrank import LowRankAdapters, check_adapters
from tokenreduce.core.parts import load_once

CONFIG_NAME = "langdc_captioner.json"
PROJECTORS_NAME = "langdc_projectors.safetensors"
LM_DIR = "lm"
TOKENIZER_DIR = "tokenizer"
PROJECTOR_KINDS = ("linear", "mlp2x_gelu")
INPUT_WIDTHS = {"none": 1, "cell": 2, "neighbourhood": 6}  # captioner input width per ``differences``, in vlm_hidden


def default_hidden_layer(num_layers: int) -> int:
    """Two thirds of the depth (the paper's eval scripts read the output of layer 16 of 24)."""
    return max(1, min(num_layers, round(2 * num_layers / 3)))


def build_projector(kind: str, width_in: int, width_out: int) -> nn.Module:
    """``"linear"`` or ``"mlp2x_gelu"`` (Linear, GELU, Linear: LLaVA's projector)."""
    if kind == "linear":
        return nn.Linear(width_in, width_out)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(width_in, width_out), nn.GELU(), nn.Linear(width_out, width_out))
    raise ValueError(f"projector kind must be one of {PROJECTOR_KINDS}, got {kind!r}")


def linear_flops(module: nn.Module) -> float:
    """FLOPs per token of a projector (2 per multiply-add of every Linear)."""
    return float(sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear)))


@dataclass
class CaptionerConfig:
    """How a captioner was trained to be used.

    Attributes:
        vlm_hidden: width of the VLM's visual tokens (input of ``in_proj``, output of ``post_proj``).
        eos_token_id: the id that ends a caption (the compression ratio is decided by when it is emitted).
        hidden_layer: ``hidden_states`` index the soft caption tokens are read from (see module docstring).
        frame_tokens: visual tokens per frame fed to the captioner: each frame grid is average-pooled to
            the grid of about this many cells with its aspect ratio (the paper pools 16x16 to 8x8); ``None``
            feeds every token.
        segment_frames: frames per captioned segment (the paper: 4 segments of 4 frames).
        differences: what each input token carries besides itself (ours, not the paper's): ``"none"``;
            ``"cell"``, its difference from the same cell of the frame before (``in_proj`` reads
            ``2 * vlm_hidden`` features); ``"neighbourhood"``, also the differences of the four cells around
            it (``6 * vlm_hidden``). A segment's events are what differs from the frame before it, and a
            small LM finds them token by token (see :func:`~tokenreduce.plugins.langdc.method.segment_groups`).
        max_caption_tokens: most caption tokens per segment (the paper: 128, its captions stay under 100).
        prompt_ids: token ids that follow the visual tokens and precede the caption (e.g. BOS).
        in_projector, post_projector: projector kinds, ``"linear"`` or ``"mlp2x_gelu"``.
        vlm_rank: rank of low-rank adapters on the VLM's LLM (0: none, the VLM stays as it is), trained in
            the alignment stage with the post-projector and hooked into the LLM only while the model is
            wrapped (:mod:`tokenreduce.core.lowrank`). The paper tunes the LLM with LoRA r=128.
        vlm_alpha: adapter scale numerator (each delta is multiplied by ``vlm_alpha / vlm_rank``).
        vlm_modules: ``(name, in_features, out_features)`` of every adapted layer of the VLM's LLM.
        vlm: name of the VLM the projectors were trained for (informational).
        training: what training recorded (steps, time, losses, caption accuracy).
    """

    vlm_hidden: int
    eos_token_id: int
    hidden_layer: int = 2
    frame_tokens: int | None = 9
    segment_frames: int = 4
    differences: str = "none"
    max_caption_tokens: int = 32
    prompt_ids: tuple[int, ...] = ()
    in_projector: str = "linear"
    post_projector: str = "mlp2x_gelu"
    vlm_rank: int = 0
    vlm_alpha: float = 16.0
    vlm_modules: tuple[tuple[str, int, int], ...] = ()
    vlm: str | None = None
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prompt_ids = tuple(int(i) for i in self.prompt_ids)
        self.vlm_modules = check_adapters("vlm", self.vlm_rank, self.vlm_modules)
        for name in ("vlm_hidden", "segment_frames", "max_caption_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
        if isinstance(self.hidden_layer, bool) or not isinstance(self.hidden_layer, int) or self.hidden_layer < 0:
            raise ValueError(f"`hidden_layer` must be an int >= 0 (0: embeddings), got {self.hidden_layer!r}")
        if self.frame_tokens is not None and (
            isinstance(self.frame_tokens, bool) or not isinstance(self.frame_tokens, int) or self.frame_tokens < 1
        ):
            raise ValueError(f"`frame_tokens` must be an int >= 1 or None (every token), got {self.frame_tokens!r}")
        if self.differences not in INPUT_WIDTHS:
            raise ValueError(f"`differences` must be one of {tuple(INPUT_WIDTHS)}, got {self.differences!r}")
        for name in ("in_projector", "post_projector"):
            if getattr(self, name) not in PROJECTOR_KINDS:
                raise ValueError(f"`{name}` must be one of {PROJECTOR_KINDS}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["prompt_ids"] = list(self.prompt_ids)
        out["vlm_modules"] = [list(m) for m in self.vlm_modules]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaptionerConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown captioner config entries {unknown}; known: {sorted(names)}")
        return cls(**data)


@dataclass
class Captions:
    """Greedy captions of a batch of segments.

    Attributes:
        ids: per segment, the caption's token ids (end-of-sequence excluded).
        hidden: per segment, ``[len(ids), lm_hidden]`` hidden states of the caption positions at
            ``hidden_layer`` (the position of token ``w_t`` is where ``w_t`` is read, which also predicts
            ``w_{t+1}``).
        prefix_tokens: tokens the LM read before the caption (visual tokens and prompt ids).
    """

    ids: list[list[int]]
    hidden: list[torch.Tensor]
    prefix_tokens: int


class Captioner(nn.Module):
    """``in_proj`` + causal LM + ``post_proj``; see the module docstring."""

    def __init__(self, config: CaptionerConfig, lm: nn.Module, tokenizer: Any = None):
        super().__init__()
        self.config = config
        self.lm = lm
        width = int(lm.config.hidden_size)
        layers = int(lm.config.num_hidden_layers)
        if config.hidden_layer > layers:
            raise ValueError(
                f"`hidden_layer` must be in [0, {layers}] for a captioner LM of {layers} layers, got {config.hidden_layer}"
            )
        self.in_proj = build_projector(config.in_projector, config.vlm_hidden * INPUT_WIDTHS[config.differences], width)
        self.post_proj = build_projector(config.post_projector, width, config.vlm_hidden)
        self.vlm_adapters = LowRankAdapters(config.vlm_modules, config.vlm_rank, config.vlm_alpha,
                                            owner="the LangDC captioner")
        self.tokenizer = tokenizer

    # ----- construction -------------------------------------------------------------------------------
    @classmethod
    def build(cls, config: CaptionerConfig, lm: nn.Module | dict[str, Any], tokenizer: Any = None,
              seed: int = 0) -> Captioner:
        """A captioner around ``lm``: a causal LM module, or a dict of ``Qwen2Config`` options built from
        scratch (random init, seeded)."""
        if isinstance(lm, dict):
            from transformers import AutoModelForCausalLM, Qwen2Config

            torch.manual_seed(seed)
            lm_config = Qwen2Config(**lm)
            lm_config._attn_implementation = "sdpa"
            lm = AutoModelForCausalLM.from_config(lm_config)
        torch.manual_seed(seed + 1)
        return cls(config, lm, tokenizer)

    @property
    def lm_hidden(self) -> int:
        return int(self.lm.config.hidden_size)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write config, LM, projectors (safetensors) and tokenizer (if any) into ``directory``."""
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n")
        self.lm.save_pretrained(path / LM_DIR, safe_serialization=True)
        tensors = {f"in_proj.{k}": v for k, v in self.in_proj.state_dict().items()}
        tensors.update({f"post_proj.{k}": v for k, v in self.post_proj.state_dict().items()})
        tensors.update({f"vlm_adapters.{k}": v for k, v in self.vlm_adapters.state_dict().items()})
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path / PROJECTORS_NAME))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path / TOKENIZER_DIR)
        return path

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, revision: str | None = None) -> Captioner:
        """Load a captioner folder from a local directory or a hub repo id (see the module docstring).

        Inside :func:`tokenreduce.core.parts.reuse_loaded_parts` (the evaluation runner's whole run) a
        folder loads once."""
        return load_once("langdc.captioner", source, revision, lambda: cls._load(source, revision))

    @classmethod
    def _load(cls, source: str | os.PathLike, revision: str | None) -> Captioner:
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        path = Path(source)
        if not path.is_dir():
            if Path(source).is_absolute() or str(source).startswith((".", "~")):
                raise ValueError(f"`captioner`={str(source)!r}: no such directory")
            from huggingface_hub import snapshot_download

            try:
                path = Path(snapshot_download(str(source), revision=revision))
            except Exception as error:  # network errors, unknown repo, offline mode
                raise ValueError(
                    f"`captioner`={str(source)!r} is neither a local directory nor a reachable hub repo holding "
                    f"{CONFIG_NAME}: {error}"
                ) from error
        if not (path / CONFIG_NAME).is_file():
            raise ValueError(f"`captioner`={str(source)!r}: no {CONFIG_NAME} in {path}; train one with "
                             "`python -m tokenreduce.plugins.langdc.training`")
        config = CaptionerConfig.from_dict(json.loads((path / CONFIG_NAME).read_text()))
        lm = AutoModelForCausalLM.from_pretrained(path / LM_DIR)
        tokenizer = None
        if (path / TOKENIZER_DIR).is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path / TOKENIZER_DIR)
        captioner = cls(config, lm, tokenizer)
        state = load_file(str(path / PROJECTORS_NAME))
        for name in ("in_proj", "post_proj", "vlm_adapters"):
            prefix = name + "."
            getattr(captioner, name).load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        return captioner.eval()

    # ----- running ------------------------------------------------------------------------------------
    def prefix(self, visual: torch.Tensor) -> torch.Tensor:
        """``[S, K, vlm_hidden]`` visual tokens -> ``[S, K + P, lm_hidden]`` LM input (visual, prompt ids)."""
        param = next(self.lm.parameters())
        embeds = self.in_proj(visual.to(param.device, param.dtype))
        if self.config.prompt_ids:
            ids = torch.tensor(self.config.prompt_ids, device=param.device)
            prompt = self.lm.get_input_embeddings()(ids)[None].expand(visual.shape[0], -1, -1)
            embeds = torch.cat([embeds, prompt], dim=1)
        return embeds

    @torch.no_grad()
    def generate(self, visual: torch.Tensor, max_tokens: int | None = None) -> Captions:
        """Greedy captions of ``S`` segments of equal length ``[S, K, vlm_hidden]``, KV-cached.

        Every row stops at its own end-of-sequence (or after ``max_tokens``); a row that has stopped keeps
        being fed end-of-sequence until the longest finishes, and its outputs are ignored. Each row's result
        depends on its own tokens only (causal attention, no padding).
        """
        limit = self.config.max_caption_tokens if max_tokens is None else int(max_tokens)
        eos = self.config.eos_token_id
        layer = self.config.hidden_layer
        rows = visual.shape[0]
        embeds = self.prefix(visual)
        out = self.lm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        cache = out.cache
        token = out.logits[:, -1].argmax(-1)
        done = token == eos
        ids: list[list[int]] = [[] for _ in range(rows)]
        hidden: list[list[torch.Tensor]] = [[] for _ in range(rows)]
        for _step in range(limit):
            if bool(done.all()):
                break
            out = self.lm(input_ids=token[:, None], cache=cache, use_cache=True, output_hidden_states=True)
            cache = out.cache
            state = out.hidden_states[layer][:, -1]
            for r in (~done).nonzero().flatten().tolist():
                ids[r].append(int(token[r]))
                hidden[r].append(state[r])
            token = torch.where(done, torch.full_like(token, eos), out.logits[:, -1].argmax(-1))
            done = done | (token == eos)
        empty = embeds.new_zeros(0, self.lm_hidden)
        return Captions(
            ids=ids,
            hidden=[torch.stack(h) if h else empty for h in hidden],
            prefix_tokens=int(embeds.shape[1]),
        )

    def teacher_force(self, visual: torch.Tensor, captions: list[list[int]], layer: int | None = None):
        """One forward over ``[prefix][caption + EOS]`` per segment (right padded; causal, so padding never
        reaches a real position). Returns ``(logits [S, T, V], targets [S, T] with -100 outside the
        caption + EOS, hidden)``: ``hidden`` lists per segment the ``[len(caption), lm_hidden]`` states at
        ``hidden_layer`` (or ``layer``), the same states :meth:`generate` records for that caption."""
        layer = self.config.hidden_layer if layer is None else layer
        eos = self.config.eos_token_id
        embeds = self.prefix(visual)
        p = embeds.shape[1]
        width = max((len(c) for c in captions), default=0) + 1
        device = embeds.device
        ids = torch.full((len(captions), width), eos, dtype=torch.long, device=device)
        targets = torch.full((len(captions), p + width), -100, dtype=torch.long, device=device)
        for r, cap in enumerate(captions):
            if cap:
                ids[r, : len(cap)] = torch.tensor(cap, device=device)
            # position p - 1 (last prompt token) predicts w_1; position p + t - 1 reads w_t and predicts w_{t+1}
            targets[r, p - 1 : p + len(cap)] = torch.tensor([*cap, eos], device=device)
        tokens = self.lm.get_input_embeddings()(ids)
        out = self.lm(inputs_embeds=torch.cat([embeds, tokens], 1), output_hidden_states=True)
        states = out.hidden_states[layer]
        hidden = [states[r, p : p + len(cap)] for r, cap in enumerate(captions)]
        return out.logits, targets, hidden

    def soft_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[L, lm_hidden]`` caption hidden states -> ``[L, vlm_hidden]`` tokens for the VLM."""
        param = next(self.post_proj.parameters())
        return self.post_proj(hidden.to(param.device, param.dtype))

    def decode(self, ids: list[int]) -> str:
        """Caption text (token ids joined by spaces when the captioner has no tokenizer)."""
        if self.tokenizer is None:
            return " ".join(str(i) for i in ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    # ----- cost ---------------------------------------------------------------------------------------
    def flops_breakdown(self, visual_tokens: int, caption_tokens: int) -> dict[str, float]:
        """Analytic FLOPs (2 per multiply-add) of captioning one segment of ``visual_tokens`` tokens into a
        caption of ``caption_tokens`` tokens, by part:

        * ``projectors``: ``in_proj`` on every visual token, ``post_proj`` on every soft token;
        * ``lm_linear``: the LM's q/k/v/o projections and gated MLP over the prefix (visual tokens and
          prompt ids) and over one KV-cached step per caption token (the last step's prediction is the
          end-of-sequence or the length limit);
        * ``lm_attention``: scores and weighted sums, causal over the prefix, then each step against its
          context (as :class:`~tokenreduce.core.flops.Geometry` counts the VLM's prefill);
        * ``lm_head``: the output layer at the prefix's last position and at every step.

        Counted per segment as if it ran alone: a batched row that stopped early costs nothing here.
        """
        g = Geometry.from_config(self.lm.config)
        prefix = visual_tokens + len(self.config.prompt_ids)
        q_dim, kv_dim = g.heads * g.head_dim, g.kv_heads * g.head_dim
        per_token = 2 * g.hidden * (2 * q_dim + 2 * kv_dim) + 2 * 3 * g.hidden * g.intermediate
        attention = 2 * 2 * (prefix * (prefix + 1) / 2) * q_dim
        attention += sum(2 * 2 * (prefix + t + 1) * q_dim for t in range(caption_tokens))
        return {
            "projectors": linear_flops(self.in_proj) * visual_tokens + linear_flops(self.post_proj) * caption_tokens,
            "lm_linear": float(g.layers * per_token * (prefix + caption_tokens)),
            "lm_attention": float(g.layers * attention),
            "lm_head": float(2 * g.hidden * int(self.lm.config.vocab_size) * (caption_tokens + 1)),
        }

    def flops(self, visual_tokens: int, caption_tokens: int) -> float:
        """Total of :meth:`flops_breakdown`."""
        return float(sum(self.flops_breakdown(visual_tokens, caption_tokens).values()))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

