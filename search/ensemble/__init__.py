"""Ship better than the best trial: model soups, ensembles, flip TTA and temperature over a study's
kept trials, chosen on validation, scored on data no choice saw; and `evaluate` on test/.

- `_select.py`: the choices as pure functions (scores, greedy ensemble selection, greedy soup,
  temperature, calibration error, validation halves, which candidate ships).
- `_soup.py`: weight averaging and BatchNorm statistics recomputed for the average.
- `_module.py`: `EnsembleNet`, the shipped module (members with their own preprocessing, averaged
  probabilities, TTA, temperature); model folders of kind "ensemble".
- `_predict.py`: members' predictions on val and test, each computed once.
- `_choose.py`: the selection procedure over a set of validation rows.
- `_build.py`: `build_ensemble` (a study) and `ensemble_pool` (a pool and a dataset).
- `_evaluate.py`: `evaluate_model`, a model folder on a dataset's test split.
- `_format.py`: the terminal text of both.
- `_load.py`: `load_model`, a model folder of either kind (a trial's or an ensemble's).
"""

from __future__ import annotations

from search.ensemble._build import (
    DEFAULT_MAX_MEMBERS,
    build_ensemble,
    ensemble_pool,
    kept_trials,
)
from search.ensemble._choose import Candidate, choose, decide
from search.ensemble._evaluate import evaluate_model
from search.ensemble._format import format_ensemble, format_evaluation
from search.ensemble._load import load_model
from search.ensemble._module import (
    EnsembleNet,
    MemberNet,
    MemberSpec,
    load_ensemble,
    save_ensemble,
)
from search.ensemble._predict import PoolTrial, Predictions
from search.ensemble._select import (
    METRICS,
    classification_summary,
    expected_calibration_error,
    fit_temperature,
    greedy_selection,
    greedy_soup,
    halves,
    pick_shipped,
    reliability_bins,
    score,
)
from search.ensemble._soup import (
    average_state_dicts,
    batchnorm_differs,
    recompute_batchnorm,
)

__all__ = [
    "DEFAULT_MAX_MEMBERS",
    "METRICS",
    "Candidate",
    "EnsembleNet",
    "MemberNet",
    "MemberSpec",
    "PoolTrial",
    "Predictions",
    "average_state_dicts",
    "batchnorm_differs",
    "build_ensemble",
    "choose",
    "classification_summary",
    "decide",
    "ensemble_pool",
    "evaluate_model",
    "expected_calibration_error",
    "fit_temperature",
    "format_ensemble",
    "format_evaluation",
    "greedy_selection",
    "greedy_soup",
    "halves",
    "kept_trials",
    "load_ensemble",
    "load_model",
    "pick_shipped",
    "recompute_batchnorm",
    "reliability_bins",
    "save_ensemble",
    "score",
]
