"""`SearchSpace`: a validated space, its define-by-run function, baseline and recipe portfolio."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping, Union

from search.config import ConfigError, TrialConfig, load_yaml
from search.space._params import (
    _FIELD_TYPES,
    _ORDER,
    DEFAULT_MAX_EPOCHS,
    FINETUNE_CHILDREN,
    POLICY_CHILDREN,
    VALID_KEYS,
    Choice,
    Constant,
    Param,
    Range,
    _current,
    _kind,
    _max_epochs,
    _middle,
    _nearest,
    _parse,
    _stages,
    _values,
)

if TYPE_CHECKING:
    import optuna


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space; `define_by_run` is what Ray's OptunaSearch calls per trial."""

    params: tuple  # ((name, Param), ...) in suggestion order
    max_epochs: int = DEFAULT_MAX_EPOCHS  # ASHA's largest rung = every trial's `epochs`

    # ----- building -------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "search space") -> "SearchSpace":
        """Validates a search-space mapping (as loaded from YAML).

        Args:
            d: parameter name -> list (choice), {low, high[, log|step]} (range) or scalar (constant).
            source: what to call the mapping in error messages (a file name).

        Returns:
            The validated space.
        """
        if d is None:
            d = {}
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: a search space is a mapping of parameters, got {type(d).__name__}")
        unknown = sorted(str(k) for k in d if k not in VALID_KEYS)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(VALID_KEYS)}")
        items = dict(d)
        max_epochs = _max_epochs(items, source)
        parsed = {name: _parse(name, value, source) for name, value in items.items()}
        order = [k for k in _ORDER if k in parsed] + [k for k in _FIELD_TYPES if k in parsed and k not in _ORDER]
        space = cls(params=tuple((k, parsed[k]) for k in order), max_epochs=max_epochs)
        _check_backbones(space, source)
        _check_freeze_depths(space, source)
        return space

    def to_dict(self) -> dict[str, Any]:
        """Returns the space in the YAML format; `from_dict(to_dict())` gives the same space."""
        out: dict[str, Any] = {}
        for name, p in self.params:
            if isinstance(p, Choice):
                out[name] = list(p.values)
            elif isinstance(p, Range):
                r: dict[str, Any] = {"low": p.low, "high": p.high}
                if p.log:
                    r["log"] = True
                if p.step is not None:
                    r["step"] = p.step
                out[name] = r
            else:
                out[name] = p.value
        out["max_epochs"] = self.max_epochs
        return out

    def with_max_epochs(self, max_epochs: int) -> "SearchSpace":
        """Returns a copy whose trials run (at most) `max_epochs` epochs."""
        return self.fixed(max_epochs=max_epochs)

    def fixed(self, **values: Any) -> "SearchSpace":
        """Returns a copy in which each named parameter is the given constant (validated again)."""
        return SearchSpace.from_dict({**self.to_dict(), **values})

    @property
    def param_dict(self) -> dict[str, Param]:
        """name -> Param."""
        return dict(self.params)

    # ----- sampling -------------------------------------------------------------------------

    def define_by_run(self, trial: "optuna.trial.BaseTrial") -> dict[str, Any]:
        """Suggests every non-constant parameter on an Optuna trial (no computation here).

        Args:
            trial: the Optuna trial (or Ray's wrapper around it).

        Returns:
            The constants (and `epochs`), which Ray merges into the trial's config.
        """
        params = self.param_dict
        values: dict[str, Any] = {}
        constants: dict[str, Any] = {"epochs": self.max_epochs}
        for name, p in self.params:
            policy = POLICY_CHILDREN.get(name)
            if policy is not None and _current("augmentation", params, values) != policy:
                continue  # a child of a policy this trial does not use
            if name in FINETUNE_CHILDREN and not isinstance(p, Constant) and not _trains_stages(params, values):
                continue  # a linear probe has no backbone rate
            if isinstance(p, Constant):
                constants[name] = p.value
                continue
            if isinstance(p, Choice):
                values[name] = trial.suggest_categorical(name, list(p.values))
            elif name == "freeze_depth" and p.high == "all":
                n = _stages(_current("backbone", params, values))
                values[name] = trial.suggest_int(name, min(int(p.low), n), n)
            elif p.is_int:
                values[name] = trial.suggest_int(
                    name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log
                )
            else:
                values[name] = trial.suggest_float(name, p.low, p.high, step=p.step, log=p.log)
        return constants

    def baseline(self) -> dict[str, Any]:
        """The params of a cheap, strong first trial: a linear probe where the space allows one.

        The head alone (`freeze_depth: all`) on un-augmented images trains on cached frozen
        features in seconds and is what a practitioner tries first; it gives the sampler and ASHA
        a good score to beat from the first minute. Each choice takes the probe's value when the
        space offers it (else its first value); each range its (geometric, when log) midpoint.

        Returns:
            A params dict for `optuna.Study.enqueue_trial`.
        """
        probe = {"freeze_depth": "all", "augmentation": "none"}
        params = self.param_dict
        values: dict[str, Any] = {}
        for name, p in self.params:
            policy = POLICY_CHILDREN.get(name)
            if policy is not None and _current("augmentation", params, values) != policy:
                continue
            if isinstance(p, Choice):
                values[name] = probe[name] if probe.get(name) in p.values else p.values[0]
            elif isinstance(p, Range):
                high = _stages(_current("backbone", params, values)) if p.high == "all" else float(p.high)
                if name == "freeze_depth":
                    values[name] = int(high)
                    continue
                mid = math.sqrt(p.low * high) if p.log else (p.low + high) / 2
                if p.step:
                    mid = p.low + round((mid - p.low) / p.step) * p.step
                values[name] = int(round(mid)) if p.is_int else mid
        return values

    def portfolio(self, max_trials: int) -> list[tuple[str, dict[str, Any]]]:
        """A warm start: proven fine-tuning recipes (`RECIPES`) per backbone, within the space.

        Every backbone's linear probe comes first (seconds on cached features, a score to beat
        from the first minute), then the first backbone's last-stages and full fine-tunes, then
        the next backbone's, cut at `max_trials` and run cheapest first. Each recipe's values are
        moved into the space's bounds (a range clips them, a choice gives its nearest value);
        recipes that collapse into the same params (a space without fine-tuning depths) run once.

        Args:
            max_trials: at most this many recipes (about a third of the requested trials).

        Returns:
            (recipe name, params for `optuna.Study.enqueue_trial`) pairs, in the order to run them.
        """
        chosen: list[tuple[int, int, str, dict[str, Any]]] = []
        seen: list[dict[str, Any]] = []
        names = backbones_in(self)
        wanted = [(0, b) for b in range(len(names))] + [
            (r, b) for b in range(len(names)) for r in range(1, len(RECIPES))
        ]
        for r, b in wanted:
            if len(chosen) >= max(0, max_trials):
                break
            params = self._recipe_params(RECIPES[r], names[b])
            if params is None or params in seen:
                continue
            seen.append(params)
            chosen.append((r, b, RECIPES[r].name, params))
        chosen.sort(key=lambda c: (c[0], c[1]))  # cheapest first: probes, then partial, then full
        return [(name, params) for _, _, name, params in chosen]

    def _recipe_params(self, recipe: Recipe, backbone: str) -> dict[str, Any] | None:
        """One recipe's params for one backbone, moved into this space's bounds."""
        params = self.param_dict
        targets = {**recipe.values, "backbone": backbone}
        values: dict[str, Any] = {}
        depth = params.get("freeze_depth", Constant(TrialConfig.freeze_depth))
        b = _current("backbone", params, {"backbone": backbone} if "backbone" in params else {})
        if _nearest_depth(depth, recipe.freeze_from_head, b) is None:
            return None  # the space has no freeze depth of this recipe's kind
        mult = params.get("backbone_lr_mult")
        if isinstance(mult, Constant) and "backbone_lr_mult" in targets:
            # The space fixes the backbone's share (a user's lr is every layer's): the recipe's
            # backbone rate is what it keeps, so the stated `lr` is moved there.
            targets["lr"] = targets["lr"] * targets["backbone_lr_mult"] / float(mult.value)
        for name, p in self.params:
            policy = POLICY_CHILDREN.get(name)
            if policy is not None and _current("augmentation", params, values) != policy:
                continue
            if name in FINETUNE_CHILDREN and not _trains_stages(params, values):
                continue
            if isinstance(p, Constant):
                continue
            if name == "freeze_depth":
                values[name] = _nearest_depth(p, recipe.freeze_from_head, _current("backbone", params, values))
            elif name in targets:
                values[name] = _nearest(p, targets[name])
            else:
                values[name] = _middle(p)
        return values

    def to_trial_config(self, config: Mapping[str, Any]) -> TrialConfig:
        """Turns a trial's flat config (suggested params + constants) into a `TrialConfig`.

        Keys that are not `TrialConfig` fields (Ray's or ours, such as `_trial_number`) are
        ignored; `freeze_depth` beyond the backbone's stage count is clipped to it.

        Args:
            config: the config Ray hands the trainable, or an Optuna trial's params.

        Returns:
            The validated trial config.
        """
        d = {k: v for k, v in config.items() if k in _FIELD_TYPES}
        d.setdefault("epochs", self.max_epochs)
        for name, p in self.params:  # constants missing from the config (e.g. an Optuna trial's params)
            if isinstance(p, Constant) and name not in d:
                d[name] = p.value
        fd = d.get("freeze_depth")
        if isinstance(fd, int) and not isinstance(fd, bool):
            d["freeze_depth"] = min(fd, _stages(d.get("backbone", TrialConfig.backbone)))
        return TrialConfig.from_dict(d, source="trial config")

    def incompatibility(self, other: "SearchSpace") -> str | None:
        """Why a study sampled from `self` cannot be continued with `other` (None: it can).

        Optuna requires a categorical parameter to keep its choices across trials; a changed
        `max_epochs` would make COMPLETE mean two different budgets.
        """
        if self.max_epochs != other.max_epochs:
            return f"max_epochs changed from {self.max_epochs} to {other.max_epochs}"
        mine, theirs = self.param_dict, other.param_dict
        for name in sorted(set(mine) & set(theirs)):
            a, b = mine[name], theirs[name]
            if isinstance(a, Choice) and isinstance(b, Choice) and list(a.values) != list(b.values):
                return f"the choices of {name} changed from {list(a.values)} to {list(b.values)}"
            if isinstance(a, Choice) != isinstance(b, Choice) and not (
                isinstance(a, Constant) or isinstance(b, Constant)
            ):
                return f"{name} changed from a {_kind(a)} to a {_kind(b)}"
        return None


