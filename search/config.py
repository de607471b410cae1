"""Typed config of one trial (`TrialConfig`), the errors a user can fix, and the file and path
helpers every module shares (YAML, atomic writes, absolute paths, the cache folder).

`TrialConfig` is a frozen dataclass that round-trips through a plain dict and YAML (how a search
runs is `search.settings.SearchSettings`). Every user-facing
error raised here is a `ConfigError` whose message names the rule and echoes the value; the CLI
prints it as one line and exits 2.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Union

# The package's one atomic write and one file lock (in _files.py); other modules import them from here.
from search._files import (  # noqa: F401
    atomic_save,
    atomic_write_bytes,
    atomic_write_text,
    file_lock,
    tmp_path,
)


class TLSearchError(Exception):
    """A problem the user can fix (bad input, missing file): one line on stderr, exit code 2."""


class ConfigError(TLSearchError, ValueError):
    """A configuration, search space or command-line value that breaks a rule."""


FreezeDepth = Union[int, str]  # an int >= 0, or "all" for the backbone's number of stages

OPTIMIZERS = ("sgd", "adamw", "adam", "rmsprop")
AUGMENTATIONS = ("none", "flip", "trivialaugment", "randaugment", "autoaugment", "augmix")
# How the training loss weighs each class (search.imbalance computes the weights).
LOSS_WEIGHTINGS = ("none", "inverse_frequency", "inverse_sqrt")
# How the rate moves after the warm-up (search.trial.lr_multiplier): "cosine" steps a cosine once
# per epoch (the torchvision references' CosineAnnealingLR, timm's per-epoch scheduler), so the
# first epoch trains at the full rate however many epochs follow; "cosine_steps" decays it every
# batch to zero at the last one (what every trial did before "cosine" existed, and what a
# config exported then retrains with); "constant" keeps it (the tutorials' loop).
LR_SCHEDULES = ("cosine", "cosine_steps", "constant")

# Keys `tlsearch export` adds "for the record". A TrialConfig ignores them, so an exported file
# trains unchanged; `tlsearch train` reads `threads` and `split` (the study's split) itself.
RECORD_KEYS = frozenset(
    {
        "study",
        "trial",
        "trial_number",
        "metrics",
        "dataset",
        "dataset_fingerprint",
        "class_names",
        "versions",
        "state",
        "threads",
        "metric",
        "device",
        "weights_id",
        "split",
    }
)


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial of transfer learning needs, as in DESIGN.md's trial config file."""

    backbone: str = "resnet18"  # torchvision model name; timm models as timm/<name>
    pretrained: bool = True  # false: random initialisation
    freeze_depth: FreezeDepth = 0  # stages frozen from the stem; "all" = head only
    augmentation: str = "flip"  # none | flip | trivialaugment | randaugment | autoaugment | augmix
    randaugment_num_ops: int = 2  # RandAugment: transformations applied in sequence
    randaugment_magnitude: int = 9  # RandAugment: strength, 0..30
    augmix_severity: int = 3  # AugMix: strength of the base operations, 1..10
    mixup_alpha: float = 0.0  # MixUp's Beta(alpha, alpha); 0 turns it off
    cutmix_alpha: float = 0.0  # CutMix's Beta(alpha, alpha); 0 turns it off
    image_size: int = 224  # side of the square crop fed to the backbone
    epochs: int = 10  # full training budget; ASHA may stop a trial earlier
    batch_size: int = 32
    optimizer: str = "adamw"  # sgd | adamw | adam | rmsprop
    lr: float = 3e-4  # peak learning rate of the head (and of the backbone, see lr_decay)
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd and rmsprop only
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.0  # linear warmup before the cosine decay, in epochs
    lr_schedule: str = "cosine"  # after the warm-up: cosine (per epoch) | cosine_steps | constant
    dropout: float = 0.0  # dropout before the new classifier
    lr_decay: float = 1.0  # discriminative lr: stage i from the head gets lr * lr_decay**i
    # The backbone's stages train at lr * backbone_lr_mult (times lr_decay**i): the new head needs a
    # larger rate than pretrained features can take. 1.0: one rate for all, as before it existed.
    backbone_lr_mult: float = 1.0
    # LP-FT (Kumar et al., ICLR 2022): a trial that trains stages first trains its new head alone
    # for `lp_epochs` on the frozen, un-augmented features (the linear probe, on cached features:
    # seconds), then fine-tunes from that head, so a random head's gradients do not distort the
    # pretrained features and the first epoch starts high. 0: the head starts random.
    lp_epochs: int = 0
    lp_lr: float = 3e-3  # the probe's rate (its schedule: cosine, no warm-up)
    seed: int = 0
    # Class imbalance; the defaults train as before these existed, so older config files retrain the same.
    loss_weighting: str = "none"  # none | inverse_frequency | inverse_sqrt: class weights of the training loss
    balanced_sampler: bool = False  # draw training images with replacement, every class equally often

    def __post_init__(self) -> None:
        _check_name("backbone", self.backbone)
        if self.augmentation not in AUGMENTATIONS:
            raise ConfigError(
                f"unknown augmentation {self.augmentation!r}; available: {', '.join(AUGMENTATIONS)}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; available: {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"unknown lr_schedule {self.lr_schedule!r}; available: {', '.join(LR_SCHEDULES)}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(
                f"unknown loss_weighting {self.loss_weighting!r}; available: {', '.join(LOSS_WEIGHTINGS)}"
            )
        if not isinstance(self.balanced_sampler, bool):
            raise ConfigError(f"balanced_sampler must be true or false, got {self.balanced_sampler!r}")
        fd = self.freeze_depth
        if isinstance(fd, bool) or not (fd == "all" or (isinstance(fd, int) and fd >= 0)):
            raise ConfigError(f"freeze_depth must be an integer >= 0 or 'all', got {fd!r}")
        _check_range("image_size", self.image_size, 16, 1024)
        _check_range("epochs", self.epochs, 1, 10_000)
        _check_range("batch_size", self.batch_size, 1, 65_536)
        _check_range("randaugment_num_ops", self.randaugment_num_ops, 1, 10)
        _check_range("randaugment_magnitude", self.randaugment_magnitude, 0, 30)
        _check_range("augmix_severity", self.augmix_severity, 1, 10)
        _check_range("lp_epochs", self.lp_epochs, 0, 10_000)
        _check_positive("lp_lr", self.lp_lr)
        _check_positive("lr", self.lr)
        for name in ("weight_decay", "momentum", "mixup_alpha", "cutmix_alpha", "warmup_epochs"):
            _check_range(name, getattr(self, name), 0.0, math.inf)
        _check_range("label_smoothing", self.label_smoothing, 0.0, 0.999)
        _check_range("dropout", self.dropout, 0.0, 0.999)
        _check_range("lr_decay", self.lr_decay, 1e-6, 1.0)
        _check_range("backbone_lr_mult", self.backbone_lr_mult, 1e-6, 1.0)

    @property
    def deterministic_input(self) -> bool:
        """Whether training sees the same tensors every epoch (policy `none`, no MixUp/CutMix):
        then a frozen prefix's output can be cached, and its epochs cost what a probe's do."""
        return deterministic_input(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as a plain dict, in field order (what YAML files hold)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "config") -> "TrialConfig":
        """Builds a config from a mapping, ignoring `RECORD_KEYS` and refusing unknown keys.

        Args:
            d: the mapping, e.g. a loaded YAML file.
            source: what to call the mapping in error messages (a file name).

        Returns:
            The validated config.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a mapping of settings, got {type(d).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(str(k) for k in d if k not in known and k not in RECORD_KEYS)
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(known)}"
            )
        kwargs = {k: _coerce(k, v, known[k].type, source) for k, v in d.items() if k in known}
        if "lr_schedule" not in d and RECORD_KEYS.intersection(d):
            # Exported before the schedule was a field: it trained with the per-batch cosine, and
            # `tlsearch train` must reproduce that trial.
            kwargs["lr_schedule"] = "cosine_steps"
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "TrialConfig":
        """Returns a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def deterministic_input(config: Mapping[str, Any]) -> bool:
    """`TrialConfig.deterministic_input` of a config's dict (a missing key takes the default).

    MixUp and CutMix mix the images themselves, and mixing images is not mixing their cached features.
    """
    return (config.get("augmentation", TrialConfig.augmentation) == "none"
            and not config.get("mixup_alpha") and not config.get("cutmix_alpha"))


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: object) -> str:
    """`text` with terminal control characters replaced by '?', for names read from storage or files."""
    return _UNPRINTABLE.sub("?", str(text))


