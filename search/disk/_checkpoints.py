"""Trial checkpoints: which ones a study keeps (a pure rule), and removing the others."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from search.disk._paths import logits_path
from search.studies import counts_toward_target, is_finite

if TYPE_CHECKING:
    import optuna



# `checkpoint_removed/<trial number>` study user_attrs record checkpoints removed after their trial
# ended (Optuna keeps a finished trial's attributes read-only); one key per trial, so several
# drivers never overwrite each other's records.
REMOVED_KEY = "checkpoint_removed/"


@dataclass(frozen=True)
class CheckpointTrial:
    """What the checkpoint rule needs to know about one trial."""

    number: int  # the Optuna trial number
    state: str  # COMPLETE | PRUNED | FAIL | RUNNING | WAITING
    value: float | None = None  # the objective value (COMPLETE trials)
    backbone: str | None = None  # best-`keep` is counted per backbone
    interrupted: bool = False  # FAIL because a stop cut it short, or never started (not counted)
    retry_of: int | None = None  # the interrupted trial this one retries
    continues: int | None = None  # the budget-cut trial whose checkpoint this one continues from
    has_checkpoint: bool = True  # a checkpoint is recorded and not removed yet
    budget_cut: bool = False  # PRUNED by the time budget: `resume` continues it from its checkpoint


def checkpoints_to_remove(trials: Sequence[CheckpointTrial], *, maximize: bool, keep: int) -> list[int]:
    """Which trials' checkpoints are no longer needed (a pure rule; nothing is removed here).

    Kept: RUNNING and WAITING trials; the best `keep` COMPLETE trials of each backbone (ties: the
    earlier trial wins), so an ensemble can mix backbones; an interrupted trial, or one the time
    budget cut short, until it is replaced (`replaced_trials`): a retry or continuation of it ran
    to an end (it may resume from it until then). Removed: PRUNED trials, failed trials, the other
    COMPLETE trials and the replaced ones.

    Args:
        trials: every trial of the study (trials without a checkpoint still count in the ranking).
        maximize: the study's direction.
        keep: COMPLETE checkpoints kept per backbone (>= 0).

    Returns:
        Trial numbers, ascending, of trials with a checkpoint to remove.
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    best: set[int] = set()
    by_backbone: dict[str | None, list[CheckpointTrial]] = {}
    for t in trials:
        if t.state == "COMPLETE" and is_finite(t.value):
            by_backbone.setdefault(t.backbone, []).append(t)
    for group in by_backbone.values():
        group.sort(key=lambda t: ((-t.value if maximize else t.value), t.number))  # type: ignore[operator]
        best.update(t.number for t in group[:keep])
    replaced = replaced_trials(trials)
    out = []
    for t in trials:
        if not t.has_checkpoint or t.state in ("RUNNING", "WAITING"):
            continue
        if t.state == "COMPLETE" and t.number in best:
            continue
        if ((t.state == "FAIL" and t.interrupted) or (t.state == "PRUNED" and t.budget_cut)) \
                and t.number not in replaced:
            continue
        out.append(t.number)
    return sorted(out)


def replaced_trials(trials: Sequence[CheckpointTrial]) -> set[int]:
    """Trials whose params a later trial ran to an end: their checkpoints are no longer needed.

    A trial that ran to an end (COMPLETE, PRUNED, or a FAIL of its own: `counts_toward_target`)
    replaces the trial it retries (`retry_of`) and the one it continues (`continues`), and, through
    them, every earlier trial of the chain (an interrupted retry of an interrupted trial, ...).
    A trial that did not run to an end replaces nothing: one that was never started (no time left
    in the budget, or crowded out of the count) or that a stop interrupted in turn; the trial
    before it keeps its checkpoint for the next retry or continuation.

    Args:
        trials: every trial of the study.

    Returns:
        The numbers of the replaced trials.
    """
    parents = {t.number: [n for n in (t.retry_of, t.continues) if n is not None] for t in trials}
    todo = [n for t in trials if counts_toward_target(t) for n in parents[t.number]]
    out: set[int] = set()
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo.extend(parents.get(n, ()))
    return out


