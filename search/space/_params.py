"""A search space's parameters (choice, range, constant), their parsing and small helpers."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Union

from search.config import ConfigError, TrialConfig



_FIELD_TYPES = {f.name: str(f.type) for f in fields(TrialConfig)}
VALID_KEYS = (*_FIELD_TYPES, "max_epochs")
# Children that only exist under one augmentation policy: child -> policy.
POLICY_CHILDREN = {
    "randaugment_num_ops": "randaugment",
    "randaugment_magnitude": "randaugment",
    "augmix_severity": "augmix",
}
# Parameters that only mean something when backbone stages train (freeze depth below the
# backbone's stage count); a linear probe keeps their defaults, so TPE is not fed noise.
FINETUNE_CHILDREN = ("backbone_lr_mult", "lr_decay")
# Suggestion order: the parents come before the parameters that depend on them.
_ORDER = ("backbone", "freeze_depth", "augmentation", *POLICY_CHILDREN)
_RANGE_KEYS = {"low", "high", "log", "step"}
DEFAULT_MAX_EPOCHS = 6


@dataclass(frozen=True)
class Choice:
    """A categorical parameter: one of `values`."""

    values: tuple  # the choices, in the order written


@dataclass(frozen=True)
class Range:
    """A numeric range: suggest_int for int fields, suggest_float for float fields."""

    low: float  # inclusive
    high: Union[float, str]  # inclusive; "all" for freeze_depth: the backbone's stage count
    log: bool = False  # sample on a log scale
    step: Union[float, None] = None  # discretisation step; None: continuous (int: 1)
    is_int: bool = False  # int field (suggest_int) or float field (suggest_float)


@dataclass(frozen=True)
class Constant:
    """A fixed value, the same in every trial (not an Optuna parameter)."""

    value: Any


Param = Union[Choice, Range, Constant]


def _nearest(p: Param, target: Any) -> Any:
    """`target` moved into a parameter's bounds: clipped into a range, the nearest choice."""
    if isinstance(p, Range):
        high = float(p.high)
        v = min(max(float(target), p.low), high)
        return int(round(v)) if p.is_int else v
    if isinstance(p, Choice):
        if target in p.values:
            return target
        numeric = [v for v in p.values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if numeric and isinstance(target, (int, float)):
            return min(numeric, key=lambda v: abs(math.log(v / target)) if v > 0 and target > 0 else abs(v - target))
        return p.values[0]
    return p.value


def _middle(p: Param) -> Any:
    """A range's (geometric, when log) midpoint; a choice's first value."""
    if isinstance(p, Choice):
        return p.values[0]
    if isinstance(p, Constant):
        return p.value
    high = float(p.high)
    mid = math.sqrt(p.low * high) if p.log else (p.low + high) / 2
    if p.step:
        mid = p.low + round((mid - p.low) / p.step) * p.step
    return int(round(mid)) if p.is_int else mid


def _values(name: str, params: Mapping[str, Param]) -> list:
    p = params.get(name)
    if isinstance(p, Choice):
        return list(p.values)
    if isinstance(p, Constant):
        return [p.value]
    if isinstance(p, Range):
        return [p.low, p.high]
    return [getattr(TrialConfig, name)]


def _lowest(name: str, params: Mapping[str, Param]) -> float:
    return min(float(v) for v in _values(name, params) if v != "all")


def _describe(p: Param | None) -> str:
    if isinstance(p, Range):
        return f"{p.low:g}..{float(p.high):g}"
    if isinstance(p, Choice):
        return "/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in p.values)
    if isinstance(p, Constant):
        return f"{p.value:g}" if isinstance(p.value, float) else str(p.value)
    return "1 (the default)"


def _kind(p: Param) -> str:
    return {Choice: "choice", Range: "range", Constant: "constant"}[type(p)]


def _stages(backbone: str) -> int:
    from search import backbones

    return int(backbones.num_stages(backbone))


def _current(name: str, params: Mapping[str, Param], values: Mapping[str, Any]) -> Any:
    """The value a parent parameter has in this trial: suggested, constant, or the default."""
    if name in values:
        return values[name]
    p = params.get(name)
    if isinstance(p, Constant):
        return p.value
    return getattr(TrialConfig, name)


def _max_epochs(items: dict[str, Any], source: str) -> int:
    """Pops `max_epochs` (or a constant `epochs`, its synonym) from the mapping."""
    value = items.pop("max_epochs", None)
    if "epochs" in items:
        e = items.pop("epochs")
        if isinstance(e, (list, Mapping)):
            raise ConfigError(f"{source}: epochs is the trials' budget, not a parameter; use max_epochs: N, got {e!r}")
        value = e if value is None else value
    if value is None:
        return DEFAULT_MAX_EPOCHS
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10_000:
        raise ConfigError(f"{source}: max_epochs must be an integer between 1 and 10000, got {value!r}")
    return value


def _number(name: str, key: str, value: Any, source: str) -> float:
    """A range bound as a number; PyYAML reads `1e-5` (no dot) as a string, so accept that."""
    if isinstance(value, bool):
        raise ConfigError(f"{source}: {name}.{key} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{source}: {name}.{key} must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{source}: {name}.{key} must be a finite number, got {value!r}")
    return value


def _check_value(name: str, value: Any, source: str) -> Any:
    """Checks one concrete value against TrialConfig's rules; returns it coerced to the field type."""
    if name == "freeze_depth" and value == "all":
        return value
    try:
        cfg = TrialConfig.from_dict({name: value}, source=source)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(source) else f"{source}: {msg}") from None
    return getattr(cfg, name)


