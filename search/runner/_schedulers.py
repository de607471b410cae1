"""The samplers a search can use (`SAMPLERS`) and ASHA with rungs per kind of trial that
remembers which trials it stopped (`PruneTrackingASHA`)."""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import optuna
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.schedulers.async_hyperband import _Bracket

from search.config import TLSearchError
from search.space import SearchSpace


@dataclass(frozen=True)
class SamplerEntry:
    """One Optuna sampler a search can use."""

    description: str  # one line for --help and errors
    make: Callable[[int], "optuna.samplers.BaseSampler"]  # seed -> sampler


SAMPLERS: dict[str, SamplerEntry] = {
    "tpe": SamplerEntry("Tree-structured Parzen Estimator (default)", lambda s: optuna.samplers.TPESampler(seed=s)),
    "random": SamplerEntry("uniform random sampling", lambda s: optuna.samplers.RandomSampler(seed=s)),
    "cmaes": SamplerEntry("CMA-ES (numeric params; needs the cmaes package)", lambda s: optuna.samplers.CmaEsSampler(seed=s)),
    "qmc": SamplerEntry("quasi-Monte Carlo (Sobol)", lambda s: optuna.samplers.QMCSampler(seed=s)),
}


def make_sampler(name: str, *, seed: int) -> "optuna.samplers.BaseSampler":
    """Builds a seeded sampler by name.

    Args:
        name: a key of `SAMPLERS`.
        seed: the sampler's seed.

    Returns:
        The sampler.
    """
    if name not in SAMPLERS:
        raise TLSearchError(f"unknown sampler {name!r}; available: {', '.join(SAMPLERS)}")
    return SAMPLERS[name].make(seed)


# Where a trial that trains stages counts as diverged, between chance (0) and the best probe (1):
# below a third of the way, it lost most of what the frozen features gave (a rate too high).
DIVERGED_SHARE = 1 / 3


def diverged(value: float, *, chance: float | None, best_probe: float | None, share: float = DIVERGED_SHARE) -> bool:
    """Whether a trial that trains stages has lost what the frozen features give: its score is
    below `share` of the way from chance to the best linear probe. All values are signed so that
    higher is better (val_loss negated).

    Args:
        value: the trial's score at this epoch.
        chance: the score of guessing (`metrics.chance_level`, signed); None: unknown, never diverged.
        best_probe: the best head-only score seen so far (signed); None: no probe yet.
        share: the fraction of the way from chance to the probe below which it diverged.

    Returns:
        True when the trial should stop now.
    """
    if chance is None or best_probe is None or not math.isfinite(value) or best_probe <= chance:
        return False
    return value < chance + share * (best_probe - chance)


def trial_kind(space: SearchSpace | None, config: Mapping[str, Any]) -> str:
    """"stages" for a trial that trains backbone stages, "head" for a linear probe (or unknown)."""
    if space is None:
        return "head"
    try:
        from search.backbones import resolve_depth

        cfg = space.to_trial_config(config)
        return "stages" if resolve_depth(cfg.backbone, cfg.freeze_depth) < _num_stages(cfg.backbone) else "head"
    except Exception:
        return "head"


class PruneTrackingASHA(ASHAScheduler):
    """ASHA with rungs per kind of trial, which remembers which trials it stopped.

    Linear probes are compared with linear probes and trials that train stages with trials that
    train stages: a fine-tune starts lower and ends higher than a head alone, which is near its
    best after an epoch, so at the same epoch the two are not alike (seen: full fine-tunes at
    0.870, 0.902, 0.916 and rising, stopped at epoch 3 by probes flat at 0.93). Within its kind a
    fine-tune is not stopped before `finetune_grace` epochs. A fine-tune that diverges (`diverged`:
    near chance, against the best probe) is stopped at any epoch, so a bad rate still ends early.
    """

    def __init__(self, *args: Any, stopped: set | None = None, finetune_grace: int = 1,
                 space: SearchSpace | None = None, chance: float | None = None,
                 best_probe: float | None = None, per_kind: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stopped: set = stopped if stopped is not None else set()
        self._finetune_grace = finetune_grace
        self._space = space
        self._grace = int(kwargs.get("grace_period", 1))
        self._kinds: dict[str, _Bracket] = {}  # kind -> its own rungs
        self._kind_of: dict[str, str] = {}  # trial id -> kind
        self._chance = chance  # signed (higher is better)
        self.best_probe = best_probe  # signed; the study's earlier probes seed it
        self._per_kind = per_kind  # False: one set of rungs for every trial (as before; benchmarks compare)

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)  # checks metric and mode
        kind = trial_kind(self._space, getattr(trial, "config", None) or {})
        self._kind_of[trial.trial_id] = kind
        if not self._per_kind:
            return
        if kind not in self._kinds:
            self._kinds[kind] = _Bracket(self._grace, self._max_t, self._reduction_factor, 0,
                                         stop_last_trials=self._stop_last_trials)
        self._trial_info[trial.trial_id] = self._kinds[kind]

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        with _nan_rungs_quiet():
            action = super().on_trial_result(tune_controller, trial, result)
        kind = self._kind_of.get(trial.trial_id, "head")
        value = result.get(self._metric)
        signed = self._metric_op * float(value) if isinstance(value, (int, float)) else math.nan
        epoch = result.get(self._time_attr, 0)
        if kind == "head" and math.isfinite(signed):
            self.best_probe = signed if self.best_probe is None else max(self.best_probe, signed)
        if action == TrialScheduler.STOP and kind == "stages" and epoch < self._finetune_grace \
                and epoch < self._max_t:
            action = TrialScheduler.CONTINUE
        if self._per_kind and kind == "stages" and epoch < self._max_t and diverged(
                signed, chance=self._chance, best_probe=self.best_probe):
            action = TrialScheduler.STOP
        if action == TrialScheduler.STOP:
            self.stopped.add(trial.trial_id)
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        with _nan_rungs_quiet():
            super().on_trial_complete(tune_controller, trial, result)


def _num_stages(backbone: str) -> int:
    from search.backbones import num_stages

    return int(num_stages(backbone))


@contextlib.contextmanager
def _nan_rungs_quiet() -> Iterator[None]:
    """A failed trial reports NaN (ASHA ignores it); numpy's warning about a rung holding only
    NaN so far is noise in the user's terminal."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="All-NaN slice encountered", category=RuntimeWarning)
        yield
