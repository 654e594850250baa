"""The registered ``vqtoken`` method (and its ``vqtoken_codebook`` ablation) and their config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokenreduce.core.config import MethodConfig, check_choice, check_keep, check_range, resolve_keep
from tokenreduce.core.hostsync import host_only
from tokenreduce.core.reduction import ProjectorMethod, ReduceContext, Reduction
from tokenreduce.core.registry import register_method

from .attention import VQAttention
from .clustering import ADAPTIVE, KMEANS, build_codebook, normalize
from .hashing import (
    ANCHORS,
    anchors,
    changes,
    frame_differences,
    grid_coordinates,
    index_map,
    occupancy,
    trajectories,
)

CODEWORDS = ("mean", "normalized_mean")


@dataclass
class VQTokenConfig(MethodConfig):
    """Options of ``vqtoken``.

    Attributes:
        keep: fixed-length mode: codes per video, as a count (int >= 1) or a fraction of the video's
            content tokens (float in (0, 1], rounded up). ``None`` (default): adaptive-length mode, where
            each video picks its own ``K`` in ``[k_min, k_max]``. Only codes that some token uses are fed,
            so a video can get fewer tokens than ``keep``.
        adaptive: how adaptive mode picks ``K``. ``"elbow"`` is the released code's rule, with its range
            bug fixed. ``"silhouette"`` is the real mean cosine silhouette.
        k_min, k_max: bounds of the adaptive ``K`` (the code's 12 and 32). Both are clipped to the
            number of distinct tokens.
        anchor: which original token each code token stands at (see
            :mod:`~tokenreduce.plugins.vqtoken.hashing`). It fixes the code tokens' order, and their
            position ids when ``renumber_positions`` is False.
        renumber_positions: True by default, as in the paper: the compressed tokens replace the video's
            span and the row gets ordinary sequential position ids. False: every code token takes the
            position of its anchor (on Qwen2-VL, its t/h/w M-RoPE ids). Text and other items keep
            theirs. Note that True renumbers the whole row, so on Qwen2-VL an image in the same row loses
            its 2-D M-RoPE ids too.
        codeword: the code token fed to the LLM. ``"mean"`` is the paper's ``b_k``, the mean of the
            code's tokens. ``"normalized_mean"`` is the released code's, the mean of the L2-normalised
            tokens (norm <= 1, off the scale the LLM was trained on).
        keep_newline: also keep a video's lone trailing newline token (LLaVA-OneVision). Off by default:
            the paper feeds the codes only.
        keep_codebook: also put the unit codewords the index map was assigned with into
            ``info["codebook"]`` (``[codes, D]``; every cell's code is its cosine-nearest row). Off by
            default: the evaluation runner writes item info into every record, and a 32 x 896 codebook
            is ~0.5 MB of JSON per sample. ``info`` always holds ``index_map`` (``T x H x W`` code ids,
            code ``j`` being the ``j``-th code token), ``num_codes``, ``k`` and, in adaptive mode,
            ``k_scores``.
        attention: trained VQ-attention (local directory or hub repo id, see
            :class:`~tokenreduce.plugins.vqtoken.attention.VQAttention`). ``None`` gives codebook only,
            the paper's ablation and the released code's inference path. A module trained with LLM
            adapters adds them to the LLM while the model is wrapped (removed on unwrap).
        seed: seed of the k-means++ seeding (per item, so a video gets the same codes alone or in a batch).
        max_iter, tol: k-means iterations, and the relative objective improvement that stops them.
        threads: FAISS OpenMP threads while clustering (0: FAISS's default).
        use_gpu: cluster with faiss-gpu. ``None`` does so when faiss-gpu is installed and the features
            are on CUDA.
        kmeans: where the k-means runs: ``"faiss"``, ``"torch"`` (Lloyd's iterations on the features'
            device) or ``"auto"``: FAISS for CPU features and with faiss-gpu, torch for CUDA features
            without faiss-gpu (FAISS is then not needed at all).
        modalities: videos by default. Add ``"image"`` to quantise images too (all crops of an image share
            one codebook). Items of other modalities pass through untouched.
    """

    keep: int | float | None = None
    adaptive: str = "elbow"
    k_min: int = 12
    k_max: int = 32
    anchor: str = "first"
    renumber_positions: bool = True
    codeword: str = "mean"
    keep_newline: bool = False
    keep_codebook: bool = False
    attention: str | None = None
    seed: int = 0
    max_iter: int = 100
    tol: float = 1e-4
    threads: int = 1
    use_gpu: bool | None = None
    kmeans: str = "auto"

    def validate(self) -> None:
        if self.keep is not None:
            check_keep("keep", self.keep)
        check_choice("adaptive", self.adaptive, ADAPTIVE)
        check_range("k_min", self.k_min, 1, integer=True)
        check_range("k_max", self.k_max, 1, integer=True)
        if self.k_min > self.k_max:
            raise ValueError(f"`k_min` ({self.k_min}) must be <= `k_max` ({self.k_max})")
        check_choice("anchor", self.anchor, ANCHORS)
        check_choice("codeword", self.codeword, CODEWORDS)
        for name in ("keep_newline", "keep_codebook"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}")
        if self.attention is not None and (not isinstance(self.attention, str) or not self.attention):
            raise ValueError(
                "`attention` must be a local directory or hub repo id (a non-empty str) or None, "
                f"got {self.attention!r}"
            )
        check_range("seed", self.seed, 0, integer=True)
        check_range("max_iter", self.max_iter, 1, integer=True)
        check_range("tol", self.tol, 0.0)
        check_range("threads", self.threads, 0, integer=True)
        if self.use_gpu is not None and not isinstance(self.use_gpu, bool):
            raise ValueError(f"`use_gpu` must be True, False or None, got {self.use_gpu!r}")
        check_choice("kmeans", self.kmeans, KMEANS)

    @classmethod
    def at_budget(cls, budget: float, num_layers: int | None = None, **options: Any) -> VQTokenConfig:
        """Fixed-length mode keeping ``ceil(budget * content tokens)`` codes per video."""
        check_range("budget", budget, 0.0, 1.0, low_open=True)
        return cls(keep=float(budget), **options)


@register_method("vqtoken", config_cls=VQTokenConfig, modalities=("video",))
class VQTokenMethod(ProjectorMethod):
    """VQToken: a video becomes its k-means codebook (plus the token hash, and VQ-attention when trained)."""

    def __init__(self, config: VQTokenConfig):
        super().__init__(config)
        self.attention: VQAttention | None = None
        self.handle: Any = None
        self._llm_hooks: list[Any] = []
        if config.attention is not None:
            self.attention = VQAttention.from_pretrained(config.attention)

    # ----- the module --------------------------------------------------------------------------------
    def set_attention(self, module: VQAttention | None) -> None:
        """Use ``module`` (e.g. one being trained) as VQ-attention; ``None`` gives codebook only. On a
        wrapped model the LLM adapters of the previous module are removed and ``module``'s installed."""
        self._remove_llm_hooks()
        self.attention = module
        if self.handle is not None and module is not None:
            self._llm_hooks = module.adapt_llm(self.handle.adapter.language_model)

    def _remove_llm_hooks(self) -> None:
        for h in self._llm_hooks:
            h.remove()
        self._llm_hooks = []

    def attach(self, handle: Any) -> None:
        self.handle = handle
        if self.attention is None:
            return
        width = int(handle.adapter.text_config.hidden_size)
        if self.attention.config.dim != width:
            raise ValueError(
                f"`attention`={self.config.attention!r} was trained for code tokens of width "
                f"{self.attention.config.dim}; {handle.adapter.describe()} feeds its LLM tokens of width "
                f"{width}"
            )
        device = next(handle.model.parameters()).device
        self.attention.to(device)
        self.set_attention(self.attention)

    def detach(self, handle: Any) -> None:
        self._remove_llm_hooks()
        self.handle = None

    # ----- reduction ---------------------------------------------------------------------------------
    def reduce(self, features: torch.Tensor, context: ReduceContext) -> Reduction:
        cfg = self.config
        n = features.shape[0]
        device = features.device
        if context.modality not in (cfg.modalities or ("video",)):
            return Reduction(sources=torch.arange(n, device=device))
        layout = context.layout
        with host_only():  # a layout table, built on the host
            content = layout.content_mask.nonzero().flatten()
        if content.numel() == 0:
            return Reduction(sources=torch.arange(n, device=device))
        tokens = features[content.to(device)]
        k = None if cfg.keep is None else resolve_keep(cfg.keep, content.numel())
        book = build_codebook(
            tokens.detach(),
            k,
            adaptive=cfg.adaptive,
            k_min=cfg.k_min,
            k_max=cfg.k_max,
            seed=cfg.seed,
            max_iter=cfg.max_iter,
            tol=cfg.tol,
            threads=cfg.threads,
            use_gpu=cfg.use_gpu,
            kmeans=cfg.kmeans,
        )
        codes = book.codes.to(device)
        # Used codes, ordered by their anchor token; code ids renumbered to that order.
        anchor = anchors(codes, book.similarity.to(device), book.k, cfg.anchor)
        used = (anchor >= 0).nonzero().flatten()
        order = used[torch.argsort(anchor[used])]
        renumber = torch.full((book.k,), -1, dtype=torch.long, device=device)
        renumber[order] = torch.arange(order.numel(), device=device)
        codes = renumber[codes]
        m = order.numel()
        members = normalize(tokens) if cfg.codeword == "normalized_mean" else tokens.float()
        sums = torch.zeros(m, tokens.shape[1], dtype=members.dtype, device=device).index_add(
            0, codes, members
        )
        counts = torch.zeros(m, dtype=torch.long, device=device).index_add_(0, codes, torch.ones_like(codes))
        counts = counts.clamp_min(1).to(members.dtype)
        outputs = sums / counts[:, None]
        if self.attention is not None:
            coords = grid_coordinates(layout, content).to(device)
            shape = self.attention.config
            hashed = occupancy(coords, codes, m, shape.bins)
            traj = moved = None
            if shape.trajectory:
                traj = trajectories(coords, codes, members, m, shape.trajectory)
            if shape.changes:
                differences = frame_differences(layout, content, members)
                moved = changes(coords, codes, differences, m, shape.trajectory)
            outputs = self.attention(outputs, hashed, traj, moved)
        outputs = outputs.to(features.dtype)
        sources = content.to(device)[anchor[order]]
        assignment = torch.full((n,), -1, dtype=torch.long, device=device)
        assignment[content.to(device)] = codes
        if cfg.keep_newline:
            lone = [
                sl.start
                for seg, sl in zip(layout.segments, layout.segment_slices())
                if seg.cols == 0 and seg.newline
            ]
            if lone:
                slots = torch.tensor(lone, dtype=torch.long, device=device)
                assignment[slots] = m + torch.arange(slots.numel(), device=device)
                sources = torch.cat([sources, slots])
                outputs = torch.cat([outputs, features[slots]])
        info = {
            "num_codes": m,
            "k": book.k,
            "index_map": index_map(layout, content, codes).to("cpu", torch.int32),
            "anchor": cfg.anchor,
        }
        if cfg.keep_codebook:
            info["codebook"] = book.centroids[order].detach().to("cpu", torch.float32)
        if book.scores:
            info["k_scores"] = book.scores
        return Reduction(sources=sources, features=outputs, assignment=assignment, info=info)


@dataclass
class VQTokenCodebookConfig(VQTokenConfig):
    """Options of ``vqtoken_codebook``: those of ``vqtoken`` without ``attention`` (always codebook only)."""

    def validate(self) -> None:
        super().validate()
        if self.attention is not None:
            raise ValueError(
                "`attention` must be None for vqtoken_codebook (the codebook-only ablation), "
                f"got {self.attention!r}; "
                "use method 'vqtoken' for trained VQ-attention"
            )


@register_method(
    "vqtoken_codebook", config_cls=VQTokenCodebookConfig, modalities=("video",)
)
class VQTokenCodebookMethod(VQTokenMethod):
    """VQToken codebook only (the paper's ablation, the released code's inference path), for grids."""
