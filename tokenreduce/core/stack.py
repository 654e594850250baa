"""Stacks: several methods in one wrap, at most one per stage, run in stage order.

``tr.wrap(model, [tr.DivPruneConfig(keep=0.5), tr.FastVConfig(layer=2)])``, ``tr.wrap(model, ["divprune",
"fastv"])`` and the joined text spelling ``tr.wrap(model, "divprune+fastv")`` wrap one model with a stack.
The config is :class:`~tokenreduce.core.config.StackConfig`; the handle sees one method: :class:`StackMethod` answers every stage's questions with the member acting in
that stage, so the core's bookkeeping (positions, masks, caches, stats) is the same as for one method.

Rules:

- At most one method per stage (``vision``, ``projector``, ``llm``, ``decode``). A method occupies every
  stage its class acts in (VisionZip: vision and projector), so a vision-only method (ToMe) stacks with a
  projector method, VisionZip does not. Members run in stage order whatever order they are given in.
- Budgets compose: each member's ``keep`` applies to the tokens it receives (an in-LLM method's fraction
  is of the visual tokens the projector member kept).
- ``at_budget`` for a stack (:func:`stack_config` with ``budget``) gives every member that changes the token
  count an equal factor of the overall budget: with ``n`` such members each runs at ``budget ** (1 / n)``
  through its own ``at_budget``. The layer-mean shares multiply (a projector member keeping ``p`` of the
  tokens, an in-LLM member averaging ``q`` of what it receives: ``p * q`` of the full visual-token x layer
  work), so the stack lands on ``budget`` with each stage removing the same share of the work. Decode
  members take no budget.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from typing import Any

import torch

from tokenreduce.core.config import (
    STACK_SEPARATOR,
    MethodConfig,
    StackConfig,
    build_config,
    check_range,
    config_at_budget,
    order_members,
)
from tokenreduce.core.layout import TokenLayout
from tokenreduce.core.reduction import Method, ReduceContext, Reduction, slots_of
from tokenreduce.core.registry import STAGES, MethodSpec, get_method
from tokenreduce.core.stats import timer

SEPARATOR = STACK_SEPARATOR
#: Stages that change the visual-token count; their members share a stack's budget.
TOKEN_STAGES = ("vision", "projector", "llm")


def is_stack_name(name: Any) -> bool:
    """Whether ``name`` is the joined spelling of a stack (``"divprune+fastv"``)."""
    return isinstance(name, str) and SEPARATOR in name


def split_name(name: str) -> list[str]:
    """The member names of a joined spelling; an empty part raises naming the spelling."""
    parts = [p.strip() for p in name.split(SEPARATOR)]
    if not all(parts):
        raise ValueError(f"stack {name!r} has an empty method name; join method names with '+', e.g. 'divprune+fastv'")
    return parts


def member_options(names: Sequence[str], options: dict[str, Any], stack: str) -> dict[str, dict[str, Any]]:
    """Per member, its options from ``options``: ``"fastv.layer": 3`` or ``fastv={"layer": 3}``.

    An option that names no member of the stack raises, with a did-you-mean among the members.
    """
    out: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key, value in options.items():
        if key in out and isinstance(value, dict):
            out[key].update(value)
            continue
        name, dot, option = key.partition(".")
        if dot and name in out:
            out[name][option] = value
            continue
        if not dot:
            raise TypeError(
                f"option {key!r} of stack {stack!r} must name its method, e.g. '{names[0]}.{key}'"
            )
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TypeError(f"option {key!r} names method {name!r}, which is not in stack {stack!r}{hint}")
    return out


def stack_config(
    members: str | Sequence[str | MethodConfig],
    budget: float | None = None,
    num_layers: int | None = None,
    **options: Any,
) -> MethodConfig:
    """The stack of ``members`` (a joined spelling, or names and/or configs), with per-member ``options``
    (:func:`member_options`) and, with ``budget``, each token-changing member at its equal share (module
    docstring). A single member gives that member's own config."""
    if isinstance(members, str):
        members = split_name(members)
    members = list(members)
    if not members:
        raise ValueError("a stack needs at least one method, got an empty list")
    for m in members:
        if not isinstance(m, (str, MethodConfig)) or isinstance(m, StackConfig):
            raise TypeError(f"a stack's entries must be method names or method configs, got {type(m).__name__}")
    if budget is not None:
        check_range("budget", budget, 0.0, 1.0, low_open=True)
    names = [m if isinstance(m, str) else m.method for m in members]
    label = SEPARATOR.join(names)
    specs = [get_method(n) for n in names]
    order_members(specs)  # a clash is told before any option or budget is looked at
    per_member = member_options(names, options, label)
    given = [n for n, m in zip(names, members) if isinstance(m, MethodConfig) and per_member[n]]
    if given:
        raise TypeError(f"options were given for method {given[0]!r}, whose config object was given; set them on it")
    sharing = [n for n, s in zip(names, specs) if set(s.stages) & set(TOKEN_STAGES)]
    configs = []
    for name, member in zip(names, members):
        if isinstance(member, MethodConfig):
            if budget is not None:
                raise TypeError(f"`budget` was given with the config object of method {name!r}; give names, or set keep")
            configs.append(member)
        elif budget is not None and name in sharing:
            share = float(budget) ** (1.0 / len(sharing))
            configs.append(config_at_budget(name, share, num_layers, **per_member[name]))
        else:
            configs.append(build_config(name, **per_member[name]))
    if len(configs) == 1:
        return configs[0]
    return StackConfig(configs=tuple(configs))


