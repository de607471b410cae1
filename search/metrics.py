"""The validation metrics a search can rank by, and the scores computed from a confusion matrix.

`OBJECTIVES` is the registry `--metric` chooses from (each with its direction: `val_loss` is
minimised, the others maximised). `confusion_scores` and `per_class_table` turn a confusion matrix
(rows: true class, columns: predicted class) into the scores every trial records; the per-class
table is the one `show --json`, the report and `per_class.csv` show, and the one `evaluate` and the
ensemble step print.

Plain Python on lists of counts: importing this module costs nothing (no torch, no numpy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from search.config import ConfigError


@dataclass(frozen=True)
class Objective:
    """A metric a search can rank trials by."""

    mode: str  # "max" | "min": which way is better
    description: str  # one line for --help and errors


OBJECTIVES: dict[str, Objective] = {
    "val_acc": Objective("max", "top-1 accuracy on the validation split (default)"),
    "val_balanced_acc": Objective("max", "mean per-class recall (accuracy that every class weighs the same in)"),
    "val_macro_f1": Objective("max", "mean per-class F1 (precision and recall of every class, rare ones too)"),
    "val_loss": Objective("min", "cross-entropy on the validation split (minimised)"),
}
DEFAULT_OBJECTIVE = "val_acc"
# Top-5 accuracy is recorded (never an objective) when a dataset has at least this many classes.
TOP5_MIN_CLASSES = 10
# Every metric a trial records per epoch (the objective among them), in display order.
RECORDED = ("val_acc", "val_balanced_acc", "val_macro_f1", "val_loss", "val_top5_acc", "train_loss")
PER_CLASS_COLUMNS = ("class", "precision", "recall", "f1", "support")


def check_metric(name: Any) -> str:
    """Refuses a metric a search cannot rank by, listing the valid ones.

    Args:
        name: the metric, e.g. from `--metric`.

    Returns:
        The name, unchanged.
    """
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown metric {name!r}; available: {', '.join(OBJECTIVES)}")
    return name


def mode_of(metric: str) -> str:
    """"max" or "min": the direction of a metric (`check_metric` first)."""
    return OBJECTIVES[check_metric(metric)].mode


def chance_level(metric: str, num_classes: int) -> float | None:
    """What guessing scores on a metric with `num_classes` classes: 1/K for the accuracies and
    macro-F1 (uniform guesses), ln K for the cross-entropy of a uniform prediction.

    Args:
        metric: an `OBJECTIVES` name.
        num_classes: the dataset's classes.

    Returns:
        The chance score; None when there are fewer than two classes.
    """
    import math

    if num_classes < 2:
        return None
    return math.log(num_classes) if check_metric(metric) == "val_loss" else 1.0 / num_classes


def confusion_scores(confusion: Sequence[Sequence[int]]) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro-F1 of a confusion matrix.

    Balanced accuracy averages the recall of the classes present in the true labels. Macro-F1
    averages F1 over the classes that appear as a true or a predicted label (a class never seen
    and never predicted says nothing), with F1 = 0 where precision + recall is 0 (scikit-learn's
    `f1_score(average="macro", zero_division=0)`).

    Args:
        confusion: square counts, rows = true class, columns = predicted class.

    Returns:
        {"acc", "balanced_acc", "macro_f1"}, each in [0, 1]; 0.0 for an empty matrix.
    """
    rows = per_class_table(confusion)
    total = sum(r["support"] for r in rows)
    if not total:
        return {"acc": 0.0, "balanced_acc": 0.0, "macro_f1": 0.0}
    correct = sum(confusion[i][i] for i in range(len(rows)))
    present = [r for r in rows if r["support"] > 0]
    seen = [r for r in rows if r["support"] > 0 or r["predicted"] > 0]
    return {
        "acc": correct / total,
        "balanced_acc": sum(r["recall"] for r in present) / len(present),
        "macro_f1": sum(r["f1"] for r in seen) / len(seen),
    }


def per_class_table(
    confusion: Sequence[Sequence[int]], class_names: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support of every class, from a confusion matrix.

    Args:
        confusion: square counts, rows = true class, columns = predicted class.
        class_names: names in class-index order; None (or the wrong length): "class i".

    Returns:
        One dict per class, in class-index order: class, precision, recall, f1, support (true
        images of the class) and predicted (images predicted as it). A ratio with nothing to
        divide by is 0.0.
    """
    n = len(confusion)
    if any(len(row) != n for row in confusion):
        raise ValueError(f"a confusion matrix must be square, got {n} rows of lengths {[len(r) for r in confusion]}")
    names = list(class_names) if class_names is not None and len(class_names) == n else [f"class {i}" for i in range(n)]
    out = []
    for i in range(n):
        tp = confusion[i][i]
        support = sum(confusion[i])
        predicted = sum(confusion[j][i] for j in range(n))
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out.append({"class": str(names[i]), "precision": precision, "recall": recall, "f1": f1,
                    "support": int(support), "predicted": int(predicted)})
    return out