def absolute_path(path: str | os.PathLike[str]) -> str:
    """`path` with `~` expanded, made absolute against the working folder (symlinks kept)."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def default_cache_dir() -> Path:
    """Where the image and feature caches live: $TLSEARCH_CACHE, else ~/.cache/tlsearch (absolute)."""
    env = os.environ.get("TLSEARCH_CACHE")
    return Path(absolute_path(env)) if env else Path.home() / ".cache" / "tlsearch"


_STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_study_name(name: str) -> str:
    """Refuses study names that could escape studies/ and reports/ or break a file system.

    Args:
        name: the study name given by the user.

    Returns:
        The name, unchanged.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError("study name must not be empty")
    if len(name) > 200:
        raise ConfigError(f"study name must be at most 200 characters, got {len(name)}")
    if ".." in name or not _STUDY_NAME.match(name):
        raise ConfigError(
            f"study name may hold letters, digits, '.', '_' and '-' (no '..', no '/'), got {name!r}"
        )
    return name


def default_storage_url(study: str, *, studies_dir: str | Path = "studies") -> str:
    """Returns `sqlite:///<abs path>/studies/<study>.db` for a study name (the default storage)."""
    check_study_name(study)
    return f"sqlite:///{Path(studies_dir, study + '.db').resolve()}"


