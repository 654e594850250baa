"""Method configs: dataclasses that validate on construction and round-trip through JSON.

Every method's options live in a dataclass deriving from :class:`MethodConfig`. A bad value raises a
``ValueError`` naming the parameter, the value and what is accepted; an option that does not belong to the
method raises a ``TypeError`` listing the options that do.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from tokenreduce.core.registry import STAGES, MethodSpec, get_method

CONFIG_NAME = "tokenreduce_config.json"
#: Joins the names of a stack's methods in its text spelling (``"divprune+fastv"``).
STACK_SEPARATOR = "+"
MODALITIES = ("image", "video")


def check_keep(name: str, value: Any) -> None:
    """A budget: an int >= 1 is a token count, a float in (0, 1] is a fraction of the visual tokens."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"`{name}` must be a token count (int >= 1) or a fraction (float in (0, 1]), got {value!r}"
        )
    if isinstance(value, int) and value < 1:
        raise ValueError(f"`{name}` as a token count must be >= 1, got {value}")
    if isinstance(value, float) and not (0.0 < value <= 1.0):
        raise ValueError(f"`{name}` as a fraction must be in (0, 1], got {value}")


def resolve_keep(keep: int | float, total: int) -> int:
    """Number of tokens a budget keeps out of ``total`` (at least one, at most ``total``)."""
    if total <= 0:
        return 0
    count = keep if isinstance(keep, int) else math.ceil(keep * total - 1e-9)
    return max(1, min(total, int(count)))


def check_range(
    name: str, value: Any, low: float | None = None, high: float | None = None, *, integer: bool = False,
    low_open: bool = False, high_open: bool = False,
) -> None:
    """Raise a ValueError unless ``value`` is a number in the given interval."""
    kind = "an int" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (not integer and math.isnan(value)):
        raise ValueError(f"`{name}` must be {kind}, got {value!r}")
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    interval = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"`{name}` must be in {interval}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"`{name}` must be in {interval}, got {value!r}")


def check_increasing_layers(name: str, layers: Iterable[Any]) -> tuple[int, ...]:
    """Decoder-layer indices: ints >= 1, strictly increasing; returned as a tuple."""
    layers = tuple(layers)
    for layer in layers:
        check_range(name, layer, 1, integer=True)
    if list(layers) != sorted(set(layers)):
        raise ValueError(f"`{name}` must be strictly increasing, got {layers}")
    return layers


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")


@dataclasses.dataclass
class MethodConfig:
    """Options every method shares.

    Attributes:
        renumber_positions: By default a kept token keeps its original position id (for Qwen: its
            t/h/w M-RoPE ids) and a merged token takes the position of the token it is placed at. When
            True, the reduced sequence gets consecutive positions instead, as if it had been written that
            way.
        modalities: Which inputs the method reduces (``"image"``, ``"video"``); ``None`` uses the method's
            default. Inputs of other modalities pass through untouched.
    """

    method: ClassVar[str] = ""

    renumber_positions: bool = False
    modalities: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.modalities is not None:
            if isinstance(self.modalities, str):
                self.modalities = (self.modalities,)
            self.modalities = tuple(self.modalities)
            if not self.modalities:  # an empty tuple would read as "unset" downstream
                raise ValueError(f"`modalities` must name at least one of {MODALITIES} (or be None), got ()")
            for m in self.modalities:
                check_choice("modalities", m, MODALITIES)
        if not isinstance(self.renumber_positions, bool):
            raise ValueError(f"`renumber_positions` must be a bool, got {self.renumber_positions!r}")
        self.validate()

    def validate(self) -> None:
        """Check method-specific fields; subclasses override and raise ValueError on a bad value."""

    @classmethod
    def at_budget(cls, budget: float, num_layers: int | None = None, **options: Any) -> MethodConfig:
        """Config keeping about ``budget`` (a fraction in (0, 1]) of the visual tokens on average.

        Evaluation grids and the shared tests set budgets through this; methods whose budget is not a
        single ``keep`` option (layer schedules, adaptive methods) override it. ``num_layers`` (the LLM's
        depth) lets in-LLM methods state the budget averaged over layers; others ignore it.
        """
        check_range("budget", budget, 0.0, 1.0, low_open=True)
        names = {f.name for f in dataclasses.fields(cls)}
        if "keep" not in names:
            raise NotImplementedError(f"{cls.__name__} has no `keep` option; it must override at_budget")
        return cls(keep=float(budget), **options)

    # ----- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the config as ``tokenreduce_config.json`` into ``directory`` (created if needed)."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        target = path / CONFIG_NAME
        target.write_text(self.to_json() + "\n")
        return target

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        """Build the config of the method named in ``data["method"]`` (or of ``cls`` if it is concrete)."""
        data = dict(data)
        if "stack" in data and cls is MethodConfig:
            return stack_from_dict(data)
        name = data.pop("method", None) or cls.method
        if not name:
            raise ValueError("config dict has no `method` entry")
        config_cls = get_method(name).config_cls
        if cls is not MethodConfig and config_cls is not cls:
            raise ValueError(f"config is for method {name!r}, not {cls.method!r}")
        return build_config(name, **data)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> MethodConfig:
        """Read a config written by :meth:`save_pretrained` (a directory or the JSON file itself)."""
        p = Path(path)
        if p.is_dir():
            p = p / CONFIG_NAME
        if not p.is_file():
            raise FileNotFoundError(f"no tokenreduce config at {p}")
        return cls.from_dict(json.loads(p.read_text()))