def load_space(path: str | Path) -> SearchSpace:
    """Reads and validates a search-space YAML file.

    Args:
        path: the file.

    Returns:
        The validated space (errors name the file).
    """
    return SearchSpace.from_dict(load_yaml(path), source=str(path))


@dataclass(frozen=True)
class Recipe:
    """A fine-tuning recipe known to work, for the warm-start portfolio (`SearchSpace.portfolio`)."""

    name: str  # shown in the study (user_attr `recipe`)
    trainable_stages: Union[int, None]  # stages trained from the head: 0 = linear probe, None = all
    values: Mapping[str, Any]  # target values; each is moved into the space's bounds

    @property
    def freeze_from_head(self) -> Union[int, None]:
        """Stages left trainable (None: all), what `_nearest_depth` turns into a freeze depth."""
        return self.trainable_stages


PROBE_LR = 3e-3  # the linear probe's rate, before it is moved into the space's `lr` range
FINETUNE_LR = 5e-4  # the fine-tuning recipes' rate for backbone stages (AdamW), moved into the space's bounds
HEAD_LR_MULT = 1 / 0.3  # the head's rate over the stages' (the default `backbone_lr_mult` prior's top)
# What both fine-tuning recipes train with: un-augmented images, every trained stage at FINETUNE_LR.
_FINE_TUNE_VALUES = MappingProxyType({"augmentation": "none", "lr": FINETUNE_LR * HEAD_LR_MULT,
                                      "backbone_lr_mult": 1 / HEAD_LR_MULT, "lr_decay": 1.0})

