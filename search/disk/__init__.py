"""What tlsearch keeps on disk, and the bounds on it.

Three kinds of files grow with use:

- the caches under `default_cache_dir()`: decoded images (`images/`, see `search.data`) and frozen
  features (`features/`, see `search.features`); each folder has a byte budget and loses its least
  recently used files first (`trim_lru`);
- trial checkpoints, `studies/<study>/checkpoints/trial-N.pt`, each with its validation logits
  beside it (`logits_path`): when a trial ends, the checkpoints no longer worth keeping are removed (`checkpoints_to_remove`, a pure rule over the study's
  trials): those of PRUNED and failed trials, and those of COMPLETE trials outside the best
  `keep` of their backbone. A trial cut short by a stop (interrupted) or by the time budget keeps
  its checkpoint until a retry or continuation of it has run to an end (`replaced_trials`);
- temporary files (`*.tmp`) a killed process left behind (`clean_stale_tmp`).

`cache_usage` and `clear` are what `tlsearch cache` shows and frees. Only the standard library is
imported here (optuna lazily), so the CLI stays light.
"""

from search.disk._budgets import (  # noqa: F401
    DEFAULT_IMAGE_BUDGET_BYTES,
    FEATURE_BUDGET_BYTES,
    image_budget_bytes,
)
from search.disk._checkpoints import (  # noqa: F401
    REMOVED_KEY,
    CheckpointTrial,
    checkpoint_trials,
    checkpoints_to_remove,
    prune_study_checkpoints,
    remove_checkpoint,
    remove_file,
    removed_on_study,
    replaced_trials,
)
from search.disk._lru import (  # noqa: F401
    IN_USE_S,
    _size,
    touch,
    trim_lru,
)
from search.disk._paths import logits_path  # noqa: F401
from search.disk._tmp import (  # noqa: F401
    _TMP_PID,
    TMP_DEAD_WRITER_S,
    TMP_STALE_S,
    clean_stale_tmp,
    is_stale_tmp,
    pid_alive,
    stale_tmp_files,
)
from search.disk._usage import (  # noqa: F401
    LIVE_HEARTBEAT_S,
    FolderUsage,
    _glob,
    _unlock_free,
    cache_usage,
    clear,
    folder_usage,
    format_bytes,
    open_study_of,
    search_running,
    study_folders,
)
