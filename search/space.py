"""The search space: DESIGN.md's YAML format -> an Optuna define-by-run function -> `TrialConfig`.

A list is a choice (categorical), a mapping with `low`/`high` (and `log: true` or `step`) is a
range, a scalar is a constant. Keys are `TrialConfig` field names plus `max_epochs` (ASHA's
largest rung, which is every trial's `epochs`). Parameter names in the Optuna study are the flat
field names.

Conditional parameters:

- `freeze_depth` depends on the backbone. Its choices may hold ints and `all` (the backbone's
  number of stages). Optuna needs a categorical to offer the same choices in every trial, so the
  same list is suggested for every backbone and then resolved: an int beyond the backbone's stage
  count is clipped to it (3 on a 2-stage backbone freezes both stages, i.e. a linear probe). A
  range `{low: 0, high: all}` is an int range whose top is the backbone's stage count.
- `randaugment_num_ops` / `randaugment_magnitude` are only suggested when the augmentation is
  `randaugment`, `augmix_severity` only under `augmix`; otherwise the trial keeps the default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Union

from search.config import ConfigError, TrialConfig, load_yaml

if TYPE_CHECKING:
    import optuna

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


def default_space(*, gpu: bool) -> SearchSpace:
    """The built-in space: small backbones and images on CPU, larger ones on GPU.

    Args:
        gpu: whether trials get GPUs.

    Returns:
        The default space.
    """
    common: dict[str, Any] = {
        "augmentation": ["none", "flip", "trivialaugment"],
        "optimizer": "adamw",
        "lr": {"low": 1e-4, "high": 1e-2, "log": True},
        "weight_decay": {"low": 1e-6, "high": 1e-2, "log": True},
        "label_smoothing": [0.0, 0.1],
    }
    if gpu:
        d = {
            "backbone": ["resnet50", "convnext_tiny", "efficientnet_b2", "vit_b_16"],
            "freeze_depth": [0, 2, 4, "all"],
            **common,
            "batch_size": [32, 64],
            "image_size": 224,
            "max_epochs": 10,
        }
    else:
        d = {
            "backbone": ["resnet18", "mobilenet_v3_large", "efficientnet_b0"],
            # 4: the last stages only (resnet18's layer4; the last blocks of the others).
            "freeze_depth": [0, 2, 4, "all"],
            **common,
            "batch_size": [16, 32],
            "image_size": 128,
            "max_epochs": 6,
        }
    return SearchSpace.from_dict(d, source="default space")


def default_space_at_hand(*, gpu: bool, weights_dir: str | None) -> tuple[SearchSpace, str | None]:
    """The default space over the backbones whose pretrained weights are at hand.

    At hand: a default backbone found in `weights_dir` or the torch/timm caches, and every
    `weights_dir/<name>.pth` that names a registered backbone or a timm model (as `timm/<name>`).
    Offline, a default backbone without weights would stop the search at its pre-flight check;
    with nothing at hand at all, the defaults stay (an online machine downloads them).

    Args:
        gpu: whether trials get GPUs (`default_space`).
        weights_dir: the --weights-dir folder, or None.

    Returns:
        (the space, one line naming the defaults left out, or None when none were).
    """
    from search import backbones

    space = default_space(gpu=gpu)
    defaults = backbones_in(space)
    at_hand = [n for n in defaults if backbones.weights_status(n, weights_dir) != "missing"]
    extra = [n for n in _backbones_in_dir(weights_dir) if n not in at_hand]
    chosen = at_hand + extra
    left_out = [n for n in defaults if n not in at_hand]
    if not chosen or chosen == defaults:
        return space, None
    most = max(_stages(n) for n in chosen)
    depths = [v for v in space.param_dict["freeze_depth"].values if v == "all" or int(v) <= most]
    space = space.fixed(backbone=chosen, freeze_depth=depths)
    note = None
    if left_out:
        where = f"{weights_dir} nor the torch/timm caches" if weights_dir else "the torch/timm caches"
        note = (f"default space: left out {', '.join(left_out)} (no pretrained weights in {where}); "
                f"searching {', '.join(chosen)}")
    return space, note


def _backbones_in_dir(weights_dir: str | None) -> list[str]:
    """Backbone names of the `<name>.pth` files in a weights folder (registered or timm), sorted."""
    from search import backbones

    if not weights_dir or not Path(weights_dir).is_dir():
        return []
    names = []
    for f in sorted(Path(weights_dir).glob("*.pth")):
        for name in (f.stem, f"{backbones.TIMM_PREFIX}{f.stem}"):
            try:
                backbones.get_spec(name)
            except Exception:  # not a model either library knows
                continue
            names.append(name)
            break
    return names


# ----- fine-tuning priors -----------------------------------------------------------------------
#
# Where they come from (read in the sources, values adapted to a search over a few epochs):
# - AutoGluon AutoMM's fine-tuning defaults (docs "Customize AutoMM", optimization.*): AdamW,
#   learning_rate 1e-4 for the backbone, lr_choice "layerwise_decay" with lr_decay 0.9 per layer,
#   or "two_stages" with the head at lr_mult x the backbone's rate; cosine_decay schedule,
#   warmup over the first 10% of steps (warmup_steps 0.1), weight_decay 1e-3.
# - the torchvision references (references/classification/train.py): linear warm-up
#   (--lr-warmup-epochs) then cosine annealing; the transfer-learning tutorial fine-tunes a
#   pretrained ResNet at lr 1e-3 (SGD, momentum 0.9), far below the 0.1 used from scratch.
# - timm's fine-tuning practice (train.py --layer-decay, warm-up epochs, cosine schedule;
#   pretrained weights fine-tuned with AdamW at 1e-4..5e-4, heads at a larger rate).
# Our stages are groups of layers (5 to 12 per backbone), so the per-stage decay range reaches
# lower than AutoGluon's per-layer 0.9.

# What a space that does not mention them gets: the head's rate is `lr`; the backbone's is a
# fraction of it (two_stages: head = 10 x backbone sits in the middle), decayed per stage.
FINETUNE_PRIORS: dict[str, Any] = {
    "backbone_lr_mult": {"low": 0.01, "high": 0.3, "log": True},
    "lr_decay": {"low": 0.6, "high": 1.0},
}
WARMUP_FRACTION = 0.1  # of the trial's epochs (AutoGluon's warmup_steps 0.1)
# Above these, pretrained stages are wrecked in the first steps (seen: AdamW at 3e-3 and more
# fine-tuning EfficientNet-Lite stages ends at chance); the head alone takes far more.
FINETUNE_LR_LIMIT = {"adamw": 3e-3, "adam": 3e-3, "rmsprop": 3e-3, "sgd": 0.1}


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


RECIPES = (
    # Head only on un-augmented images: cached frozen features, seconds per epoch.
    Recipe("linear probe", 0, {"augmentation": "none", "lr": 3e-3}),
    # The last two stages and the head, the backbone at a tenth of the head's rate (AutoGluon's
    # two_stages with lr_mult 10; the torchvision tutorial's 1e-3 at the head).
    Recipe("last stages", 2, {"augmentation": "flip", "lr": 1e-3, "backbone_lr_mult": 0.1, "lr_decay": 1.0}),
    # Every stage, with layer-wise decay (AutoGluon's default lr_choice) from 1e-4 next to the head.
    Recipe("full fine-tune", None, {"augmentation": "flip", "lr": 1e-3, "backbone_lr_mult": 0.1, "lr_decay": 0.8}),
)


def with_finetune_priors(space: SearchSpace) -> SearchSpace:
    """The space with the fine-tuning priors it does not mention (what it states is kept).

    `lr` is then the head's rate, and backbone stages train at `lr * backbone_lr_mult *
    lr_decay**d` (d = 1 next to the head); warm-up over the first tenth of the epochs, then cosine
    decay. A space that fixes them (e.g. `backbone_lr_mult: 1.0`, `warmup_epochs: 0`) keeps its values.

    Args:
        space: a validated space.

    Returns:
        The space with `backbone_lr_mult`, `lr_decay` and `warmup_epochs` filled in.
    """
    stated = space.to_dict()
    added = {k: v for k, v in FINETUNE_PRIORS.items() if k not in stated}
    if "warmup_epochs" not in stated:
        added["warmup_epochs"] = round(WARMUP_FRACTION * space.max_epochs, 3)
    return SearchSpace.from_dict({**stated, **added}) if added else space


def lr_warnings(space: SearchSpace, *, source: str = "search space") -> list[str]:
    """One line when the space's learning rates cannot fine-tune backbone stages.

    The lowest rate a fine-tuning trial can give the stage next to the head (`lr *
    backbone_lr_mult * lr_decay`) is compared with `FINETUNE_LR_LIMIT` for each optimizer the
    space can use; a space whose every draw is above it would only ever diverge.

    Args:
        space: the space (after `with_finetune_priors`, or as the user wrote it).
        source: what to call it in the message.

    Returns:
        Zero or one warning line.
    """
    params = space.param_dict
    if not _can_fine_tune(space):
        return []
    lowest = _lowest("lr", params) * _lowest("backbone_lr_mult", params) * _lowest("lr_decay", params)
    bad = [o for o in _values("optimizer", params) if lowest > FINETUNE_LR_LIMIT.get(str(o), math.inf)]
    if not bad:
        return []
    opt = bad[0]
    return [
        f"{source}: lr {_describe(params.get('lr'))} with backbone_lr_mult {_describe(params.get('backbone_lr_mult'))} trains "
        f"backbone stages at {lowest:.2g} or more with {opt}; fine-tuning diverges above about "
        f"{FINETUNE_LR_LIMIT[opt]:g}: lower lr, or leave backbone_lr_mult out (its default scales the backbone's rate down)"
    ]


# Searched on an imbalanced training split when the space does not set them itself (`for_dataset`).
# Plain training comes first in each list: a warm-start trial (`SearchSpace.baseline`) takes it.
IMBALANCE_DIMENSIONS: dict[str, list[Any]] = {
    "loss_weighting": ["none", "inverse_sqrt", "inverse_frequency"],
    "balanced_sampler": [False, True],
}


def for_dataset(space: SearchSpace, class_counts: list[int]) -> SearchSpace:
    """The default space fitted to a dataset: imbalance handling searched where classes are lopsided.

    When the training split's largest class has at least `imbalance.IMBALANCE_RATIO` times the
    images of its smallest, loss weighting and the class-balanced sampler become search dimensions
    (`IMBALANCE_DIMENSIONS`; a dimension the space already sets is kept as it is); otherwise the
    space is returned unchanged, and neither costs the sampler a dimension.

    Args:
        space: the default space (a user's space is searched as written).
        class_counts: training images per class.

    Returns:
        The space to search.
    """
    from search.imbalance import is_imbalanced

    if not is_imbalanced(class_counts):
        return space
    missing = {k: v for k, v in IMBALANCE_DIMENSIONS.items() if k not in space.param_dict}
    return SearchSpace.from_dict({**space.to_dict(), **missing}, source="default space") if missing else space


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


def _can_fine_tune(space: SearchSpace) -> bool:
    """Whether some trial of the space trains backbone stages."""
    params = space.param_dict
    depths = _values("freeze_depth", params)
    for b in backbones_in(space):
        n = _stages(b)
        if any(d != "all" and int(d) < n for d in depths):
            return True
    return False


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
