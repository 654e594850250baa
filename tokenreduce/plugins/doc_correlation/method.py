"""``doc_correlation``: correlation-guided compression of cropping VLMs (TCC, arXiv 2407.14439).

Cropping VLMs (LLaVA-NeXT / OneVision anyres, mPLUG-DocOwl 1.5) read a document as a thumbnail plus
sub-images; most sub-images of a page are margins, rules and repeated text lines. TCC gives each crop a
token budget that follows its *information density* and picks the tokens inside it:

1. **Density** (shallow tower layer): per crop, the share ``r`` of tokens that more than ``max_neighbors``
   other tokens of the crop resemble beyond ``threshold`` (key or hidden-state cosine / correlation) is
   its redundancy; ``d = 1 - r``. Budget: ``ceil(d * N)`` per crop (``keep=None``), or an image's global
   budget ``keep * N_image`` shared among its crops in proportion to ``d * N`` (``keep`` set; this is
   what ``at_budget`` uses).
2. **Global-information tokens** (deep tower layer): IQR outliers of the [CLS] attention over the crop.
3. **Local-information tokens** (shallow layer): the rest of the budget, sampled without replacement from
   the [CLS]-patch attention as a distribution (seeded), or its top-k. Towers without [CLS] have no such
   distribution; there (``local_score="auto"``) the local score is each token's *distinctiveness*, the share
   of its crop's tokens it does not resemble (the token-level reading of step 1's density).
4. Optionally, dropped tokens are merged into their most similar kept token (weighted mean).

For the global tokens, towers without [CLS] (SigLIP) use the attention each patch receives. The base
image (thumbnail) is a crop like any other unless ``base="keep"``. Newline slots (a canvas row's newline,
lone separators such as DocOwl's per-crop end token or OneVision's trailing newline) all stay, so a
document's rows stay delimited and the kept count is known from the budget. Each item's ``Reduction.info`` lists the crops with their density and budget
(``tr.stats``, overlays).

Reconstructed, not from the (unreleased) reference code: every threshold and layer below, the budget
mapping, the sampling distribution's normalisation and the merge rule. See the plug-in's README.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokenreduce.core.config import MethodConfig, check_choice, check_range
from tokenreduce.core.hostsync import host_only
from tokenreduce.core.reduction import ReduceContext, Reduction, VisionMethod
from tokenreduce.core.registry import register_method
from tokenreduce.ops.vision import attention_and_keys, content_groups

from .density import (
    adaptive_budgets,
    density_on_device,
    distinctiveness,
    distribute_on_device,
    global_budgets,
    neighbor_counts,
    redundancy_of,
)
from .select import choose_tokens, choose_tokens_on_device, merge_dropped, merge_into_kept, sampling_weights

FAMILIES = ("llava", "llava_next", "llava_next_video", "llava_onevision", "docowl")
SIMILARITY_SOURCES = ("keys", "keys_mean", "hidden")
METRICS = ("cosine", "correlation")
SAMPLINGS = ("auto", "sample", "topk")
BASE_MODES = ("crop", "keep")
MERGE_WEIGHTS = ("attention", "uniform")
LOCAL_SCORES = ("auto", "attention", "distinct")


@dataclass
class DocCorrelationConfig(MethodConfig):
    """Options of ``doc_correlation``.

    Attributes:
        keep: ``None``: every crop keeps ``ceil(d * N)`` of its ``N`` tokens (adaptive total). A float in
            (0, 1]: each image keeps ``round(keep * N_image)`` content tokens, shared among its crops in
            proportion to ``d * N`` (at least ``min_tokens`` each, at most ``N``).
        shallow_layer: tower layer whose keys / hidden states measure redundancy and whose [CLS] attention
            is the sampling distribution (the paper ablates a "low" layer; the index is unknown).
        deep_layer: tower layer whose [CLS] attention gives the global-information tokens.
        similarity: features compared for redundancy and merging: ``"keys"`` (all heads concatenated),
            ``"keys_mean"`` (mean over heads, as VisionZip) or ``"hidden"`` (the normed hidden states
            entering the layer's attention).
        metric: ``"cosine"`` or ``"correlation"`` (Pearson: centred cosine).
        threshold: two tokens are alike when their similarity exceeds this.
        max_neighbors: a token is redundant when more than this many other tokens of its crop are alike:
            an int count, or a float fraction of the crop's other tokens.
        min_tokens: fewest tokens any crop keeps (a blank crop gets exactly this).
        global_tokens: keep the IQR outliers of the deep-layer [CLS] attention (within the budget).
        iqr_factor: outliers lie above ``Q3 + iqr_factor * IQR``.
        sampling: ``"sample"`` (seeded sampling without replacement), ``"topk"`` (deterministic) or
            ``"auto"``: sampling from attention, top-k of distinctiveness (nearly flat over a crop's content
            tokens, so draws from it land on near-random cells: on the synthetic documents at 34% of the
            tokens, 82.7% accuracy sampled against 89.3% with top-k, full 90.7%).
        local_score: what the local tokens are drawn by: ``"attention"`` (the shallow [CLS] attention, as
            the paper; the attention each patch receives on towers without [CLS]), ``"distinct"`` (the share
            of the crop's tokens a token is not alike, from the density's neighbour counts; attention breaks
            ties) or ``"auto"`` (attention with a [CLS] token, distinct without).
        seed: seed of the sampler (the same for every item, so a row alone equals the row in a batch).
        merge: merge each dropped token into its most similar kept token of the crop (weighted mean).
        merge_weights: ``"attention"`` (shallow [CLS] attention) or ``"uniform"`` weights in the merge.
        base: ``"crop"`` (the thumbnail is a crop like any other) or ``"keep"`` (it keeps all its tokens;
            with ``keep`` set they count against the image's budget).
        count_newlines: with ``keep`` set, the budget is ``keep`` of ALL the image's tokens the LLM reads,
            newline / separator slots included, and those slots (all kept) are paid for first (so the item
            meets its budget); ``False``: ``keep`` of the content tokens, the newline slots on top.
    """

    keep: float | None = None
    shallow_layer: int = 1
    deep_layer: int = -2
    similarity: str = "keys"
    metric: str = "cosine"
    threshold: float = 0.9
    max_neighbors: int | float = 0.05
    min_tokens: int = 1
    global_tokens: bool = True
    iqr_factor: float = 1.5
    sampling: str = "auto"
    local_score: str = "auto"
    seed: int = 0
    merge: bool = False
    merge_weights: str = "attention"
    base: str = "crop"
    count_newlines: bool = True

    def validate(self) -> None:
        if self.keep is not None:
            check_range("keep", self.keep, 0.0, 1.0, low_open=True)
        check_range("shallow_layer", self.shallow_layer, integer=True)
        check_range("deep_layer", self.deep_layer, integer=True)
        check_choice("similarity", self.similarity, SIMILARITY_SOURCES)
        check_choice("metric", self.metric, METRICS)
        check_range("threshold", self.threshold, -1.0, 1.0)
        if isinstance(self.max_neighbors, float):
            check_range("max_neighbors", self.max_neighbors, 0.0, 1.0)
        else:
            check_range("max_neighbors", self.max_neighbors, 0, integer=True)
        check_range("min_tokens", self.min_tokens, 0, integer=True)
        for name in ("global_tokens", "merge", "count_newlines"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}")
        check_range("iqr_factor", self.iqr_factor, 0.0)
        check_choice("sampling", self.sampling, SAMPLINGS)
        check_choice("local_score", self.local_score, LOCAL_SCORES)
        check_range("seed", self.seed, 0, integer=True)
        check_choice("merge_weights", self.merge_weights, MERGE_WEIGHTS)
        check_choice("base", self.base, BASE_MODES)

    @classmethod
    def at_budget(cls, budget: float, num_layers: int | None = None, **options: Any) -> DocCorrelationConfig:
        """A global budget: ``budget`` of each image's content tokens, shared among crops by density."""
        check_range("budget", budget, 0.0, 1.0, low_open=True)
        return cls(keep=float(budget), **options)


def tower_features(q: torch.Tensor, k: torch.Tensor, num_prefix: int, source: str) -> torch.Tensor:
    """Per-patch similarity features ``[R, P, d]`` from a layer's keys ``[R, H, N, d]`` (prefix dropped)."""
    if source == "keys_mean":
        return k.mean(1)[:, num_prefix:]
    r, h, n, d = k.shape
    return k.transpose(1, 2).reshape(r, n, h * d)[:, num_prefix:]


@register_method("doc_correlation", config_cls=DocCorrelationConfig,
                 families=FAMILIES, modalities=("image",))
class DocCorrelationMethod(VisionMethod):
    """Per-crop budgets by information density; global ([CLS] IQR) plus sampled local tokens (TCC)."""

    def __init__(self, config: DocCorrelationConfig):
        super().__init__(config)
        self._hidden: list[torch.Tensor] = []
        self._stage = None
        self._has_cls = True

    # ----- tower signals ------------------------------------------------------------------------------
    @property
    def vision_layer(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys((self.config.shallow_layer, self.config.deep_layer)))

    def attach(self, handle) -> None:
        if self.config.similarity != "hidden":
            return
        # The core captures q/k; the hidden states entering the shallow layer's attention are read here,
        # while (and only while) the core's capture is switched on.
        tower = handle.adapter.tower
        block = tower.blocks[tower.block_index(self.config.shallow_layer)]
        module = tower.attention_input_module(block)
        self._stage = handle.vision_stage

        def hook(mod, args, kwargs):
            if self._stage is None or not self._stage.capture.enabled:
                return None
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if getattr(mod, "batch_first", True) is False:
                hidden = hidden.transpose(0, 1)
            self._hidden.append(hidden.detach())
            return None

        handle.register_hook(module.register_forward_pre_hook(hook, with_kwargs=True))

    def detach(self, handle) -> None:
        self._hidden.clear()
        self._stage = None

    def tower_signals(self, q, k, scale, num_prefix) -> dict[str, torch.Tensor]:
        self._has_cls = num_prefix > 0
        shallow, deep = self.config.shallow_layer, self.config.deep_layer
        qs, ks = (q, k) if isinstance(q, torch.Tensor) else (q[shallow], k[shallow])
        qd, kd = (q, k) if isinstance(q, torch.Tensor) else (q[deep], k[deep])
        out = {
            "shallow_attention": attention_and_keys(qs, ks, scale, num_prefix)["attention"],
            "deep_attention": attention_and_keys(qd, kd, scale, num_prefix)["attention"],
        }
        if self.config.similarity == "hidden":
            rows = ks.shape[0]
            hidden = torch.cat(self._hidden)[-rows:] if self._hidden else None
            self._hidden.clear()
            if hidden is None or hidden.shape[0] != rows:
                raise RuntimeError("doc_correlation: the shallow layer's hidden states were not captured")
            out["similarity"] = hidden[:, num_prefix:]
        else:
            out["similarity"] = tower_features(qs, ks, num_prefix, self.config.similarity)
        return out

    # ----- reduction ----------------------------------------------------------------------------------
    def reduce(self, features: torch.Tensor, context: ReduceContext) -> Reduction:
        cfg = self.config
        layout = context.layout
        device = features.device
        signals = context.signals
        if not signals:
            raise RuntimeError("doc_correlation needs the tower signals of its layers; none were captured "
                               "(precomputed `mm_encoder_outputs` bypass the vision tower)")
        similarity = signals["similarity"].to(device)
        shallow = signals["shallow_attention"].to(device)
        deep = signals["deep_attention"].to(device)
        host_groups = content_groups(layout, per_crop=True)
        groups = [g.to(device) for g in host_groups]
        sizes = [int(g.numel()) for g in host_groups]
        if cfg.keep is not None:
            return self._reduce_fixed(features, context, similarity, shallow, deep, host_groups, groups, sizes)
        # On the device: each crop's neighbour counts. Then the one read of the item: counts and both
        # attentions of every crop, since the budgets follow the densities (water-filling) and the seeded
        # sampler draws on the host generator; the selection runs on the host and its indices go back.
        counts_dev = [neighbor_counts(similarity[g], cfg.threshold, cfg.metric) for g in groups]
        packed = torch.cat([torch.cat([c.double(), shallow[g].double(), deep[g].double()])
                            for c, g in zip(counts_dev, groups)]) if groups else None
        host = packed.cpu() if packed is not None else torch.zeros(0, dtype=torch.float64)
        with host_only():  # host copies from here on
            src, kept_per_group, info = self._select(layout, host, host_groups, sizes, context.generator)
        src = src.to(device)
        if not cfg.merge:
            return Reduction(sources=src, info=info)  # nothing merged: the kept tokens say it all
        outputs = []
        assignment = torch.full((features.shape[0],), -1, dtype=torch.long, device=device)
        base = 0
        for group, kept in zip(groups, kept_per_group):
            kept = kept.to(device)
            weights = (sampling_weights(shallow[group]) if cfg.merge_weights == "attention"
                       else torch.ones(group.numel(), device=device))
            out, slot = merge_dropped(features[group], similarity[group], kept, weights, cfg.metric)
            assignment[group] = torch.where(slot >= 0, slot + base, -1)
            base += kept.numel()
            outputs.append(out)
        slots = src[base:]  # the newline slots, after every crop's tokens
        if slots.numel():
            assignment[slots] = base + torch.arange(slots.numel(), device=device)
            outputs.append(features[slots])
        outs = torch.cat(outputs) if outputs else features[:0]
        return Reduction(sources=src, features=outs, assignment=assignment, info=info)

    def _reduce_fixed(self, features, context, similarity, shallow, deep, host_groups, groups, sizes) -> Reduction:
        """``keep`` set: the item's kept count is fixed by the budget, so densities, per-crop budgets
        (water-filling by sort), the selection (seeded draws made on the host generator with the crops'
        shapes) and the merge stay on the device; nothing is read. ``info`` is read when first looked at."""
        cfg = self.config
        layout = context.layout
        device = features.device
        with host_only():  # layout tables and the config: host ints
            newline = layout.is_newline.nonzero().flatten()
            crop_ids, kinds = _crop_ids(layout, host_groups)
            token_crop = torch.full((layout.num_tokens,), -1, dtype=torch.long)
            for i, group in enumerate(host_groups):
                token_crop[group] = crop_ids[i]
            token_crop = token_crop.tolist()
        slots = int(newline.numel()) if cfg.count_newlines else 0
        fixed = [cfg.base == "keep" and kind == "base" for kind in kinds]
        free = [i for i, f in enumerate(fixed) if not f]
        counts = [neighbor_counts(similarity[g], cfg.threshold, cfg.metric) for g in groups]
        distinct = cfg.local_score == "distinct" or (cfg.local_score == "auto" and not self._has_cls)
        sampling = ("topk" if distinct else "sample") if cfg.sampling == "auto" else cfg.sampling
        if not groups:
            return Reduction(sources=newline.to(device), info={"crops": [], "token_crop": token_crop})
        densities = torch.stack([density_on_device(c, cfg.max_neighbors) for c in counts])
        total = round(cfg.keep * (sum(sizes) + slots)) - slots - sum(n for n, f in zip(sizes, fixed) if f)
        budgets = torch.tensor(sizes, dtype=torch.long, device=device)
        if free:
            free_index = torch.tensor(free, device=device)
            weights = densities[free_index].double() * torch.tensor([sizes[i] for i in free], dtype=torch.float64,
                                                                      device=device)
            lower = [min(cfg.min_tokens, sizes[i]) for i in free]
            budgets = budgets.index_copy(0, free_index, distribute_on_device(total, weights, lower,
                                                                              [sizes[i] for i in free]))
        masks, n_global = [], []
        for i, group in enumerate(groups):
            local = local_scores(counts[i], shallow[group]) if distinct else shallow[group]
            noise = None
            if sampling == "sample":  # the crop's draws, as torch.multinomial makes them, on the host generator
                noise = torch.empty(sizes[i]).exponential_(generator=context.generator).to(device)
            kept, globals_ = choose_tokens_on_device(deep[group], local, budgets[i], global_tokens=cfg.global_tokens,
                                                     iqr_factor=cfg.iqr_factor, noise=noise)
            masks.append(kept)
            n_global.append(globals_)
        # crop after crop, ascending within a crop, as the host selection lists them; the count is known
        order = torch.cat(groups)
        kept_all = torch.cat(masks)
        count = sum(n for n, f in zip(sizes, fixed) if f) + sum(min(cfg.min_tokens, sizes[i]) for i in free)
        count += min(max(total - sum(min(cfg.min_tokens, sizes[i]) for i in free), 0),
                     sum(sizes[i] - min(cfg.min_tokens, sizes[i]) for i in free)) if free else 0
        picked = torch.sort((~kept_all).to(torch.uint8), stable=True).indices[:count]
        src = torch.cat([order[picked], newline.to(device)])
        info = _CropInfo(torch.stack([densities.double(), budgets.double(), torch.stack(n_global).double()]),
                         crop_ids, kinds, sizes, token_crop)
        if not cfg.merge:
            return Reduction(sources=src, info=info)
        slot_of = torch.full((order.numel(),), -1, dtype=torch.long, device=device)
        slot_of[picked] = torch.arange(count, device=device)  # output row of each kept token (order's index)
        merged_rows = []
        assignment = torch.full((features.shape[0],), -1, dtype=torch.long, device=device)
        start = 0
        for group, mask, n in zip(groups, masks, sizes):
            weights = (sampling_weights(shallow[group]) if cfg.merge_weights == "attention"
                       else torch.ones(n, device=device))
            target, merged = merge_into_kept(features[group], similarity[group], mask, weights, cfg.metric)
            rows = slot_of[start : start + n]
            assignment[group] = torch.where(target >= 0, rows[target.clamp_min(0)], -1)
            merged_rows.append(merged)
            start += n
        outputs = torch.cat(merged_rows)[picked]
        if newline.numel():
            newline = newline.to(device)
            assignment[newline] = count + torch.arange(newline.numel(), device=device)
            outputs = torch.cat([outputs, features[newline]])
        return Reduction(sources=src, features=outputs, assignment=assignment, info=info)

    def _select(self, layout, host: torch.Tensor, groups: list[torch.Tensor], sizes: list[int],
                generator) -> tuple[torch.Tensor, list[torch.Tensor], dict]:
        """The kept tokens of every crop from host copies of its counts and attentions (``host``: per crop,
        ``[counts, shallow, deep]`` concatenated), every newline slot after them, and the info."""
        cfg = self.config
        parts = host.split([3 * n for n in sizes])
        counts = [p[:n].long() for p, n in zip(parts, sizes)]
        shallow = [p[n : 2 * n].float() for p, n in zip(parts, sizes)]
        deep = [p[2 * n :].float() for p, n in zip(parts, sizes)]
        crop_ids, kinds = _crop_ids(layout, groups)
        densities = [float(1.0 - redundancy_of(c, cfg.max_neighbors)) for c in counts]
        distinct = cfg.local_score == "distinct" or (cfg.local_score == "auto" and not self._has_cls)
        sampling = ("topk" if distinct else "sample") if cfg.sampling == "auto" else cfg.sampling
        slots = int(layout.is_newline.sum()) if cfg.count_newlines else 0
        budgets = self._budgets(densities, sizes, kinds, slots)

        sources, kept_per_group, crops_info = [], [], []
        token_crop = torch.full((layout.num_tokens,), -1, dtype=torch.long)
        for i, group in enumerate(groups):
            local = local_scores(counts[i], shallow[i]) if distinct else shallow[i]
            kept, n_global = choose_tokens(
                deep[i], local, budgets[i], global_tokens=cfg.global_tokens, iqr_factor=cfg.iqr_factor,
                sampling=sampling, generator=generator,
            )
            token_crop[group] = crop_ids[i]
            sources.append(group[kept])
            kept_per_group.append(kept)
            crops_info.append({"crop": crop_ids[i], "kind": kinds[i], "tokens": sizes[i],
                               "density": round(densities[i], 4), "budget": int(budgets[i]),
                               "kept": int(kept.numel()), "global": n_global})
        src = torch.cat(sources) if sources else torch.zeros(0, dtype=torch.long)
        src = torch.cat([src, layout.is_newline.nonzero().flatten()])  # every newline slot stays
        return src, kept_per_group, {"crops": crops_info, "token_crop": token_crop.tolist()}

    def _budgets(self, densities: list[float], sizes: list[int], kinds: list[str], slots: int = 0) -> list[int]:
        """Per-crop budgets; ``slots`` newline slots are paid out of a global budget first."""
        cfg = self.config
        fixed = [cfg.base == "keep" and kind == "base" for kind in kinds]
        free = [i for i, f in enumerate(fixed) if not f]
        budgets = list(sizes)
        if cfg.keep is None:
            share = adaptive_budgets([densities[i] for i in free], [sizes[i] for i in free], cfg.min_tokens)
        else:
            total = round(cfg.keep * (sum(sizes) + slots)) - slots - sum(s for s, f in zip(sizes, fixed) if f)
            share = global_budgets(total, [densities[i] for i in free], [sizes[i] for i in free], cfg.min_tokens)
        for i, b in zip(free, share):
            budgets[i] = b
        return budgets


def local_scores(counts: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """:func:`distinctiveness` of a crop's tokens, ties broken by ``attention`` (less than one count step)."""
    attention = torch.nan_to_num(attention.float(), nan=0.0).clamp_min(0.0)
    share = attention / attention.max().clamp_min(1e-20)
    return distinctiveness(counts) + share / (counts.numel() + 1)


class _CropInfo(dict):
    """``{"crops": [...], "token_crop": [...]}`` of a fixed-budget reduction, filled from the device the
    first time it is read (when the stats are read), not during the forward. Hand it on as it is: a
    :func:`json.dumps` of it before any read would see an empty dict (the stats and the runner test it
    for truth first, which fills it).

    ``values``: ``[3, crops]`` densities, budgets and global-token counts on the device.
    """

    def __init__(self, values: torch.Tensor, crop_ids: list[int], kinds: list[str], sizes: list[int],
                 token_crop: list[int]):
        super().__init__()
        self._pending = (values, crop_ids, kinds, sizes, token_crop)

    def _fill(self) -> None:
        if self._pending is None:
            return
        values, crop_ids, kinds, sizes, token_crop = self._pending
        self._pending = None
        densities, budgets, n_global = values.tolist()
        crops = [{"crop": c, "kind": k, "tokens": n, "density": round(d, 4), "budget": int(b), "kept": int(b),
                  "global": int(g)} for c, k, n, d, b, g in zip(crop_ids, kinds, sizes, densities, budgets, n_global)]
        dict.update(self, {"crops": crops, "token_crop": token_crop})


def _lazy(name: str):
    method = getattr(dict, name)

    def read(self, *args, **kwargs):
        self._fill()
        return method(self, *args, **kwargs)

    read.__name__ = name
    return read


# Every read fills it first (a truth test or len() too: json and the stats test those before reading).
for _name in ("__getitem__", "__iter__", "__len__", "__contains__", "__repr__", "__eq__", "__reduce_ex__", "get",
              "keys", "items", "values", "copy"):
    setattr(_CropInfo, _name, _lazy(_name))


def _crop_ids(layout, groups: list[torch.Tensor]) -> tuple[list[int], list[str]]:
    """Crop index (base first) and kind (``"base"`` / ``"crop"`` / ``"frame"``) of every token group."""
    source = layout.extra.get("patch_source")
    segment = layout.segment_ids
    ids, kinds = [], []
    for i, g in enumerate(groups):
        first = int(g[0])
        crop = int(source[first, 0]) if source is not None else i
        ids.append(crop)
        kinds.append(layout.segments[int(segment[first])].kind)
    return ids, kinds