def _parse(name: str, value: Any, source: str) -> Param:
    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigError(f"{source}: {name} is an empty list of choices; give at least one value")
        values = tuple(_check_value(name, v, source) for v in value)
        for v in values:
            if not (v is None or isinstance(v, (bool, int, float, str))):
                raise ConfigError(f"{source}: the choices of {name} must be plain values, got {v!r}")
        return Choice(values)
    if isinstance(value, Mapping):
        return _parse_range(name, value, source)
    return Constant(_check_value(name, value, source))


def _parse_range(name: str, value: Mapping[str, Any], source: str) -> Range:
    extra = sorted(str(k) for k in value if k not in _RANGE_KEYS)
    if extra or "low" not in value or "high" not in value:
        raise ConfigError(
            f"{source}: {name}: a range is {{low, high}} with optional log: true or step, got {dict(value)!r}"
        )
    ftype = _FIELD_TYPES[name]
    if ftype not in ("int", "float", "FreezeDepth"):
        raise ConfigError(f"{source}: {name} is not numeric; give a list of choices, got {dict(value)!r}")
    is_int = ftype != "float"
    log = value.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{source}: {name}.log must be true or false, got {log!r}")
    low = _number(name, "low", value["low"], source)
    high_raw = value["high"]
    high: Any = "all" if name == "freeze_depth" and high_raw == "all" else _number(name, "high", high_raw, source)
    step = value.get("step")
    if step is not None:
        step = _number(name, "step", step, source)
        if step <= 0:
            raise ConfigError(f"{source}: {name}.step must be > 0, got {step!r}")
        if log:
            raise ConfigError(f"{source}: {name}: log and step cannot be combined (Optuna's rule)")
    if is_int:
        for key, v in (("low", low), ("high", high), ("step", step)):
            if v is not None and v != "all" and float(v) != int(v):
                raise ConfigError(f"{source}: {name}.{key} must be an integer, got {v!r}")
        low = int(low)
        high = high if high == "all" else int(high)
        step = None if step is None else int(step)
    else:
        low, high = float(low), float(high)
    if high != "all" and low > high:
        raise ConfigError(f"{source}: {name}: inverted range, low {low!r} > high {high!r}")
    if log and low <= 0:
        raise ConfigError(f"{source}: {name}: a log range needs low > 0, got low {low!r}")
    _check_value(name, low, source)
    if high != "all":
        _check_value(name, high, source)
    return Range(low=low, high=high, log=log, step=step, is_int=is_int)
