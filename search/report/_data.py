"""Step 1 of the report: a study -> plain tables (`ReportData`), no plotly here.

What a trial produced is read through `studies.TrialRecord`, and "the best trial" is
`studies.best_trial`: the same record and rule the leaderboard, `tlsearch show` and export use.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from search.config import ConfigError, ensemble_summary_path
from search.label_issues import read_kept
from search.metrics import RECORDED
from search.report._gallery import DEFAULT_GALLERY_IMAGES, gallery_data
from search.studies import TrialRecord, best_trial, leaderboard, objective_of, score_of, shown_trials

if TYPE_CHECKING:
    import optuna


@dataclass(frozen=True)
class ReportData:
    """Everything the page shows, as plain data (no plotly objects)."""

    name: str  # the study name (user string: escape before drawing)
    metric: str  # the objective's column in `board`, e.g. "val_acc"
    maximize: bool  # True: larger metric is better
    attrs: dict  # the study's user_attrs: dataset, dataset_fingerprint, class_names, split, settings
    board: pd.DataFrame  # studies.leaderboard(study): one row per trial, best first
    trials: pd.DataFrame  # per trial: trial, state, backbone, worker, start, end (unix s), score
    curves: pd.DataFrame  # per trial and epoch: trial, state, epoch, value (the objective), then every recorded metric
    importances: dict[str, float] | str  # param -> importance, or why there are none
    confusion: dict | None  # best trial's last epoch {"trial", "matrix", "class_names"}; None: absent
    best_trial: int | None = None  # the best trial's number (studies.best_trial); None: none yet
    per_class: list[dict] | None = None  # best trial's last epoch: class, precision, recall, f1, support; None: absent
    ensemble: dict | None = None  # the last `tlsearch ensemble` summary (studies/<study>/ensemble.json); None: none
    gallery: dict | str | None = None  # `_gallery.gallery_data`: wrong val images of the best kept trials, or why none
    label_issues: dict | None = None  # the last `tlsearch check --labels` of the study's dataset; None: none
    generated: float = field(default_factory=time.time)  # when the data was read (unix s)


def collect(study: "optuna.Study", *, studies_dir: str | Path | None = None, gallery: bool = True,
            gallery_images: int = DEFAULT_GALLERY_IMAGES, cache_dir: str | Path | None = None) -> ReportData:
    """Reads a study into the plain tables the report draws.

    Args:
        study: the Optuna study.
        studies_dir: where the study's folder is, to find its ensemble summary; None: not looked for.
        gallery: read the kept validation predictions and the dataset's images for the error gallery.
        gallery_images: wrong images shown per trial.
        cache_dir: where `check --labels` kept its result; None: the default cache folder.

    Returns:
        The report data.
    """
    metric, maximize = objective_of(study)
    now = time.time()
    # One snapshot of the trials for every table, so a trial finishing meanwhile cannot make the
    # leaderboard and the plots disagree.
    trials = shown_trials(study.get_trials(deepcopy=False))
    records = [TrialRecord.from_trial(t) for t in trials]
    best = best_trial(records, maximize=maximize)
    board = leaderboard(study, trials=trials)
    by_number = {r.number: r for r in records}
    ranked = [by_number[int(n)] for n in board["trial"] if int(n) in by_number]
    attrs = dict(study.user_attrs)
    return ReportData(
        name=study.study_name,
        metric=metric,
        maximize=maximize,
        attrs=attrs,
        board=board,
        trials=_trials_table(trials, records, maximize=maximize),
        curves=_curves_table(records),
        importances=param_importances(study),
        confusion=_best_confusion(best, class_names=study.user_attrs.get("class_names")),
        best_trial=best.number if best is not None else None,
        per_class=(best.per_class_results(study.user_attrs.get("class_names")) or None) if best is not None else None,
        generated=now,
        ensemble=read_ensemble(study.study_name, studies_dir) if studies_dir is not None else None,
        gallery=gallery_data(ranked, attrs, best=best.number if best is not None else None,
                             max_images=gallery_images) if gallery else None,
        label_issues=read_kept(attrs.get("dataset_fingerprint"), cache_dir=cache_dir),
    )


def read_ensemble(name: str, studies_dir: str | Path) -> dict | None:
    """The study's last `tlsearch ensemble` summary, or None when there is none (or it is unreadable:
    a report never fails over its optional section; the next `tlsearch ensemble` rewrites the file)."""
    try:
        path = ensemble_summary_path(name, studies_dir=studies_dir)
    except ConfigError:  # a name that cannot be a folder has no study folder, so no summary
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and isinstance(summary.get("candidates"), list) else None


def _trials_table(
    trials: "list[optuna.trial.FrozenTrial]", records: list[TrialRecord], *, maximize: bool
) -> pd.DataFrame:
    """One row per trial: trial, state, backbone, worker, start, end (unix s), score."""
    rows = []
    for t, rec in zip(trials, records):
        rows.append(
            {
                "trial": rec.number,
                "state": rec.state,
                "backbone": rec.backbone,
                "worker": str(rec.worker or rec.hostname or "unknown worker"),
                "start": _as_float(rec.started_at) or _timestamp(t.datetime_start),
                "end": _as_float(rec.finished_at) or _timestamp(t.datetime_complete),
                "score": score_of(t, maximize=maximize),
            }
        )
    table = pd.DataFrame(rows, columns=["trial", "state", "backbone", "worker", "start", "end", "score"])
    # A RUNNING trial's bar ends at the study's last recorded event, not at the clock: a search
    # killed long ago leaves trials RUNNING, and bars reaching "now" would flatten the timeline.
    events = pd.concat([table["start"], table["end"]]).dropna()
    running = (table["state"] == "RUNNING") & table["start"].notna() & table["end"].isna()
    if running.any():
        table.loc[running, "end"] = float(events.max())
    return table


def _curves_table(records: list[TrialRecord]) -> pd.DataFrame:
    """One row per trial and epoch: trial, state, epoch, value (the objective at that epoch), then
    each metric of `metrics.RECORDED` that some trial's curve holds (NaN where one does not)."""
    metrics = [m for m in RECORDED if any(m in c for rec in records for c in rec.curve)]
    rows = []
    for rec in records:
        by_epoch = {c.get("epoch"): c for c in rec.curve}
        for step, value in sorted(rec.intermediate_values.items()):
            point = by_epoch.get(step, {})
            rows.append({"trial": rec.number, "state": rec.state, "epoch": step, "value": value,
                         **{m: _as_float(point.get(m)) for m in metrics}})
    return pd.DataFrame(rows, columns=["trial", "state", "epoch", "value", *metrics])


