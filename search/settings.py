"""How a search runs (`SearchSettings`): typed, validated, resolved once, stored with the study.

It sits above `config` (trial configs, errors, files) and `space` (the search space types), so
the settings hold the typed space without an import cycle.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from search.config import (
    ConfigError,
    _check_positive,
    _check_range,
    absolute_path,
    check_study_name,
    default_cache_dir,
    default_storage_url,
)
from search.metrics import check_metric, mode_of
from search.space import SearchSpace, default_space, with_finetune_priors


@dataclass(frozen=True)
class SearchSettings:
    """How a search runs; stored with the study so `tlsearch resume` can continue it.

    `resolve()` turns what the user gave into what runs (the space with every option folded in,
    absolute paths), once, in the driver.
    """

    study: str  # the study's name: studies/<study>.db, reports/<study>/
    data: str  # the dataset folder, absolute
    storage: str | None = None  # Optuna storage URL; None: sqlite:///studies/<study>.db
    space: SearchSpace | None = None  # the search space (a YAML mapping is validated into one); None: default
    trials: int = 20  # total trials the study should reach (finished ones count)
    time_budget_s: float | None = None  # wall-clock limit of this run; None: none
    max_epochs: int | None = None  # ASHA's largest rung; None: from the space
    grace_period: int = 1  # ASHA: epochs every trial gets before it can be stopped
    reduction_factor: int = 3  # ASHA: keep 1/reduction_factor at each rung
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None  # None: chosen for the machine
    address: str | None = None  # an existing Ray cluster; None: start Ray locally
    weights_dir: str | None = None  # DIR/<model name>.pth state dicts used instead of downloads
    pretrained: bool = True  # False (--no-pretrained): every trial starts from random weights
    cache: bool = True  # False (--no-cache): no image or feature cache
    cache_dir: str | None = None  # image and feature caches; None: $TLSEARCH_CACHE or ~/.cache/tlsearch
    seed: int = 0
    sampler: str = "tpe"  # tpe | random | cmaes | qmc
    metric: str = "val_acc"  # the objective: val_acc | val_balanced_acc | val_macro_f1 | val_loss (search.metrics)
    mode: str | None = None  # max | min; None: the metric's own direction (val_loss is minimised)
    val_fraction: float = 0.2  # validation share when DATA has no val/ folder
    warm_start: bool = True  # a new study's first trial is the space's linear probe (SearchSpace.baseline)
    # With a time budget: no trial starts that cannot reach its last epoch in the time left, and one
    # the budget cuts is PRUNED with its epochs and checkpoint (resume continues it). False: the
    # scheduling before this existed (every trial starts; a cut one is FAIL and runs again).
    budget_aware: bool = True
    portfolio: bool = True  # warm start with the space's recipe portfolio; False: the linear probe alone
    # ASHA does not stop a trial that trains backbone stages before this many epochs: fine-tuning
    # starts lower and ends higher than a head alone, which is near its best after one epoch.
    # None: max(grace_period, 2), at most max_epochs; 1 or grace_period: no difference (as before).
    finetune_grace: int | None = None
    # On CPUs, a fine-tune the probes chose (`space.next_fine_tune`) gets every CPU of the machine
    # instead of `cpus_per_trial`, so under a budget the one that matters ends first instead of
    # sharing the cores with a second (benchmarks/cores.py). Trials with GPUs keep their share.
    finetune_all_cpus: bool = True
    # The linear probes a new study starts with, one at a time on every CPU instead of side by
    # side at their share: the first score comes sooner, every probe's later, and so do the
    # fine-tunes that wait for them (benchmarks/coldstart.py); off by default.
    probes_all_cpus: bool = False
    keep_checkpoints: int = 3  # COMPLETE trials' checkpoints kept per backbone (the best ones); others are removed
    studies_dir: str = "studies"
    reports_dir: str = "reports"

    def __post_init__(self) -> None:
        if isinstance(self.space, Mapping):  # as stored with the study, or written by hand
            object.__setattr__(self, "space", SearchSpace.from_dict(self.space) if self.space else None)
        elif self.space is not None and not isinstance(self.space, SearchSpace):
            raise ConfigError(f"space must be a SearchSpace or a mapping, got {type(self.space).__name__}")
        check_study_name(self.study)
        _check_range("trials", self.trials, 1, 1_000_000)
        _check_range("grace_period", self.grace_period, 1, 10_000)
        _check_range("reduction_factor", self.reduction_factor, 2, 100)
        if self.finetune_grace is not None:
            _check_range("finetune_grace", self.finetune_grace, 1, 10_000)
        _check_range("cpus_per_trial", self.cpus_per_trial, 0.0, 4096)
        _check_range("gpus_per_trial", self.gpus_per_trial, 0.0, 64)
        _check_range("val_fraction", self.val_fraction, 0.01, 0.9)
        _check_range("keep_checkpoints", self.keep_checkpoints, 0, 1_000_000)
        check_metric(self.metric)
        if self.mode is None:
            object.__setattr__(self, "mode", mode_of(self.metric))
        if self.mode not in ("max", "min"):
            raise ConfigError(f"mode must be 'max' or 'min', got {self.mode!r}")
        if self.mode != mode_of(self.metric):
            way = "maximised" if mode_of(self.metric) == "max" else "minimised"
            raise ConfigError(f"mode {self.mode!r} does not fit metric {self.metric}, which is {way}")
        if self.max_concurrent is not None:
            _check_range("max_concurrent", self.max_concurrent, 1, 100_000)
        if self.time_budget_s is not None:
            _check_positive("time_budget", self.time_budget_s)

    def to_dict(self) -> dict[str, Any]:
        """Returns the settings as a plain dict (the space in its YAML form); `from_dict` reads it back."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["space"] = self.space.to_dict() if self.space is not None else {}
        return out

    def resolve(self) -> "SearchSettings":
        """Every run option folded in once, before any trial starts; stored that way with the study.

        - the space: the default space for the hardware when none was given; `max_epochs`
          (--max-epochs) and `pretrained: false` (--no-pretrained) become part of it, so every
          trial, the study and every later resume see the same space;
        - the fine-tuning priors the space does not state (`space.with_finetune_priors`): the
          backbone's rate as a fraction of the head's, layer-wise decay, warm-up;
        - paths: absolute with `~` expanded (data, weights, caches, studies, reports), so every
          trial, on any node, and every later `resume`, from any folder, means the same files.

        Returns:
            The resolved settings (resolving them again changes nothing).
        """
        space = self.space if self.space is not None else default_space(gpu=self.gpus_per_trial > 0)
        if self.max_epochs is not None and self.max_epochs != space.max_epochs:
            space = space.with_max_epochs(self.max_epochs)
        if not self.pretrained:
            space = space.fixed(pretrained=False)
        space = with_finetune_priors(space)
        return self.replace(
            space=space,
            data=absolute_path(self.data),
            weights_dir=absolute_path(self.weights_dir) if self.weights_dir else None,
            cache_dir=absolute_path(self.cache_dir or default_cache_dir()),
            studies_dir=absolute_path(self.studies_dir),
            reports_dir=absolute_path(self.reports_dir),
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SearchSettings":
        """Builds settings from a dict written by `to_dict` (keys it does not know are dropped)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **changes: Any) -> "SearchSettings":
        """Returns a copy with some fields changed (validated again); a new metric brings its own mode."""
        if "metric" in changes and "mode" not in changes:
            changes["mode"] = None
        return dataclasses.replace(self, **changes)

    @property
    def storage_url(self) -> str:
        """The Optuna storage URL of the study."""
        return self.storage or default_storage_url(self.study, studies_dir=self.studies_dir)

    @property
    def experiment_dir(self) -> Path:
        """Ray's experiment folder for this study: studies/<study>/."""
        return Path(self.studies_dir, self.study).resolve()

    @property
    def report_dir(self) -> Path:
        """reports/<study>/."""
        return Path(self.reports_dir, self.study).resolve()
