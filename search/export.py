"""Best trial -> config file (`export_trial`); a saved model folder -> predictions (`predict`).

Model folders themselves (what they hold, how they are written and read) are `search.model_io`;
`save_model` and `library_versions` are re-exported here for existing callers. Either kind of
folder, a trial's or an ensemble's, is loaded by `search.ensemble.load_model`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from search.config import (
    RECORD_KEYS, ConfigError, TLSearchError, TrialConfig, atomic_write_text, check_study_name, dump_yaml,
)
from search.model_io import library_versions, save_model  # noqa: F401  (re-exported)

FORMATS = ("yaml", "json")


def trial_record(study: Any, trial: Any) -> dict[str, Any]:
    """A trial's config plus, for the record, where it came from and how it scored.

    Everything recorded about the run (library versions, thread count, device, weights identity)
    is what the trial recorded when it ran, not what this machine has today; a trial from before
    these were recorded says "unknown".

    Args:
        study: the Optuna study.
        trial: one of its FrozenTrials; its user_attrs hold the full config.

    Returns:
        A dict that `tlsearch train` accepts unchanged.
    """
    from search.studies import TrialRecord, objective_of

    rec = TrialRecord.from_trial(trial)
    if not rec.config:
        raise TLSearchError(f"trial {trial.number} of study {study.study_name!r} has no stored config")
    metric, _ = objective_of(study)
    metrics = {metric: rec.value if rec.value is not None else rec.last_value}
    for key in ("val_acc", "val_balanced_acc", "val_macro_f1", "val_loss", "val_top5_acc", "best_val_acc", "epochs_run",
                "params_total", "latency_ms"):
        if key in metrics:
            continue
        v = getattr(rec, key, None)
        if v is None and rec.curve:
            v = rec.curve[-1].get(key)
        if v is not None:
            metrics[key] = v
    attrs = study.user_attrs
    settings = attrs.get("settings") or {}
    threads = rec.threads or max(1, int(settings.get("cpus_per_trial", 1)))
    record = dict(stored_config(rec.config).to_dict())
    record.update(
        {
            # CPU kernels sum in an order that depends on the thread count: training again with
            # the trial's own thread count reproduces it exactly.
            "threads": threads,
            "study": study.study_name,
            "trial": trial.number,
            "state": trial.state.name,
            "metric": metric,
            "metrics": metrics,
            "dataset": attrs.get("dataset"),
            "dataset_fingerprint": attrs.get("dataset_fingerprint"),
            "class_names": attrs.get("class_names"),
            "device": rec.device or "unknown",
            "weights_id": rec.weights_id or ("random" if not record["pretrained"] else "unknown"),
            "versions": dict(rec.versions) if rec.versions else "unknown",
        }
    )
    if attrs.get("split_spec"):
        # The search's own split (its --seed and --val-fraction, or DATA's folders): `train`
        # validates on exactly it, so its val_acc compares with the study's.
        record["split"] = dict(attrs["split_spec"])
    assert set(record) - set(TrialConfig().to_dict()) <= RECORD_KEYS
    return record


def stored_config(config: dict[str, Any]) -> TrialConfig:
    """The config a trial ran, from the dict stored with it.

    A trial stored before a field existed ran at what that field's absence meant then, which is
    not always today's default (`search.space.keep_stored_schedule`'s rule): a study made before
    `lr_schedule` trained with the per-batch cosine.

    Args:
        config: the trial's stored config (user_attrs["config"]).

    Returns:
        The validated config.
    """
    from search.space._defaults import _BEFORE

    return TrialConfig.from_dict({**_BEFORE, **config})


def export_trial(
    name: str,
    *,
    trial: int | None = None,
    out: str | Path | None = None,
    fmt: str = "yaml",
    pareto: bool = False,
    storage: str | None = None,
    studies_dir: str | Path = "studies",
    reports_dir: str | Path = "reports",
) -> list[Path]:
    """Writes the best (or a chosen) trial's config, or the score/size Pareto set.

    Args:
        name: the study name.
        trial: a trial number; None: the best COMPLETE trial.
        out: the file to write; None: reports/<study>/best.<fmt> (pareto: pareto-<n>.<fmt>).
        fmt: "yaml" or "json".
        pareto: write every COMPLETE trial on the Pareto front of the study's objective (in its
            direction) against the parameter count.
        storage: the study's storage URL; None: studies/<name>.db.
        studies_dir: where default SQLite studies live.
        reports_dir: where reports live.

    Returns:
        The files written.
    """
    from search.studies import best_trial, load_study, objective_of, pareto_front

    check_study_name(name)  # it becomes a folder name under reports/
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; available: {', '.join(FORMATS)}")
    study = load_study(name, storage=storage, studies_dir=studies_dir)
    _, maximize = objective_of(study)
    trials = study.get_trials(deepcopy=False)
    if pareto:
        chosen = pareto_front(trials, maximize=maximize)
        if not chosen:
            raise TLSearchError(f"study {name!r} has no COMPLETE trial to export")
    elif trial is not None:
        by_number = {t.number: t for t in trials}
        if trial not in by_number:
            raise TLSearchError(f"study {name!r} has no trial {trial} (trials 0..{len(by_number) - 1})")
        chosen = [by_number[trial]]
    else:
        best = best_trial(trials, maximize=maximize)
        if best is None:
            raise TLSearchError(f"study {name!r} has no COMPLETE trial yet; nothing to export")
        chosen = [best]

    folder = Path(reports_dir, name)
    written = []
    for t in chosen:
        if out is not None and len(chosen) == 1:
            path = Path(out)
        elif out is not None:
            path = Path(out).with_name(f"{Path(out).stem}-{t.number}{Path(out).suffix or '.' + fmt}")
        else:
            path = folder / (f"pareto-{t.number}.{fmt}" if pareto else f"best.{fmt}")
        written.append(_write_record(trial_record(study, t), path, fmt))
    return written


def _write_record(record: dict[str, Any], path: Path, fmt: str) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "json" or path.suffix == ".json":
            return atomic_write_text(path, json.dumps(record, indent=2) + "\n")
        return dump_yaml(record, path)
    except OSError as e:  # --out under a file, onto a folder, read-only: bad input, one line
        raise TLSearchError(f"cannot write {path}: {e.strerror or e}") from None


def predict(model_dir: str | Path, images: list[str | Path], *, top: int = 1) -> list[dict[str, Any]]:
    """Classifies images with a saved model.

    Args:
        model_dir: a folder written by `tlsearch train`.
        images: image files.
        top: how many classes to return per image.

    Returns:
        One dict per image: image, and `top` list of (class, probability) best first; or error.
    """
    import torch

    from search.augment import eval_transform
    from search.data import BadImageError, decode_resized
    from search.ensemble import load_model

    model, meta = load_model(model_dir)
    pre = meta["preprocessing"]
    tf = eval_transform(pre["image_size"], mean=tuple(pre["mean"]), std=tuple(pre["std"]))
    names = meta["class_names"]
    k = max(1, min(top, len(names)))
    out = []
    for path in images:
        try:
            arr = decode_resized(path, pre["resize_size"])
        except (BadImageError, OSError) as e:
            out.append({"image": str(path), "error": str(e)})
            continue
        x = tf(torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()).unsqueeze(0)
        with torch.no_grad():
            prob = model(x).softmax(1)[0]
        p, idx = prob.topk(k)
        out.append({"image": str(path), "top": [[names[i], round(float(v), 4)] for v, i in zip(p, idx.tolist())]})
    return out