def _coerce(field: dataclasses.Field, value: Any) -> Any:
    # JSON has no tuples: turn lists back into tuples where the default is a tuple.
    if isinstance(value, list) and isinstance(field.default, tuple):
        return tuple(value)
    if isinstance(value, list) and field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = field.default_factory()  # type: ignore[misc]
        if isinstance(default, tuple):
            return tuple(value)
    if field.name == "modalities" and isinstance(value, list):
        return tuple(value)
    return value


BUDGET_MEANING = "the share of the full visual-token x layer work, in (0, 1]; in-LLM methods average over layers"


def _checked_options(method: str, options: dict[str, Any]) -> tuple[type[MethodConfig], dict[str, Any]]:
    config_cls = get_method(method).config_cls
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise TypeError(
            f"method {method!r} got unexpected option(s) {', '.join(map(repr, unknown))}; "
            f"accepted options: {', '.join(sorted(fields))}, or `budget` ({BUDGET_MEANING})"
        )
    return config_cls, {k: _coerce(fields[k], v) for k, v in options.items()}


def build_config(method: str, **options: Any) -> MethodConfig:
    """Config of ``method`` from keyword options; unknown options raise a TypeError listing accepted ones."""
    config_cls, options = _checked_options(method, options)
    return config_cls(**options)


def config_at_budget(method: str, budget: float, num_layers: int | None = None, **options: Any) -> MethodConfig:
    """Config of ``method`` at ``budget`` (:data:`BUDGET_MEANING`) through its ``at_budget``, with its native
    options alongside; an option the budget itself sets (``keep``, say) is refused in one line."""
    config_cls, options = _checked_options(method, options)
    try:
        return config_cls.at_budget(budget, num_layers=num_layers, **options)
    except TypeError as err:
        clash = re.search(r"multiple values for keyword argument '(\w+)'", str(err))
        if clash is None:
            raise
        raise TypeError(
            f"`budget` sets `{clash.group(1)}` of method {method!r}; give `budget` or `{clash.group(1)}`, not both"
        ) from None


# ----- stacks: several methods' configs, one per stage (run by tokenreduce.core.stack) -----------------


def _first_stage(spec: MethodSpec) -> int:
    return min(STAGES.index(s) for s in spec.stages)


def order_members(specs: Sequence[MethodSpec]) -> list[int]:
    """Indices of ``specs`` in stage order; two members acting in one stage raise naming both."""
    owner: dict[str, str] = {}
    for spec in specs:
        for stage in spec.stages:
            if stage in owner:
                other = owner[stage]
                what = f"method {spec.name!r} twice" if other == spec.name else f"methods {other!r} and {spec.name!r}"
                raise ValueError(
                    f"a stack takes at most one method per stage; {what} act in the {stage} stage "
                    f"(stages: {', '.join(STAGES)})"
                )
            owner[stage] = spec.name
    return sorted(range(len(specs)), key=lambda i: _first_stage(specs[i]))


@dataclasses.dataclass
class StackConfig(MethodConfig):
    """Several methods' configs, at most one per stage, kept in stage order.

    Attributes:
        configs: the members' configs. ``renumber_positions`` and ``modalities`` belong to the members
            (each stage renumbers or reduces by its own member's config); the stack's own stay unset.
    """

    configs: tuple[MethodConfig, ...] = ()

    @property
    def method(self) -> str:  # type: ignore[override]
        """The joined spelling, e.g. ``"divprune+fastv"``."""
        return STACK_SEPARATOR.join(c.method for c in self.configs)

    def validate(self) -> None:
        configs = tuple(self.configs)
        for c in configs:
            if not isinstance(c, MethodConfig) or isinstance(c, StackConfig):
                raise ValueError(f"`configs` must hold method configs (not stacks), got {c!r}")
        if len(configs) < 2:
            raise ValueError(f"`configs` of a stack must hold at least 2 method configs, got {len(configs)}")
        if self.renumber_positions or self.modalities is not None:
            raise ValueError(
                "`renumber_positions` and `modalities` of a stack are set on its methods' configs, not on the stack"
            )
        specs = [get_method(c.method) for c in configs]
        self.configs = tuple(configs[i] for i in order_members(specs))

    def member(self, stage: str) -> MethodConfig | None:
        """The config of the member acting in ``stage``, or None."""
        for c in self.configs:
            if stage in get_method(c.method).stages:
                return c
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "stack": [c.to_dict() for c in self.configs]}

    @classmethod
    def at_budget(cls, budget: float, num_layers: int | None = None, **options: Any) -> StackConfig:
        raise TypeError("a stack's budget needs its methods: use stack_config(['divprune', 'fastv'], budget=...)")


def stack_from_dict(data: dict[str, Any]) -> StackConfig:
    """The stack a ``StackConfig.to_dict`` wrote (its ``"stack"`` entry holds the members' dicts)."""
    members = data.get("stack")
    if not isinstance(members, list):
        raise ValueError(f"a stack config's `stack` entry must be a list of method configs, got {members!r}")
    return StackConfig(configs=tuple(MethodConfig.from_dict(m) for m in members))


