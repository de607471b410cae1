"""The search: Ray Tune runs trials, ASHA stops the weak ones, Optuna samples and records them.

The only package that imports ray. Its modules:

- `_ledger`: how a trial ended (`trial_outcome`), what counts toward the target, reconciling
  trials of stopped drivers (no Ray);
- `_search`: samplers, `HonestOptunaSearch`, `PruneTrackingASHA`;
- `_trainable`: what runs in a Ray worker;
- `_progress`: the live view and the report refresh;
- `_preflight`: checks before any trial, opening the study;
- `_cluster`: starting or joining Ray, checking the nodes;
- `_run`: `run_search`, `resume_search`.
 One search is `run_search(settings)`:

1. pre-flight (seconds, before any trial): dataset, space, weights, writable folders, and, for an
   existing study, the same dataset and a compatible space;
2. reconcile the study: trials a crashed driver left RUNNING become FAIL ("interrupted") and
   their params are enqueued again, so they are retried;
3. a `ray.tune.Tuner` runs the trials still missing: `HonestOptunaSearch` (define-by-run space on
   the study's storage), ASHA with one rung per epoch, each trial calling `trial.fine_tune`.

The Optuna study is the source of truth: a resumed search counts what the study holds, never what
Ray's experiment folder says, so every run gets a fresh Ray run folder under studies/<study>/.

Honest states: COMPLETE means the trial ran its config's full `epochs`; a trial ASHA stopped is
PRUNED with every per-epoch value; a trial that raised (or whose metric is NaN/inf, or whose
worker died) is FAIL with the reason in user_attrs["error"]; a trial cut short by Ctrl-C, the time
budget or a crash is FAIL with user_attrs["interrupted"] = True and its params are retried; it
does not count toward `settings.trials`.
"""

from search.runner._cluster import (  # noqa: F401
    LOOPBACK,
    NODE_CHECK_FILES,
    NODE_CHECK_TIMEOUT_S,
    QUIET_LOGGERS,
    RUN_LOG,
    _ensure_ray,
    _node_sees,
    _single_machine_ray,
    check_nodes_see_data,
    console_log,
    default_concurrency,
    start_ray,
    stop_ray,
)
from search.runner._ledger import (  # noqa: F401
    HEARTBEAT_S,
    INTERRUPTED,
    STALE_AFTER_S,
    SURPLUS,
    RunSummary,
    _base_tally,
    _claimed,
    _mean,
    _other_drivers,
    _process_host,
    _Tally,
    _unflatten,
    finished_count,
    is_stale,
    new_driver_id,
    reconcile,
    trial_outcome,
)
from search.runner._preflight import (  # noqa: F401
    MARKER,
    _check_experiment_dir,
    _open_study,
    _uses_pretrained,
    _writable,
    check_space_weights,
    preflight,
)
from search.runner._progress import (  # noqa: F401
    PROGRESS_EVERY_S,
    REPORT_EVERY_S,
    ProgressView,
    ReportRefresher,
)
from search.runner._run import (  # noqa: F401
    REUSE_ACTORS,
    _heartbeats,
    _quiet_tune,
    _summary,
    _tune,
    resume_search,
    run_search,
)
from search.runner._schedulers import (  # noqa: F401
    PruneTrackingASHA,
    SamplerEntry,
    _nan_rungs_quiet,
    make_sampler,
)
from search.runner._search import HonestOptunaSearch  # noqa: F401
from search.runner._trainable import (  # noqa: F401
    TrialFn,
    _free_memory,
    _trainable,
)

__all__ = ['HEARTBEAT_S', 'HonestOptunaSearch', 'INTERRUPTED', 'LOOPBACK', 'MARKER', 'NODE_CHECK_FILES', 'NODE_CHECK_TIMEOUT_S', 'PROGRESS_EVERY_S', 'ProgressView', 'PruneTrackingASHA', 'REPORT_EVERY_S', 'REUSE_ACTORS', 'ReportRefresher', 'RunSummary', 'STALE_AFTER_S', 'SURPLUS', 'SamplerEntry', 'TrialFn', 'check_nodes_see_data', 'check_space_weights', 'console_log', 'default_concurrency', 'finished_count', 'is_stale', 'make_sampler', 'new_driver_id', 'preflight', 'reconcile', 'resume_search', 'run_search', 'start_ray', 'stop_ray', 'trial_outcome']