RECIPES = (
    # Head only on un-augmented images: cached frozen features, seconds per epoch.
    Recipe("linear probe", 0, {"augmentation": "none", "lr": PROBE_LR}),
    # The fine-tunes train on un-augmented images, as the plain loops that fine-tune in a few
    # epochs do: ImageNet's random resized crop (down to 8% of the image) pays off over many
    # epochs, and on data unlike photos it cuts away what the label depends on (seen on
    # spectrograms: a full fine-tune with it at 0.46 / 0.56 / 0.70 after epochs 1-3, where the
    # probe it started from had 0.85). TPE still draws the space's augmentations.
    # Every stage at one rate, FINETUNE_LR, the head at HEAD_LR_MULT times it (AutoGluon's
    # two_stages puts the head at 10x; the default space's `backbone_lr_mult` reaches 0.3), from a
    # random head. Measured on spoken_digits (Lite0, 3 seeds): this recipe had 0.970 after 3
    # epochs, a plain loop training every layer at 5e-4 0.972 (benchmarks/parity.py); the
    # earlier recipe (2e-4 next to the head, 0.8 less per stage, from the probe's head) had 0.77
    # after 3 epochs in the search (benchmarks/bench.py, part g). From the probe's head (LP-FT),
    # the same fine-tune ended 3.7 points lower (parity.py): a head that already fits the frozen
    # features sends them little gradient, and data unlike ImageNet needs them moved.
    # The last two stages and the head at the same rates (the frozen stages' output is cached).
    Recipe("last stages", 2, _FINE_TUNE_VALUES),
    Recipe("full fine-tune", None, _FINE_TUNE_VALUES),
)


