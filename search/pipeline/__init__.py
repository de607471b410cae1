"""`tlsearch fit` (`search.fit`): search, ship and evaluate within one time budget.

- `_presets.py`: the presets (fast, good, best), each a space and a ship policy.
- `_budget.py`: the one budget model: what the steps after the search keep of the budget, what
  the search gets, the ensemble's and the refit's estimates from measured parts, and a clock
  from the process's start whose phases add up to the wall clock (pure functions).
- `_ship.py`: the best trial's kept checkpoint, or the ensemble, as a model folder.
- `_fit.py`: `fit` and its `FitSummary`.
- `_format.py`: the one-screen summary.
"""

from __future__ import annotations

from search.pipeline._budget import (
    MIN_SEARCH_S,
    PhaseClock,
    Reserve,
    ensemble_members,
    ensemble_seconds,
    evaluate_seconds,
    fits,
    per_image_seconds,
    plan_reserve,
    process_start,
    refit_seconds,
    search_budget,
)
from search.pipeline._fit import FitSummary, default_study_name, fit, fit_reserve, refit_estimate
from search.pipeline._format import format_fit
from search.pipeline._presets import DEFAULT_PRESET, PRESETS, Preset, get_preset, preset_space
from search.pipeline._ship import Shipped, ship_ensemble, ship_trial, shipped_kind, stamp

__all__ = [
    "DEFAULT_PRESET",
    "MIN_SEARCH_S",
    "PRESETS",
    "FitSummary",
    "PhaseClock",
    "Preset",
    "Reserve",
    "Shipped",
    "default_study_name",
    "ensemble_members",
    "ensemble_seconds",
    "evaluate_seconds",
    "fit",
    "fit_reserve",
    "fits",
    "format_fit",
    "get_preset",
    "per_image_seconds",
    "plan_reserve",
    "process_start",
    "refit_estimate",
    "refit_seconds",
    "preset_space",
    "search_budget",
    "ship_ensemble",
    "ship_trial",
    "shipped_kind",
    "stamp",
]
