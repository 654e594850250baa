"""ATP: the registered ``atp`` method (inference) and its config."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenreduce.core.config import MethodConfig, check_choice, check_increasing_layers, check_range
from tokenreduce.core.llm import LLMContext
from tokenreduce.core.reduction import LLMMethod
from tokenreduce.core.registry import register_method
from tokenreduce.ops.llm import average_keep, check_layers

from .heads import ThresholdHeads
from .scores import CROSS, SCORE_LAYERS, normal_quantile, redundancy_scores, spatial_sample

# Layers {4, 14, 24} of 32 in the public reimplementation, as fractions of the depth.
DEFAULT_DEPTH_FRACTIONS = (4 / 32, 14 / 32, 24 / 32)


def default_layers(num_layers: int) -> tuple[int, ...]:
    layers = sorted({min(num_layers - 1, max(1, round(f * num_layers))) for f in DEFAULT_DEPTH_FRACTIONS})
    return tuple(layers)


@dataclass
class ATPConfig(MethodConfig):
    """Options of ``atp``.

    Attributes:
        layers: decoder layers at which ATP prunes (each instance keeps its own count there); ``None``:
            4/32, 14/32 and 24/32 of the depth (the public reimplementation's {4, 14, 24} on LLaVA-1.5).
        keep: training-free mode: the share of the current visual tokens each stage keeps by redundancy,
            on average. A token survives if its score exceeds ``mean + k * std`` of its instance's scores
            with ``k`` the normal quantile of ``1 - keep`` (``threshold_rule="mean_std"``: counts vary per
            instance), or the instance's ``1 - keep`` quantile (``"quantile"``: fixed share).
        spatial_rates: spatial augmented pruning: per stage, the share of the visual grid sampled at a
            uniform stride ``round(1/sqrt(rate))`` (per crop / frame) that survives whatever its score; 0 off.
        self_weight: weight of self-modality (vision->vision) importance in the redundancy score, the rest
            being cross-modality (text->vision).
        cross: which text scores cross-modality importance: ``"text"``, the paper's causal attention (only
            text after the image attends to it), or ``"all_text"``, every text token's query against the
            visual keys (ours: with the question before the image, as in question-first prompts, the
            question then scores the visual tokens; at the first layers the text after the image is
            little more than a template).
        score_layer: whose attention the scores come from: ``"previous"``, layer ``K-1``'s (the paper's;
            its queries and keys are already computed), or ``"current"``, layer ``K``'s own projections of
            the hidden states entering it (ours: the queries have read one more layer, which matters when
            ``K = 1`` and layer 0's queries are bare token embeddings).
        heads: trained threshold heads (local directory or hub repo id, see ``ThresholdHeads``): thresholds
            are then predicted per instance and layer instead of the training-free rule. With ``layers``
            unset, the heads' own layers, spatial rates and spatial score scale (saved with them) are used.
            Their ``cross``, ``self_weight`` and ``score_layer``, when saved, always replace the config's:
            the thresholds are in the units of the score they were trained on.
        spatial_score_scale: trained mode: a sampled token's spatial score is ``1 - rate * scale``.
    """

    layers: tuple[int, ...] | None = None
    keep: tuple[float, ...] = (0.5, 0.5, 0.5)
    threshold_rule: str = "mean_std"
    spatial_rates: tuple[float, ...] = (0.25, 0.0625, 0.0)
    self_weight: float = 0.5
    cross: str = "text"
    score_layer: str = "previous"
    heads: str | None = None
    spatial_score_scale: float = 3.0

    def validate(self) -> None:
        self.keep = tuple(self.keep)
        self.spatial_rates = tuple(self.spatial_rates)
        if self.layers is not None:
            self.layers = check_increasing_layers("layers", self.layers)
            if not self.layers:  # an empty tuple would read as "unset" (the default layers) downstream
                raise ValueError("`layers` must hold at least one decoder layer (or be None for the defaults), got ()")
        for k in self.keep:
            check_range("keep", k, 0.0, 1.0, low_open=True)
        for r in self.spatial_rates:
            check_range("spatial_rates", r, 0.0, 1.0)
        check_choice("threshold_rule", self.threshold_rule, ("mean_std", "quantile"))
        check_range("self_weight", self.self_weight, 0.0, 1.0)
        check_choice("cross", self.cross, CROSS)
        check_choice("score_layer", self.score_layer, SCORE_LAYERS)
        check_range("spatial_score_scale", self.spatial_score_scale, 0.0)
        n = len(self.layers) if self.layers is not None else len(DEFAULT_DEPTH_FRACTIONS)
        for name in ("keep", "spatial_rates"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"`{name}` needs one value per pruning layer ({n}), got {getattr(self, name)}")

    @classmethod
    def at_budget(cls, budget: float, num_layers: int | None = None, **options) -> ATPConfig:
        """Training-free ATP averaging about ``budget`` of the visual tokens over the layers (or keeping
        about ``budget`` after the last stage when ``num_layers`` is unknown).

        Spatial sampling alone keeps a floor of tokens; on a shallow LLM the default rates' floor can exceed
        the budget. Unless ``spatial_rates`` is given, the default rates are then scaled down (by 1/2, 1/4, 1/8,
        then none) until the floor fits the budget.
        """
        check_range("budget", budget, 0.0, 1.0, low_open=True)
        explicit = "spatial_rates" in options
        base_rates = tuple(options.pop("spatial_rates", (0.25, 0.0625, 0.0)))
        layers = options.pop("layers", None)
        if num_layers is not None:
            layers = tuple(layers or default_layers(num_layers))
            base_rates = base_rates[: len(layers)] + (0.0,) * (len(layers) - len(base_rates))

        def fractions(kappa: float, rates: tuple[float, ...]) -> list[float]:
            out, current = [], 1.0
            for r in rates:
                current *= min(1.0, kappa + (1.0 - kappa) * r)
                out.append(current)
            return out

        def achieved(kappa: float, rates: tuple[float, ...]) -> float:
            if num_layers is None:
                return fractions(kappa, rates)[-1]
            return average_keep(list(layers), fractions(kappa, rates), num_layers)

        rates = base_rates
        if not explicit:
            for scale in (1.0, 0.5, 0.25, 0.125, 0.0):
                rates = tuple(r * scale for r in base_rates)
                if achieved(1e-3, rates) <= budget:
                    break
        if achieved(1e-3, rates) > budget:
            raise ValueError(
                f"atp with stages at {layers} and spatial rates {rates} cannot reach {budget:.0%} of the visual "
                f"tokens{'' if num_layers is None else f' averaged over {num_layers} layers'}"
            )
        low, high = 1e-3, 1.0
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (mid, high) if achieved(mid, rates) < budget else (low, mid)
        kappa = (low + high) / 2
        return cls(layers=layers, keep=(kappa,) * len(rates), spatial_rates=rates, **options)


@register_method("atp", config_cls=ATPConfig)
class ATPMethod(LLMMethod):
    """Adaptive token pruning inside the LLM, per layer and per instance, with spatial augmented pruning."""

    def llm_layers(self, num_layers: int) -> list[int]:
        self.heads = None
        self.spatial_rates = self.config.spatial_rates
        self.spatial_score_scale = self.config.spatial_score_scale
        self.cross, self.self_weight = self.config.cross, self.config.self_weight
        self.score_layer = self.config.score_layer
        layers = self.config.layers or default_layers(num_layers)
        if self.config.heads is not None:
            self.heads = ThresholdHeads.from_pretrained(self.config.heads)
            self.cross = self.heads.cross or self.cross
            if self.heads.self_weight is not None:
                self.self_weight = self.heads.self_weight
            self.score_layer = self.heads.score_layer or self.score_layer
            if self.config.layers is None:  # the heads' own stages and SAP settings
                layers = self.heads.layers
                if self.heads.spatial_rates is not None:
                    self.spatial_rates = self.heads.spatial_rates
                if self.heads.spatial_score_scale is not None:
                    self.spatial_score_scale = self.heads.spatial_score_scale
                if len(self.spatial_rates) != len(layers):
                    raise ValueError(
                        f"`heads` prune at layers {list(layers)} but carry no spatial rates; set `layers` and "
                        f"`spatial_rates` to what they were trained with"
                    )
        self.layers = check_layers("layers", tuple(layers), num_layers)
        if self.heads is not None and self.heads.layers != self.layers:
            raise ValueError(
                f"`heads` were trained for layers {self.heads.layers}, the config prunes at {self.layers}; "
                "set `layers` to match"
            )
        return self.layers

    def thresholds(self, ctx: LLMContext, scores: list[torch.Tensor], features: torch.Tensor):
        """Per row ``(theta_redundancy, theta_spatial)``: from the heads, or the training-free rule."""
        stage = self.layers.index(ctx.layer)
        if self.heads is not None:
            heads = self.heads.to(features.device)
            with torch.no_grad():
                theta_r, theta_s = heads(ctx.layer, features)
            return theta_r, theta_s
        keep = self.config.keep[stage]
        theta = []
        for s in scores:
            if s.numel() == 0:
                theta.append(s.new_zeros(()))
            elif self.config.threshold_rule == "quantile":
                theta.append(torch.quantile(s.float(), 1.0 - keep) if keep < 1 else s.min() - 1)
            else:
                k = normal_quantile(1.0 - keep) if keep < 1 else float("-inf")
                std = s.float().std() if s.numel() > 1 else s.new_zeros(())
                theta.append(s.float().mean() + k * std)
        theta_r = torch.stack(theta) if theta else features.new_zeros(0)
        return theta_r, torch.full_like(theta_r, float("-inf"))  # sampled tokens always survive

    def select(self, ctx: LLMContext) -> list[torch.Tensor]:
        stage = self.layers.index(ctx.layer)
        rate = self.spatial_rates[stage]
        if self.score_layer == "current":
            ctx = ctx.at_current_layer()
        scores, features = redundancy_scores(ctx, self.self_weight, self.cross)
        theta_r, theta_s = self.thresholds(ctx, scores, features)
        keeps = []
        for r, s in enumerate(scores):
            keep = s > theta_r[r]
            if rate > 0:
                sampled = spatial_sample(ctx, r, rate)
                spatial_score = 1.0 - rate * self.spatial_score_scale
                keep |= sampled & (spatial_score > theta_s[r])
            if s.numel():  # nothing passed: the best-scored token stays
                keep |= (torch.arange(s.numel(), device=s.device) == s.argmax()) & ~keep.any()
            keeps.append(keep)
        return _indices(keeps)


def _indices(keeps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per row, the positions of the ``True`` entries, ascending. The counts are read from the device in one
    transfer for all rows: the single host wait of the stage, the one that sizes what the next layers see."""
    if not keeps:
        return []
    counts = torch.stack([k.sum() for k in keeps]).tolist()
    # stable sort puts the kept positions first, in their original order
    return [torch.sort((~k).to(torch.uint8), stable=True).indices[:n] for k, n in zip(keeps, counts)]
