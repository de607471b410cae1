"""What a trial produced, typed (`TrialRecord`), and the rules on it, each written once.

Optuna's `FrozenTrial` holds a trial's state, value, params and per-epoch values; everything else
a trial produced (its config, costs, curve, where it ran, checkpoint, error, versions) is stored in
its user_attrs. `TrialRecord` is that record as one frozen dataclass: the runner writes it with
`to_user_attrs()`, and the leaderboard, report and export read it back with `from_trial()`.

The rules about trials live here, next to the record: `best_trial`, `counts_toward_target` and
`pareto_front`, each given the study's direction where it matters.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence, TypeVar

if TYPE_CHECKING:
    import optuna

T = TypeVar("T")

# The metrics kept per epoch in a trial's curve.
# Every validation metric is among them (search.metrics.RECORDED), so the report can draw any of them;
# val_top5_acc only where the dataset has 10 classes or more.
CURVE_KEYS = ("epoch", "val_acc", "val_loss", "val_balanced_acc", "train_loss", "epoch_seconds", "images_per_s",
              "val_macro_f1", "val_top5_acc", "feature_pass_s")


def is_finite(v: Any) -> bool:
    """Whether `v` is a real, finite number (bools and None are not)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class TrialRecord:
    """One trial: Optuna's view of it (number, state, value, params) plus what it produced."""

    number: int = -1  # the Optuna trial number
    state: str = "RUNNING"  # COMPLETE | PRUNED | FAIL | RUNNING | WAITING
    value: float | None = None  # the objective (COMPLETE trials only)
    params: Mapping[str, Any] = field(default_factory=dict)  # the sampled params
    intermediate_values: Mapping[int, float] = field(default_factory=dict)  # epoch -> objective
    # --- user_attrs: what the trial produced ---
    config: Mapping[str, Any] | None = None  # the TrialConfig it ran, as a dict
    epochs_run: int | None = None  # epochs it finished
    curve: tuple[Mapping[str, Any], ...] = ()  # per-epoch metrics (CURVE_KEYS)
    confusion_matrix: list | None = None  # the last epoch's (rows: true class)
    val_loss: float | None = None  # last epoch's
    val_balanced_acc: float | None = None  # last epoch's
    val_macro_f1: float | None = None  # last epoch's
    # last epoch's precision, recall, f1 and support per class (metrics.per_class_table)
    per_class: tuple[Mapping[str, Any], ...] = ()
    best_val_acc: float | None = None  # the best epoch's val_acc (labelled as such where shown)
    params_total: int | None = None  # parameters of the whole model
    params_trainable: int | None = None  # parameters that received gradients
    latency_ms: float | None = None  # batch-1 inference time on the trial's device
    train_seconds: float | None = None  # wall time of the trial function
    images_per_s: float | None = None  # mean training throughput over its epochs
    node_id: str | None = None  # the Ray node it ran on
    hostname: str | None = None
    worker: str | None = None  # host:pid of the worker process
    device: str | None = None  # cpu, cuda:0, ...
    threads: int | None = None  # torch CPU threads it trained with (exact reproduction needs them)
    weights_id: str | None = None  # content identity of the pretrained weights loaded, or random
    versions: Mapping[str, str] | None = None  # library versions of the worker that ran it
    started_at: float | None = None  # unix seconds
    finished_at: float | None = None
    checkpoint: str | None = None  # its last epoch's state_dict, while kept
    checkpoint_removed: bool = False  # the checkpoint was removed to bound disk use
    error: str | None = None  # why it failed, or why it was stopped by the driver
    traceback: str | None = None
    interrupted: bool = False  # cut short by the driver (Ctrl-C, time budget, crash): not counted
    retry_of: int | None = None  # the interrupted trial whose params it runs again
    continues: int | None = None  # the budget-cut trial it continues from that trial's checkpoint
    stopped_by: str | None = None  # PRUNED: "asha" (early stopping) or "time budget" (the run's end)
    recipe: str | None = None  # the warm-start recipe it runs (linear probe, last stages, ...)
    baseline: bool = False  # a warm-start trial enqueued by the search
    driver: str | None = None  # the driver that runs it (host:pid:token)
    heartbeat: float | None = None  # last sign of life of that driver (unix seconds)

    # The fields that live in the FrozenTrial itself, not in user_attrs.
    _TRIAL_FIELDS = ("number", "state", "value", "params", "intermediate_values")

    @classmethod
    def from_trial(cls, trial: "optuna.trial.FrozenTrial") -> "TrialRecord":
        """Reads a trial's record (unknown user_attrs are ignored, missing ones are defaults).

        Args:
            trial: a frozen trial of any state.

        Returns:
            The record.
        """
        attrs = trial.user_attrs
        known = {f.name for f in fields(cls)} - set(cls._TRIAL_FIELDS)
        values = {k: v for k, v in attrs.items() if k in known}
        if isinstance(values.get("curve"), list):
            values["curve"] = tuple(c for c in values["curve"] if isinstance(c, dict))
        elif "curve" in values:
            values["curve"] = ()
        if isinstance(values.get("per_class"), list):
            values["per_class"] = tuple(r for r in values["per_class"] if isinstance(r, dict))
        elif "per_class" in values:
            values["per_class"] = ()
        if not isinstance(values.get("config"), dict):
            values["config"] = None
        for flag in ("interrupted", "checkpoint_removed", "baseline"):
            values[flag] = bool(values.get(flag, False))
        value = trial.values[0] if trial.state.name == "COMPLETE" and trial.values else None
        return cls(
            number=trial.number, state=trial.state.name, value=value, params=dict(trial.params),
            intermediate_values=dict(trial.intermediate_values), **values,
        )

    def to_user_attrs(self) -> dict[str, Any]:
        """The user_attrs to store for this record (JSON-ready). Trial fields and fields at their
        default (nothing recorded: no error, not interrupted, ...) are left out."""
        out: dict[str, Any] = {}
        blank = TrialRecord()
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in self._TRIAL_FIELDS or v == getattr(blank, f.name):
                continue
            if f.name in ("curve", "per_class"):
                v = [dict(c) for c in v]
            elif isinstance(v, Mapping):
                v = dict(v)
            out[f.name] = v
        return out

    def replace(self, **changes: Any) -> "TrialRecord":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def backbone(self) -> str | None:
        """The backbone it ran (from its params, else its config)."""
        return self.params.get("backbone", (self.config or {}).get("backbone"))

    def per_class_results(self, class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Its last epoch's per-class precision, recall, F1 and support (`metrics.per_class_table`).

        Args:
            class_names: the study's class names, for a trial that recorded only its confusion
                matrix (one run before per-class results were recorded).

        Returns:
            One dict per class (class, precision, recall, f1, support, predicted); [] when the
            trial recorded neither.
        """
        if self.per_class:
            return [dict(r) for r in self.per_class]
        if not self.confusion_matrix:
            return []
        from search.metrics import per_class_table

        try:
            return per_class_table(self.confusion_matrix, class_names)
        except (TypeError, ValueError, IndexError):  # a damaged matrix: no table rather than no summary
            return []

    @property
    def last_value(self) -> float | None:
        """The objective at its last reported epoch (any state)."""
        if not self.intermediate_values:
            return None
        return self.intermediate_values[max(self.intermediate_values)]


# ----- the rules ------------------------------------------------------------------------------------


def never_started(trial: Any) -> bool:
    """Whether a trial is a draw the time budget refused (FAIL "not started"): it never ran, so
    the leaderboard, the counts and the report leave it out (the study keeps it, as Optuna asked it).

    Args:
        trial: a frozen trial or a `TrialRecord`.

    Returns:
        True for a refused draw.
    """
    attrs = trial.user_attrs if hasattr(trial, "user_attrs") else {}
    return bool(attrs.get("not_started"))


def stopped_before_first_epoch(trial: Any) -> bool:
    """Whether the time budget stopped a trial before it finished an epoch (PRUNED, stopped_by
    "time budget", no epoch): stopped, not failed; shown as such, and not counted.

    Args:
        trial: a frozen trial or a `TrialRecord`.
    """
    attrs = trial.user_attrs if hasattr(trial, "user_attrs") else {}
    if hasattr(trial, "user_attrs"):
        epochs = attrs.get("epochs_run") or len(getattr(trial, "intermediate_values", {}) or {})
        stopped_by = attrs.get("stopped_by")
    else:
        epochs, stopped_by = getattr(trial, "epochs_run", 0), getattr(trial, "stopped_by", None)
    return stopped_by == "time budget" and not epochs


def shown_trials(trials: list) -> list:
    """The trials a user reads about: every one but the draws that never started (`never_started`)."""
    return [t for t in trials if not never_started(t)]


def counts_toward_target(trial: Any) -> bool:
    """Whether a finished trial counts toward the requested trial count.

    COMPLETE and PRUNED trials count (but not one the time budget stopped before its first
    epoch), and so does a FAIL that the trial itself caused (an error);
    a FAIL the driver caused (Ctrl-C, time budget, a crash: `interrupted`) does not, since its
    params are run again. Running and waiting trials are not finished.

    Args:
        trial: a FrozenTrial, or a record with `state` and `interrupted` (a TrialRecord, a
            `disk.CheckpointTrial`).

    Returns:
        True when it counts.
    """
    state = trial.state if isinstance(trial.state, str) else trial.state.name
    if state == "PRUNED" and stopped_before_first_epoch(trial):
        return False  # the budget ended before it trained: its params run again on resume
    if state in ("COMPLETE", "PRUNED"):
        return True
    if state == "FAIL":
        attrs = getattr(trial, "user_attrs", None)
        interrupted = attrs.get("interrupted") if attrs is not None else trial.interrupted
        return not interrupted
    return False


def _value(trial: Any) -> float | None:
    if isinstance(trial, TrialRecord):
        return trial.value
    return trial.values[0] if trial.values else None


def best_trial(trials: Iterable[T], *, maximize: bool) -> T | None:
    """The best COMPLETE trial with a finite value (the earliest on ties); None when there is none.

    Args:
        trials: FrozenTrials or TrialRecords.
        maximize: the study's direction.

    Returns:
        The best trial, or None.
    """
    best, best_value = None, None
    for t in trials:
        state = t.state if isinstance(t.state, str) else t.state.name
        v = _value(t)
        if state != "COMPLETE" or not is_finite(v):
            continue
        if best is None or (v > best_value if maximize else v < best_value):
            best, best_value = t, v
    return best


def pareto_flags(costs: Sequence[float], scores: Sequence[float], *, maximize: bool) -> list[bool]:
    """Marks the points that no other point beats on both cost (lower is better) and score.

    Args:
        costs: cost per point (parameters, latency).
        scores: score per point.
        maximize: True when a larger score is better, False when smaller is.

    Returns:
        One flag per point: True where the point is on the Pareto front.
    """
    sign = 1.0 if maximize else -1.0
    flags = []
    for i, (c, s) in enumerate(zip(costs, scores)):
        dominated = any(
            c2 <= c and sign * s2 >= sign * s and (c2 < c or sign * s2 > sign * s)
            for j, (c2, s2) in enumerate(zip(costs, scores))
            if j != i
        )
        flags.append(not dominated)
    return flags


def pareto_front(
    trials: Sequence[T], *, maximize: bool, cost: Callable[[T], float] | None = None
) -> list[T]:
    """The COMPLETE trials on the score vs cost Pareto front, cheapest first.

    Args:
        trials: FrozenTrials or TrialRecords (others than COMPLETE with a finite value are left out).
        maximize: the study's direction.
        cost: a trial's cost; default: its parameter count (user_attr params_total; unknown = inf).

    Returns:
        The trials on the front, sorted by cost.
    """
    def default_cost(t: Any) -> float:
        v = t.params_total if isinstance(t, TrialRecord) else t.user_attrs.get("params_total")
        return float(v) if is_finite(v) else math.inf

    cost = cost or default_cost
    scored = [t for t in trials if best_trial([t], maximize=maximize) is not None]
    costs = [cost(t) for t in scored]
    flags = pareto_flags(costs, [_value(t) for t in scored], maximize=maximize)
    return [t for _, t in sorted(((c, t) for c, t, f in zip(costs, scored, flags) if f), key=lambda p: p[0])]