# What `tlsearch ensemble` found, in the study's folder: the report draws its ensembles section from it.
ENSEMBLE_SUMMARY = "ensemble.json"


def ensemble_summary_path(study: str, *, studies_dir: str | Path = "studies") -> Path:
    """Returns `studies/<study>/ensemble.json`: the last `tlsearch ensemble` summary of the study."""
    return Path(studies_dir, check_study_name(study), ENSEMBLE_SUMMARY)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr|d)?\s*$")
_UNIT_SECONDS = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}


def parse_duration(text: str | float | int) -> float:
    """Parses a duration such as `90`, `30s`, `30m`, `1.5h` into seconds.

    Args:
        text: the duration; a bare number means seconds.

    Returns:
        The duration in seconds, > 0.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        m = _DURATION.match(str(text).lower())
        if not m:
            raise ConfigError(f"bad duration {text!r}; use e.g. 90s, 30m, 2h")
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    if not seconds > 0 or math.isinf(seconds):
        raise ConfigError(f"duration must be > 0, got {text!r}")
    return seconds


def load_yaml(path: str | Path) -> Any:
    """Reads a YAML file; a missing file or a syntax error is a `ConfigError` naming file and line."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"no such file: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {p}: {e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None


def dump_yaml(data: Mapping[str, Any], path: str | Path) -> Path:
    """Writes a mapping as YAML (keys in the given order), atomically; returns the path."""
    import yaml

    return atomic_write_text(path, yaml.safe_dump(dict(data), sort_keys=False))


def load_trial_config(path: str | Path) -> TrialConfig:
    """Reads a trial config YAML (or JSON) file, as written by `tlsearch export`."""
    return TrialConfig.from_dict(load_yaml(path), source=str(path))


def _check_name(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name} must be a non-empty string, got {value!r}")


def _check_range(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value <= high):
        hi = "" if math.isinf(high) else f" and {high}"
        rule = f"between {low}{hi}" if hi else f">= {low}"
        raise ConfigError(f"{name} must be {rule}, got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ConfigError(f"{name} must be > 0, got {value!r}")


def _coerce(key: str, value: Any, annotation: Any, source: str) -> Any:
    """Turns YAML scalars into the field's type (YAML reads `3e-4` as a string, for one)."""
    ann = str(annotation)
    try:
        if ann == "bool":
            if isinstance(value, bool):
                return value
            raise ValueError
        if ann == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return int(value) if isinstance(value, (int, str)) else _raise()
        if ann == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if ann == "FreezeDepth":
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                return int(value)
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {key} must be of type {ann}, got {value!r}") from None
    return value


def _raise() -> Any:
    raise ValueError
