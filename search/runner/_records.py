"""What the searcher reads of the study (the plan's snapshot) and writes when a trial ends (its
`TrialRecord`, and which checkpoints the study still keeps)."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

from optuna.trial import TrialState

from search.runner._ledger import BUDGET_CUT, _mean, _never_ran, _unflatten, plan_roles
from search.space import PlanRole, SearchSpace, StudySnapshot, TrialView
from search.studies import CURVE_KEYS, TrialRecord, is_finite


def snapshot(trials: list, *, only: str, maximize: bool, time_left: float | None,
             remaining: Callable[[dict, PlanRole, Any], "float | None"]) -> StudySnapshot:
    """The study as the plan sees it: each trial's role, state, score and, for an open plan
    fine-tune, `remaining(params, role, trial)` seconds.

    Args:
        trials: the study's frozen trials.
        only: the backbone of a space that does not search one.
        maximize: the objective's direction.
        time_left: seconds left in the budget; None: no budget.
        remaining: seconds an open plan fine-tune still needs.
    """
    roles = plan_roles(trials)
    views = []
    for t in trials:
        params = t.params or t.system_attrs.get("fixed_params") or {}
        role = roles[t.number]
        value = t.value if t.state == TrialState.COMPLETE else None
        if value is None and t.state == TrialState.PRUNED and t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        left = remaining(params, role, t) if role.is_plan_fine_tune and t.state in (
            TrialState.RUNNING, TrialState.WAITING) else None
        views.append(TrialView(t.number, role, t.state.name, str(params.get("backbone", only)), value,
                               never_ran=_never_ran(t), remaining_s=left))
    return StudySnapshot(tuple(views), maximize=maximize, time_left=time_left)


def ended_record(space: SearchSpace, config: dict, curve: list, last: dict, final: dict, *, error: str | None,
                 interrupted: bool, stopped_by: str | None) -> TrialRecord:
    """The record of an ending trial, from its config, its per-epoch results and its last result."""
    try:
        cfg_dict: dict | None = space.to_trial_config(config).to_dict()
    except Exception:
        cfg_dict = {k: v for k, v in config.items() if not k.startswith("_")}
    src = last or final
    return TrialRecord(
        config=cfg_dict,
        epochs_run=int(last.get("epoch", 0)),
        curve=tuple({k: c.get(k) for k in CURVE_KEYS if k in c} for c in curve),
        # One epoch for everything: the value, these metrics and the checkpoint are the last epoch's.
        confusion_matrix=last.get("confusion_matrix"),
        val_loss=last.get("val_loss"),
        val_balanced_acc=last.get("val_balanced_acc"),
        val_macro_f1=last.get("val_macro_f1"),
        per_class=tuple(last.get("per_class") or ()),
        best_val_acc=last.get("best_val_acc"),
        params_total=src.get("params_total"),
        params_trainable=src.get("params_trainable"),
        latency_ms=src.get("latency_ms"),
        train_seconds=final.get("train_seconds", src.get("train_seconds")),
        images_per_s=_mean([c.get("images_per_s") for c in curve]),
        node_id=final.get("node_id"),
        hostname=final.get("hostname"),
        worker=final.get("worker"),
        device=src.get("device"),
        threads=final.get("threads"),
        weights_id=src.get("weights_id"),
        versions=_unflatten(final, "versions"),
        started_at=final.get("started_at"),
        finished_at=time.time(),
        checkpoint=final.get("checkpoint"),
        error=error[:2000] if error else None,
        traceback=str(final["traceback"])[-4000:] if final.get("traceback") else None,
        interrupted=interrupted,
        stopped_by=stopped_by,
    )


def bound_checkpoints(study: Any, space: SearchSpace, ot_trial: Any, state: TrialState, value: Any, config: dict,
                      interrupted: bool, final: dict, *, keep: int) -> None:
    """Removes the checkpoints the study no longer keeps, this ending trial's among them
    (`disk.checkpoints_to_remove`); this trial's attributes say so before its state is told."""
    from search import disk

    try:
        backbone = space.to_trial_config(config).backbone
    except Exception:
        backbone = config.get("backbone")
    retry_of, continues = ot_trial.user_attrs.get("retry_of"), ot_trial.user_attrs.get("continues")
    ending = disk.CheckpointTrial(
        number=ot_trial.number, state=state.name,
        value=float(value) if state == TrialState.COMPLETE and is_finite(value) else None,
        backbone=backbone, interrupted=interrupted, retry_of=retry_of if isinstance(retry_of, int) else None,
        continues=continues if isinstance(continues, int) else None,
        has_checkpoint=bool(final.get("checkpoint")),
        budget_cut=ot_trial.user_attrs.get("stopped_by") == BUDGET_CUT,
    )
    try:
        _, own = disk.prune_study_checkpoints(study, keep=keep, ending=ending)
        if own:
            disk.remove_checkpoint(final.get("checkpoint"))
            ot_trial.set_user_attr("checkpoint", None)
            ot_trial.set_user_attr("checkpoint_removed", True)
    except Exception as e:  # disk space is not worth a trial: the next trial's end tries again
        print(f"warning: trial {ot_trial.number}: checkpoints not cleaned up: {e}", file=sys.stderr)