PROBE_RECIPE = RECIPES[0].name  # "linear probe": the recipe a study starts with, per backbone


def backbones_in(space: SearchSpace) -> list[str]:
    """The backbones a space can sample, in order."""
    p = space.param_dict.get("backbone")
    if p is None:
        return [TrialConfig.backbone]
    return [str(v) for v in (p.values if isinstance(p, Choice) else [p.value])]


# ----- helpers ----------------------------------------------------------------------------------


def _trains_stages(params: Mapping[str, Param], values: Mapping[str, Any]) -> bool:
    """Whether this trial's freeze depth leaves backbone stages to train."""
    depth = _current("freeze_depth", params, values)
    if depth == "all":
        return False
    return int(depth) < _stages(_current("backbone", params, values))


def _nearest_depth(p: Param, trainable: Union[int, None], backbone: str) -> Any:
    """The space's freeze depth nearest to leaving `trainable` stages (None: all) on `backbone`.

    The depth stays in the recipe's kind: a probe freezes every stage, a full fine-tune none, a
    partial one some; None when the space offers no depth of that kind.
    """
    n = _stages(backbone)
    target = 0 if trainable is None else max(0, n - trainable)

    def same_kind(d: int) -> bool:
        return d == target if target in (0, n) else 0 < d < n

    if isinstance(p, Range):
        low, high = min(int(p.low), n), n if p.high == "all" else min(int(p.high), n)
        d = max(low, min(target, high))
        if not same_kind(d) and 0 < target < n:
            d = max(low, 1) if max(low, 1) < min(high, n - 1) + 1 else d
        return d if same_kind(d) else None
    values = list(p.values) if isinstance(p, Choice) else [p.value]
    resolved = [n if v == "all" else min(int(v), n) for v in values]
    kind = [i for i in range(len(values)) if same_kind(resolved[i])]
    if not kind:
        return None
    return values[min(kind, key=lambda i: (abs(resolved[i] - target), i))]


def _can_fine_tune(space: SearchSpace) -> bool:
    """Whether some trial of the space trains backbone stages."""
    params = space.param_dict
    depths = _values("freeze_depth", params)
    for b in backbones_in(space):
        n = _stages(b)
        if any(d != "all" and int(d) < n for d in depths):
            return True
    return False


def _check_backbones(space: SearchSpace, source: str) -> None:
    """Unknown backbones are refused here, listing the valid ones (backbones.get_spec's message)."""
    from search import backbones

    for name in backbones_in(space):
        try:
            backbones.get_spec(name)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def _check_freeze_depths(space: SearchSpace, source: str) -> None:
    """A freeze depth above the stage count of every listed backbone cannot mean anything.

    One below the largest but above a smaller backbone's count is clipped for that backbone
    (`to_trial_config`), as documented; the study records the depth a trial actually used.
    """
    p = space.param_dict.get("freeze_depth")
    if p is None:
        return
    if isinstance(p, Range):
        values = [p.low] + ([] if p.high == "all" else [p.high])
    else:
        values = list(p.values) if isinstance(p, Choice) else [p.value]
    numbers = [int(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not numbers:
        return
    stages = {name: _stages(name) for name in backbones_in(space)}
    most = max(stages.values())
    too_deep = [v for v in numbers if v > most]
    if too_deep:
        counts = ", ".join(f"{name}: {n}" for name, n in stages.items())
        raise ConfigError(
            f"{source}: freeze_depth {too_deep[0]} is more than the stages of every backbone listed "
            f"({counts}); use at most {most}, or 'all'"
        )