def _trial_number(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def checkpoint_trials(trials: Sequence["optuna.trial.FrozenTrial"],
                      removed: Iterable[int] = ()) -> list[CheckpointTrial]:
    """The study's trials as the checkpoint rule sees them.

    Args:
        trials: frozen trials of one study.
        removed: numbers of trials whose checkpoint is recorded as removed on the study.

    Returns:
        One CheckpointTrial per trial.
    """
    gone = set(removed)
    out = []
    for t in trials:
        attrs = t.user_attrs
        config = attrs.get("config") if isinstance(attrs.get("config"), dict) else {}
        out.append(CheckpointTrial(
            number=t.number,
            state=t.state.name,
            value=float(t.values[0]) if t.values else None,
            backbone=t.params.get("backbone", config.get("backbone")),
            interrupted=bool(attrs.get("interrupted")),
            retry_of=_trial_number(attrs.get("retry_of")),
            continues=_trial_number(attrs.get("continues")),
            has_checkpoint=(bool(attrs.get("checkpoint")) and not attrs.get("checkpoint_removed")
                            and t.number not in gone),
            budget_cut=attrs.get("stopped_by") == "time budget",
        ))
    return out


def removed_on_study(study_attrs: dict[str, Any]) -> set[int]:
    """Trial numbers whose checkpoint the study records as removed (`REMOVED_KEY` attributes)."""
    out = set()
    for key in study_attrs:
        if key.startswith(REMOVED_KEY) and key[len(REMOVED_KEY):].isdigit():
            out.add(int(key[len(REMOVED_KEY):]))
    return out


def remove_file(path: str | os.PathLike[str] | None) -> int:
    """Removes one file if it is there; returns the bytes freed (0: nothing was there)."""
    if not path:
        return 0
    p = Path(path)
    try:
        size = p.stat().st_size
        p.unlink()
    except OSError:
        return 0
    return size


def remove_checkpoint(path: str | os.PathLike[str] | None) -> int:
    """Removes a trial's checkpoint and the validation logits kept beside it; returns bytes freed."""
    if not path:
        return 0
    return remove_file(path) + remove_file(logits_path(path))


def prune_study_checkpoints(study: "optuna.Study", *, keep: int,
                            ending: CheckpointTrial | None = None) -> tuple[list[int], bool]:
    """Removes the checkpoints of the study's finished trials that the rule no longer keeps.

    The study (its storage) is the source of truth, so several drivers on one study agree: each
    decides from what the study holds now, and a trial it does not see yet can only make it keep
    more, never remove one of the best. Checkpoints of finished trials are recorded as removed on
    the study (`REMOVED_KEY`); the caller records the ending trial's own on that trial.

    Args:
        study: the Optuna study.
        keep: COMPLETE checkpoints kept per backbone.
        ending: the trial that is ending now (not told to the study yet), with its final state.

    Returns:
        (numbers of finished trials whose checkpoint was removed, whether `ending`'s checkpoint
        is to be removed: its file is removed here, its attributes are the caller's).
    """
    import optuna

    frozen = study.get_trials(deepcopy=False)
    gone = removed_on_study(study.user_attrs)
    trials = checkpoint_trials(frozen, gone)
    if ending is not None:
        trials = [t for t in trials if t.number != ending.number] + [ending]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    doomed = set(checkpoints_to_remove(trials, maximize=maximize, keep=keep))
    removed = []
    for t in frozen:
        if t.number in doomed and (ending is None or t.number != ending.number):
            remove_checkpoint(t.user_attrs.get("checkpoint"))
            with contextlib.suppress(Exception):  # a storage hiccup: the next trial's end retries
                study.set_user_attr(f"{REMOVED_KEY}{t.number}", True)
                removed.append(t.number)
    return removed, ending is not None and ending.number in doomed