def stack_spec(config: StackConfig) -> MethodSpec:
    """The spec the handle sees for a stack: its members' stages and the families all of them support."""
    specs = [get_method(c.method) for c in config.configs]
    families: tuple[str, ...] | None = None
    for s in specs:
        if s.families is not None:
            families = s.families if families is None else tuple(f for f in families if f in s.families)
    stages = tuple(st for st in STAGES if any(st in s.stages for s in specs))
    reducers = [(c, s) for c, s in zip(config.configs, specs) if {"vision", "projector"} & set(s.stages)]
    modalities = (reducers[0][0].modalities or reducers[0][1].modalities) if reducers else ("image", "video")
    return MethodSpec(
        name=config.method, config_cls=StackConfig, method_cls=StackMethod, stages=stages,
        description=" then ".join(s.name for s in specs), families=families, modalities=tuple(modalities),
    )


def spec_of(config: MethodConfig) -> MethodSpec:
    """The spec of a method's config, or of a stack's."""
    return stack_spec(config) if isinstance(config, StackConfig) else get_method(config.method)


def _slots(red: Reduction, n: int) -> torch.Tensor:
    """``[n]`` output slot of every input token (``-1``: dropped), from the reduction's assignment or sources."""
    return red.assignment if red.assignment is not None else slots_of(red.sources, n)


class StackMethod(Method):
    """The methods of a :class:`StackConfig` as one method: each stage's hooks go to its member."""

    def __init__(self, config: StackConfig):
        super().__init__(config)
        self.members: list[Method] = [get_method(c.method).method_cls(c) for c in config.configs]
        self.stages = tuple(st for st in STAGES if any(st in m.stages for m in self.members))
        self.name = config.method
        self.reducers = [m for m in self.members if {"vision", "projector"} & set(m.stages)]
        self.vision_layer = next((m.vision_layer for m in self.reducers if m.vision_layer is not None), None)
        self.changes_encoder_output = any(m.changes_encoder_output for m in self.reducers)
        self.uses_text = any(m.uses_text for m in self.reducers)

    def member(self, stage: str) -> Method | None:
        """The member acting in ``stage``, or None."""
        return next((m for m in self.members if stage in m.stages), None)

    def attach(self, handle: Any) -> None:
        for m in self.members:
            m.attach(handle)

    def detach(self, handle: Any) -> None:
        for m in reversed(self.members):
            m.detach(handle)

    # ----- vision and projector stages: the reducers in order, each on the previous one's output -----
    def tower_signals(self, q: Any, k: Any, scale: float, num_prefix: int) -> dict[str, torch.Tensor]:
        owner = next(m for m in self.reducers if m.vision_layer is not None)
        return owner.tower_signals(q, k, scale, num_prefix)

    def reduce(self, features: torch.Tensor, context: ReduceContext) -> Reduction:
        first = self.reducers[0].reduce(features, context).sorted()
        if len(self.reducers) == 1:
            return first
        # A vision-only member (ToMe) then a projector member: the second reduces the first's output tokens,
        # as a flat sequence (merging leaves no grid), and its sources are mapped back to the original tokens.
        inner = first.output_features(features)
        ctx = dataclasses.replace(context, layout=TokenLayout.flat(context.modality, inner.shape[0]), signals={})
        with timer(features.device) as elapsed:
            second = self.reducers[1].reduce(inner, ctx).sorted()
        sources = first.sources[second.sources.to(first.sources.device)]
        assignment = None
        if first.assignment is not None or second.assignment is not None:
            outer = _slots(first, context.layout.num_tokens)
            later = _slots(second, inner.shape[0])
            assignment = torch.where(outer >= 0, later[outer.clamp_min(0)], outer)
        info = {**first.info, "projector_stage": {**second.info, "method": self.reducers[1].name,
                                                  "tokens_in": int(inner.shape[0]), "reducer_ms": elapsed}}
        return Reduction(sources=sources, features=second.output_features(inner), assignment=assignment, info=info)

    # ----- llm stage ---------------------------------------------------------------------------------
    def llm_layers(self, num_layers: int) -> list[int]:
        return self.member("llm").llm_layers(num_layers)

    def select(self, ctx: Any) -> list[torch.Tensor]:
        return self.member("llm").select(ctx)

    # ----- decode stage ------------------------------------------------------------------------------
    def generation_hooks(self, handle: Any, inputs: dict[str, Any]) -> dict[str, list]:
        return self.member("decode").generation_hooks(handle, inputs)

    def after_generate(self, handle: Any, inputs: dict[str, Any], output: Any) -> None:
        self.member("decode").after_generate(handle, inputs, output)


def method_in(handle: Any, stage: str) -> Method | None:
    """The method a handle runs in ``stage`` (its stack's member there, or its one method if it acts there)."""
    method = handle.method
    if isinstance(method, StackMethod):
        return method.member(stage)
    return method if stage in method.stages else None


def config_in(config: MethodConfig, stage: str) -> MethodConfig:
    """The config acting in ``stage``: a stack's member there, else ``config`` itself."""
    if not isinstance(config, StackConfig):
        return config
    member = config.member(stage)
    if member is None and stage == "projector":  # a vision-only member reduces like a projector one
        member = config.member("vision")
    return member or config
