"""The samplers a search can use (`SAMPLERS`) and ASHA that remembers which trials it stopped
(`PruneTrackingASHA`)."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import optuna
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

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


class PruneTrackingASHA(ASHAScheduler):
    """ASHA that remembers which trials it stopped, so the searcher can tell PRUNED from the rest.

    A trial that trains backbone stages is not stopped before `finetune_grace` epochs: its first
    epoch, at a warm-up rate, is compared with head-only trials already near their best (its
    result still counts in the rung, for the trials after it).
    """

    def __init__(self, *args: Any, stopped: set | None = None, finetune_grace: int = 1,
                 space: SearchSpace | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stopped: set = stopped if stopped is not None else set()
        self._finetune_grace = finetune_grace
        self._space = space

    def _fine_tunes(self, config: Mapping[str, Any]) -> bool:
        if self._space is None:
            return False
        try:
            from search.backbones import resolve_depth

            cfg = self._space.to_trial_config(config)
            return resolve_depth(cfg.backbone, cfg.freeze_depth) < _num_stages(cfg.backbone)
        except Exception:
            return False

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        with _nan_rungs_quiet():
            action = super().on_trial_result(tune_controller, trial, result)
        if (action == TrialScheduler.STOP and result.get(self._time_attr, 0) < self._finetune_grace
                and self._fine_tunes(trial.config)):
            action = TrialScheduler.CONTINUE
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
