"""Studies: where they are stored, what a trial produced (`TrialRecord`) and the rules on it,
and the leaderboard.

- `_storage`: storage URLs and opening a study (SQLite by default, any Optuna RDB or a journal file);
- `_record`: `TrialRecord`, `best_trial`, `counts_toward_target`, `pareto_front`;
- `_leaderboard`: trials -> ranked DataFrame, study listings and summaries, the terminal table.
"""

from search.studies._leaderboard import (
    LEADERBOARD_COLUMNS,
    STATE_ORDER,
    format_leaderboard,
    leaderboard,
    list_studies,
    objective_of,
    score_of,
    state_counts,
    study_summary,
)
from search.studies._record import (
    CURVE_KEYS,
    TrialRecord,
    best_trial,
    counts_toward_target,
    is_finite,
    never_started,
    stopped_before_first_epoch,
    pareto_flags,
    pareto_front,
    shown_trials,
)
from search.studies._storage import SQLITE_TIMEOUT_S, default_storage_url, get_storage, load_study

__all__ = [
    "CURVE_KEYS",
    "LEADERBOARD_COLUMNS",
    "SQLITE_TIMEOUT_S",
    "STATE_ORDER",
    "TrialRecord",
    "best_trial",
    "counts_toward_target",
    "default_storage_url",
    "format_leaderboard",
    "get_storage",
    "is_finite",
    "leaderboard",
    "list_studies",
    "load_study",
    "never_started",
    "stopped_before_first_epoch",
    "objective_of",
    "pareto_flags",
    "pareto_front",
    "score_of",
    "shown_trials",
    "state_counts",
    "study_summary",
]
