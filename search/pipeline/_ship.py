"""The ship step of `fit`: what the search kept becomes a model folder, without retraining.

The best COMPLETE trial's own checkpoint (its last epoch, the epoch the study's value is of)
becomes a folder as `tlsearch train` writes one; or `tlsearch ensemble`'s procedure runs over the
kept trials and its folder ships. Either way model.json records the study, the trials, the dataset
fingerprint and the split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.config import TLSearchError, atomic_write_text

if TYPE_CHECKING:
    import optuna


@dataclass(frozen=True)
class Shipped:
    """What the ship step wrote."""

    model_dir: Path  # the model folder `predict` runs
    name: str  # "trial 3 (resnet18, freeze_depth all)", or the ensemble's candidate name
    kind: str  # "trial" (one trial's own weights) or "ensemble" (tlsearch ensemble's folder)
    trials: tuple[int, ...]  # the trials whose weights it holds
    val_score: float | None  # the metric on validation (a trial: the study's value for it)
    latency_ms: float | None  # batch-1 inference time as measured where it was chosen
    note: str | None = None  # something the summary should say (a trial shipped instead of the best)


def ship_trial(study: optuna.Study, out: Path) -> Shipped:
    """The best COMPLETE trial's kept checkpoint as a model folder (`search.model_io.save_model`).

    Args:
        study: the study.
        out: the model folder to write.

    Returns:
        What was shipped; its val_score is the study's value for that trial.
    """
    from search.config import TrialConfig
    from search.ensemble import kept_trials
    from search.export import trial_record
    from search.model_io import eval_preprocessing, load_trained, save_model
    from search.studies import TrialRecord, best_trial, objective_of
    from search.trial import TrialResult

    metric, maximize = objective_of(study)
    pool = kept_trials(study)
    if not pool:
        raise TLSearchError(f"study {study.study_name!r} has no COMPLETE trial with a kept checkpoint: nothing to "
                            "ship; give a larger --time-budget, or continue with tlsearch resume "
                            f"{study.study_name} --time-budget T")
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    best = best_trial(trials.values(), maximize=maximize)
    chosen = trials[pool[0].number]
    note = None
    if best is not None and best.number != chosen.number:  # its checkpoint was removed by hand
        note = f"trial {best.number}'s checkpoint is gone; shipped trial {chosen.number}, the best one kept"
    record = trial_record(study, chosen)
    rec = TrialRecord.from_trial(chosen)
    cfg = TrialConfig.from_dict(rec.config or {})
    names = list(study.user_attrs.get("class_names") or [])
    bb = load_trained(cfg, len(names), pool[0].checkpoint,
                      what=f"checkpoint {pool[0].checkpoint} of trial {chosen.number}")
    result = TrialResult(config=cfg, class_names=names, history=[dict(record["metrics"])],
                         params_total=rec.params_total or sum(p.numel() for p in bb.model.parameters()),
                         latency_ms=rec.latency_ms or 0.0, model=bb.model, preprocessing=eval_preprocessing(cfg, bb))
    save_model(result, out, record={k: record.get(k) for k in ("dataset", "dataset_fingerprint", "split", "metric")})
    return Shipped(out.resolve(), f"trial {chosen.number} ({cfg.backbone}, freeze_depth {cfg.freeze_depth})", "trial",
                   (chosen.number,), rec.value, rec.latency_ms, note)


def ship_ensemble(study: optuna.Study, out: Path, *, data: str, progress: bool,
                  allow_changed_data: bool = False) -> Shipped:
    """`tlsearch ensemble`'s procedure over the kept trials; its folder ships (one trial's when
    the out-of-sample rule keeps the best single trial).

    Args:
        study: the study.
        out: the model folder to write.
        data: the dataset.
        progress: one line per step on stderr.
        allow_changed_data: go on when DATA is not the study's dataset (`build_ensemble`).

    Returns:
        What was shipped; its val_score is the shipped candidate's on all of validation. Its kind
        is "trial" when the procedure kept the best single trial as it is (no TTA), so that
        `--refit` can train that trial's config again; "ensemble" otherwise.
    """
    from search.ensemble import build_ensemble

    storage = (study.user_attrs.get("settings") or {}).get("storage")
    summary = build_ensemble(study.study_name, out=out, data=data, storage=storage,
                             studies_dir=_studies_dir(study), progress=progress, allow_changed_data=allow_changed_data)
    row = next(r for r in summary["candidates"] if r["shipped"])
    trials = sorted({t for m in row["members"] for t in m["trials"]})
    return Shipped(Path(summary["model_dir"]), row["name"], shipped_kind(row), tuple(trials), row["val_score"],
                   row["latency_ms"])


def shipped_kind(row: dict[str, Any]) -> str:
    """"trial" for the ensemble procedure's best single trial without TTA, else "ensemble"."""
    single = row.get("kind") == "single" and not row.get("tta") and len(row.get("members") or ()) == 1
    return "trial" if single else "ensemble"


def _studies_dir(study: optuna.Study) -> str:
    return str((study.user_attrs.get("settings") or {}).get("studies_dir") or "studies")


def stamp(model_dir: Path, fields: dict[str, Any]) -> None:
    """Adds fields to a model folder's model.json (either kind), written atomically.

    Args:
        model_dir: the folder.
        fields: what to add (existing keys of the same name are replaced).
    """
    from search.model_io import read_model_meta

    folder, meta = read_model_meta(model_dir)
    atomic_write_text(folder / "model.json", json.dumps({**meta, **fields}, indent=2, default=str) + "\n")
