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

from search.space._defaults import (
    FINETUNE_LR_LIMIT,
    FINETUNE_PRIORS,
    IMBALANCE_DIMENSIONS,
    PRIOR_PARAMS,
    WARMUP_FRACTION,
    backbones_at_hand,
    default_space,
    default_space_at_hand,
    for_dataset,
    keep_stored_schedule,
    lr_warnings,
    with_finetune_priors,
)
from search.space._params import (
    DEFAULT_MAX_EPOCHS,
    FINETUNE_CHILDREN,
    POLICY_CHILDREN,
    VALID_KEYS,
    Choice,
    Constant,
    Param,
    Range,
)
from search.space._plan import (
    CHEAP_PROBE_RECIPE,
    FINE_TUNE_ORDER,
    MIN_PLAN_EPOCHS,
    WAIT,
    PlanRole,
    PlanStep,
    Probe,
    StudySnapshot,
    TrialView,
    as_probe,
    next_fine_tune,
    next_step,
    plan_epochs,
    rank_backbones,
)
from search.space._space import PROBE_LR, PROBE_RECIPE, RECIPES, Recipe, SearchSpace, backbones_in, load_space

__all__ = [
    "DEFAULT_MAX_EPOCHS",
    "FINE_TUNE_ORDER",
    "FINETUNE_CHILDREN",
    "FINETUNE_LR_LIMIT",
    "FINETUNE_PRIORS",
    "IMBALANCE_DIMENSIONS",
    "POLICY_CHILDREN",
    "PRIOR_PARAMS",
    "PROBE_LR",
    "PROBE_RECIPE",
    "Probe",
    "CHEAP_PROBE_RECIPE",
    "MIN_PLAN_EPOCHS",
    "PlanRole",
    "PlanStep",
    "StudySnapshot",
    "TrialView",
    "as_probe",
    "next_step",
    "plan_epochs",
    "RECIPES",
    "VALID_KEYS",
    "WAIT",
    "WARMUP_FRACTION",
    "Choice",
    "Constant",
    "Param",
    "Range",
    "Recipe",
    "SearchSpace",
    "backbones_in",
    "default_space",
    "backbones_at_hand",
    "default_space_at_hand",
    "for_dataset",
    "keep_stored_schedule",
    "load_space",
    "lr_warnings",
    "next_fine_tune",
    "rank_backbones",
    "with_finetune_priors",
]