def _best_confusion(best: TrialRecord | None, *, class_names: list[str] | None) -> dict | None:
    """The best trial's confusion matrix: its last epoch (the epoch of its value), validation set."""
    if best is None or not best.confusion_matrix:
        return None
    return {"trial": best.number, "matrix": best.confusion_matrix, "class_names": class_names}


def param_importances(study: "optuna.Study") -> dict[str, float] | str:
    """Parameter importances (Optuna's PED-ANOVA) over the COMPLETE trials.

    Args:
        study: the Optuna study.

    Returns:
        param -> importance (summing to 1, most important first), or a one-line reason why there
        are none (fewer than 2 COMPLETE trials, or Optuna could not compute them).
    """
    import optuna

    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if t.values and math.isfinite(t.values[0])
    ]
    if len(complete) < 2:
        return f"needs at least 2 complete trials, this study has {len(complete)}"
    try:
        # Optuna's default evaluator (PED-ANOVA): no scikit-learn needed (fANOVA needs it), and
        # without a `target` it reads the study's direction itself.
        with warnings.catch_warnings():  # "few trials per regime": true of small searches, not news
            warnings.simplefilter("ignore")
            if len(study.directions) == 1:
                result = optuna.importance.get_param_importances(study)
            else:  # multi-objective: the first objective; PED-ANOVA treats lower as better
                sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
                result = optuna.importance.get_param_importances(study, target=lambda t: sign * t.values[0])
    except Exception as e:  # e.g. every param constant, or conditional params with no overlap
        text = str(e).strip().splitlines()
        return f"Optuna could not compute them: {text[0] if text else type(e).__name__}"
    if not result:
        return "no parameter varies across the complete trials"
    return {str(k): float(v) for k, v in result.items()}


def _as_float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _timestamp(dt: Any) -> float | None:
    return dt.timestamp() if dt is not None else None
