"""The leaderboard and study listings: trials -> ranked DataFrame, JSON summaries, terminal table.

Compute first; report and the CLI only render these.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from search.config import TLSearchError, printable
from search.studies._record import TrialRecord, best_trial, shown_trials
from search.studies._storage import _redact, get_storage

if TYPE_CHECKING:
    import optuna
    import pandas

# ---------------------------------------------------------------------------------------------
# Listing studies and the leaderboard (compute first; search.report and the CLI only render these).
# ---------------------------------------------------------------------------------------------

# Trial states in leaderboard order: finished-and-scored first, then stopped early, then broken,
# then not finished yet.
STATE_ORDER = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")

# The fixed leaderboard columns (DESIGN.md's words); any other search-space params follow them,
# sorted by name.
LEADERBOARD_COLUMNS = (
    "rank",
    "trial",
    "state",
    "backbone",
    "freeze_depth",
    "augmentation",
    "lr",
    "batch_size",
    "image_size",
    "epochs_run",
    "val_acc",
    "val_balanced_acc",
    "val_macro_f1",
    "val_loss",
    "params",
    "latency_ms",
    "seconds",
    "error",
)
_PARAM_COLUMNS = ("backbone", "freeze_depth", "augmentation", "lr", "batch_size", "image_size")
_METRIC_COLUMNS = ("val_acc", "val_balanced_acc", "val_macro_f1", "val_loss")
# Recorded only on some datasets (10 classes or more): a column when some trial has it.
_OPTIONAL_METRICS = ("val_top5_acc",)
_FLOAT_COLUMNS = ("lr", "val_acc", "val_balanced_acc", "val_macro_f1", "val_loss", "params", "latency_ms", "seconds",
                  *_OPTIONAL_METRICS)
_INT_COLUMNS = ("rank", "trial", "batch_size", "image_size", "epochs_run")


def objective_of(study: "optuna.Study") -> tuple[str, bool]:
    """Returns the study's metric name and whether larger is better.

    Args:
        study: the Optuna study; its `settings` user_attr may name another metric than val_acc.

    Returns:
        (metric, maximize), e.g. ("val_acc", True). Multi-objective studies use their first
        objective.
    """
    import optuna

    settings = study.user_attrs.get("settings") or {}
    metric = settings.get("metric") if isinstance(settings, dict) else None
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    return (str(metric) if metric else "val_acc"), maximize


def state_counts(trials: "list[optuna.trial.FrozenTrial]") -> dict[str, int]:
    """Counts trials by state name, every state of `STATE_ORDER` present (0 where none); draws the
    time budget refused (`never_started`) are not trials a user ran, and are not counted."""
    counts = {s: 0 for s in STATE_ORDER}
    for t in shown_trials(trials):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def score_of(trial: "optuna.trial.FrozenTrial", *, maximize: bool = True) -> float:
    """The value a trial is ranked by: its objective value when COMPLETE, else its best per-epoch
    (intermediate) value; NaN when it has none. NaN intermediate values (a NaN loss) are ignored.

    Args:
        trial: a frozen trial.
        maximize: the study's direction.

    Returns:
        The score, possibly NaN or infinite (never ranked, see `leaderboard`).
    """
    import math

    if trial.state.name == "COMPLETE" and trial.values:
        return float(trial.values[0])
    values = [float(v) for v in trial.intermediate_values.values() if not math.isnan(float(v))]
    if not values:
        return math.nan
    return max(values) if maximize else min(values)


def leaderboard(study: "optuna.Study", *, trials: list | None = None) -> "pandas.DataFrame":
    """The study's trials as a ranked table, one row per trial.

    Order: COMPLETE trials by objective value (best first), then PRUNED trials by their best
    per-epoch value (a lower-fidelity score, so they are listed but never ranked), then FAIL,
    RUNNING and WAITING trials by trial number. Inside each group a non-finite score (NaN, inf)
    sorts after every finite one, so a NaN never comes first. `rank` (1 = best) is given only to
    COMPLETE trials with a finite value; it is <NA> for every other row.

    Columns are `LEADERBOARD_COLUMNS`, then every other search-space param (sorted by name), then
    val_top5_acc when some trial recorded it (10 classes or more), then the objective's column when
    it is none of these. The objective column holds the trial value (COMPLETE) or the best per-epoch value
    (others); the other metrics come from user_attrs (final values), else from the `curve` entry of
    that epoch. `params` is the total parameter count, `seconds` the training time (user_attr
    train_seconds, else the trial's wall time), `error` the failure reason of FAIL trials.

    Args:
        study: the Optuna study.
        trials: a snapshot of its trials to rank; None: read them now. A caller that also reads
            the trials itself passes its snapshot, so a trial finishing in between cannot make
            the two disagree.

    Returns:
        A pandas DataFrame (possibly empty, still with the columns).
    """
    import math

    import pandas as pd

    metric, maximize = objective_of(study)
    if trials is None:
        trials = study.get_trials(deepcopy=False)
    trials = shown_trials(trials)
    extra_params = sorted({k for t in trials for k in t.params} - set(_PARAM_COLUMNS))
    columns = list(LEADERBOARD_COLUMNS) + [p for p in extra_params if p not in LEADERBOARD_COLUMNS]
    optional = [m for m in _OPTIONAL_METRICS
                if any(isinstance(c, dict) and m in c for t in trials for c in t.user_attrs.get("curve") or ())]
    columns += [m for m in optional if m not in columns]
    if metric not in columns:
        columns.append(metric)

    rows = []
    for t in trials:
        score = score_of(t, maximize=maximize)
        rows.append((_sort_key(t, score, maximize), _leaderboard_row(t, metric, score, maximize, optional)))
    rows.sort(key=lambda r: r[0])
    rank = 0
    records = []
    for _, row in rows:
        if row["state"] == "COMPLETE" and math.isfinite(row[metric]):
            rank += 1
            row["rank"] = rank
        records.append(row)

    df = pd.DataFrame.from_records(records, columns=columns)
    for col in (c for c in _FLOAT_COLUMNS if c in df.columns):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in _INT_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    if metric not in _FLOAT_COLUMNS:
        df[metric] = pd.to_numeric(df[metric], errors="coerce").astype("float64")
    # Renderers (format_leaderboard, search.report) read which column is the objective from here.
    df.attrs["metric"] = metric
    df.attrs["maximize"] = maximize
    return df


def _sort_key(t: "optuna.trial.FrozenTrial", score: float, maximize: bool) -> tuple:
    import math

    state = t.state.name
    group = STATE_ORDER.index(state) if state in STATE_ORDER else len(STATE_ORDER)
    if state in ("COMPLETE", "PRUNED") and math.isfinite(score):
        return (group, 0, -score if maximize else score, t.number)
    return (group, 1, 0.0, t.number)


def _leaderboard_row(
    t: "optuna.trial.FrozenTrial", metric: str, score: float, maximize: bool, optional: list[str] = ()
) -> dict:
    import math

    rec = TrialRecord.from_trial(t)
    config = rec.config or {}
    # The epoch the score comes from: the last one for COMPLETE, the best one for a stopped trial.
    epoch = max(rec.intermediate_values) if rec.intermediate_values else None
    if rec.state != "COMPLETE" and math.isfinite(score):
        epoch = next((s for s, v in sorted(rec.intermediate_values.items()) if v == score), epoch)
    at_epoch = next((c for c in rec.curve if c.get("epoch") == epoch), rec.curve[-1] if rec.curve else {})

    row: dict = {"rank": None, "trial": rec.number, "state": rec.state}
    for p in _PARAM_COLUMNS:
        row[p] = rec.params.get(p, config.get(p))
    row.update({k: v for k, v in rec.params.items() if k not in _PARAM_COLUMNS})
    row["epochs_run"] = rec.epochs_run if rec.epochs_run is not None else len(rec.intermediate_values) or None
    final = rec.state == "COMPLETE"
    for m in dict.fromkeys((*_METRIC_COLUMNS, *optional, metric)):
        recorded = getattr(rec, m, None) if m in _RECORD_METRICS else None
        if m == metric:
            row[m] = score
        elif final and recorded is not None:
            row[m] = recorded
        else:
            row[m] = at_epoch.get(m, recorded)
    row["params"] = rec.params_total
    row["latency_ms"] = rec.latency_ms
    seconds = rec.train_seconds
    if seconds is None and t.datetime_start and t.datetime_complete:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds()
    row["seconds"] = seconds
    error = rec.error
    if rec.state == "FAIL" and not error:
        error = "failed (no reason recorded)"
    row["error"] = str(error) if error else ""
    return row


# Metrics a record holds for its last epoch (the rest come from its curve).
_RECORD_METRICS = ("val_loss", "val_balanced_acc", "val_macro_f1", "best_val_acc")


def list_studies(*, studies_dir: str | Path = "studies", storage: str | None = None) -> list[dict]:
    """Lists studies with their trials by state and best trial (`tlsearch studies`).

    Args:
        studies_dir: where default SQLite studies live; every `studies_dir/*.db` is read (a file
            may hold several studies). A missing folder lists nothing.
        storage: a storage URL; when given, the studies in it are listed instead.

    Returns:
        One dict per study, sorted by file then name, JSON-ready: name, storage (password hidden),
        direction, metric, n_trials, states (count per state name), best_trial, best_value,
        best_backbone (None when no COMPLETE trial has a finite value), dataset, started (ISO time
        or None), and error (None, or why a .db file in studies_dir could not be read; such rows
        have no other details).
    """
    import optuna

    if storage:
        urls = [storage]
    else:
        urls = [f"sqlite:///{p.resolve()}" for p in sorted(Path(studies_dir).glob("*.db"))]
    rows: list[dict] = []
    for url in urls:
        try:
            st = get_storage(url)
            summaries = optuna.get_all_study_summaries(st, include_best_trial=False)
        except Exception as e:  # one unreadable file must not hide the other studies
            if storage:
                raise TLSearchError(f"cannot list studies in {_redact(url)}: {_first_line(e)}") from None
            name = Path(url.split("///", 1)[-1]).stem
            rows.append({"name": name, "storage": url, "error": _first_line(e)})
            continue
        for summary in sorted(summaries, key=lambda s: s.study_name):
            study = optuna.load_study(study_name=summary.study_name, storage=st)
            rows.append(_study_row(study, _redact(url)))
    return rows


def _study_row(study: "optuna.Study", url: str) -> dict:
    metric, maximize = objective_of(study)
    trials = study.get_trials(deepcopy=False)
    best = best_trial(trials, maximize=maximize)
    starts = [t.datetime_start for t in trials if t.datetime_start]
    return {
        "name": study.study_name,
        "storage": url,
        "direction": "maximize" if maximize else "minimize",
        "metric": metric,
        "n_trials": len(trials),
        "states": state_counts(trials),
        "best_trial": best.number if best else None,
        "best_value": float(best.values[0]) if best else None,
        "best_backbone": TrialRecord.from_trial(best).backbone if best else None,
        "dataset": study.user_attrs.get("dataset"),
        "started": min(starts).isoformat(timespec="seconds") if starts else None,
        "error": None,
    }


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def study_summary(study: "optuna.Study") -> dict:
    """Everything `tlsearch show --json` prints about a study, JSON-ready (NaN -> None).

    Args:
        study: the Optuna study.

    Returns:
        A dict: name, direction, metric, dataset, class_names, n_trials, states (count per state),
        best (None, or a dict with trial, value, params, config, epochs_run and per_class: its
        last epoch's precision, recall, f1 and support per class), leaderboard (the
        rows of `leaderboard(study)` as records, best first).
    """
    metric, maximize = objective_of(study)
    trials = study.get_trials(deepcopy=False)
    df = leaderboard(study, trials=trials)
    best = None
    t = best_trial(trials, maximize=maximize)
    if t is not None:
        best = {
            "trial": t.number,
            "value": float(t.values[0]),
            "params": {k: _jsonable(v) for k, v in t.params.items()},
            "config": t.user_attrs.get("config"),
            "epochs_run": t.user_attrs.get("epochs_run", len(t.intermediate_values)),
            # Its last epoch on the validation split, one row per class.
            "per_class": [{k: _jsonable(v) for k, v in r.items()}
                          for r in TrialRecord.from_trial(t).per_class_results(study.user_attrs.get("class_names"))],
        }
    return {
        "name": study.study_name,
        "direction": "maximize" if maximize else "minimize",
        "metric": metric,
        "dataset": study.user_attrs.get("dataset"),
        "class_names": study.user_attrs.get("class_names"),
        "n_trials": len(trials),
        "states": state_counts(trials),
        "best": best,
        "leaderboard": [{k: _jsonable(v) for k, v in r.items()} for r in df.to_dict("records")],
    }


def _jsonable(v: object) -> object:
    """numpy / pandas scalars -> Python; NaN, inf and <NA> -> None (JSON has no NaN)."""
    import math

    if v is None:
        return None
    try:
        import pandas as pd

        if v is pd.NA or v is pd.NaT:
            return None
    except ImportError:  # pragma: no cover - pandas is a dependency
        pass
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()  # numpy scalar
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# Columns `tlsearch show` prints, with their formats; the rest stay in --json and the CSV.
_SHOW_COLUMNS = {
    "rank": "{}",
    "trial": "{}",
    "state": "{}",
    "backbone": "{}",
    "freeze_depth": "{}",
    "augmentation": "{}",
    "lr": "{:.1e}",
    "batch_size": "{}",
    "image_size": "{}",
    "epochs_run": "{}",
    "val_acc": "{:.4f}",
    "val_loss": "{:.4f}",
    "params": "{:.1f}M",
    "latency_ms": "{:.1f}",
    "seconds": "{:.0f}",
    "error": "{}",
}
_ERROR_WIDTH = 50


def format_leaderboard(df: "pandas.DataFrame", *, top: int | None = None) -> str:
    """Renders a leaderboard as a plain-text table for the terminal.

    Args:
        df: a DataFrame from `leaderboard`.
        top: print only the first `top` rows (the best ones); None prints all.

    Returns:
        The table, one line per trial plus a header and a line of counts by state; missing values
        print as "-". Control characters in user strings are replaced, so a hostile param value or
        error text cannot drive the terminal.
    """
    if top is not None and top < 1:
        raise TLSearchError(f"--top must be at least 1, got {top}")
    shown = df if top is None else df.head(top)
    cols = [c for c in _SHOW_COLUMNS if c in df.columns]
    metric = df.attrs.get("metric")
    if metric and metric in df.columns and metric not in cols:  # the objective is another metric
        cols.insert(cols.index("val_acc"), metric)

    def cell(col: str, v: object) -> str:
        v = _jsonable(v)
        if v is None or v == "":
            return "-"
        if col == "params":
            v = float(v) / 1e6
        fmt = _SHOW_COLUMNS.get(col, "{:.4f}" if isinstance(v, float) else "{}")
        try:
            text = fmt.format(v)
        except (ValueError, TypeError):
            text = str(v)
        text = printable(text)
        if col == "error" and len(text) > _ERROR_WIDTH:
            text = text[: _ERROR_WIDTH - 3] + "..."
        return text

    table = [cols] + [[cell(c, r[c]) for c in cols] for r in shown.to_dict("records")]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table]
    counts = df["state"].value_counts().to_dict() if len(df) else {}
    tally = ", ".join(f"{counts[s]} {s.lower()}" for s in STATE_ORDER if counts.get(s))
    more = f" (showing {len(shown)})" if len(shown) < len(df) else ""
    lines.append(f"{len(df)} trials: {tally or 'none yet'}{more}")
    return "\n".join(lines)
