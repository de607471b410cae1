"""Pre-flight checks before any trial starts, and opening (or checking) the study.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from search.config import TLSearchError, check_study_name
from search.runner._schedulers import SAMPLERS
from search.settings import SearchSettings
from search.space import Constant, SearchSpace, backbones_in

if TYPE_CHECKING:
    from search.data import DatasetIndex

MARKER = ".tlsearch"  # marks an experiment folder this tool created (resume refuses others)


def _writable(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise TLSearchError(f"{what} folder {folder} is not writable: {e.strerror or e}") from None


def _check_experiment_dir(exp: Path, study: str) -> None:
    """Refuses an existing studies/<study>/ folder this tool did not create."""
    if exp.exists() and any(exp.iterdir()) and not (exp / MARKER).is_file():
        raise TLSearchError(
            f"{exp} exists but was not created by tlsearch (no {MARKER} file); "
            f"move it away or choose another study name than {study!r}"
        )


def _uses_pretrained(space: SearchSpace) -> bool:
    p = space.param_dict.get("pretrained")
    return not (isinstance(p, Constant) and p.value is False)


def preflight(settings: SearchSettings, space: SearchSpace) -> DatasetIndex:
    """Checks everything a search needs before any trial starts (seconds, one clear line each).

    Args:
        settings: the search settings.
        space: the validated search space.

    Returns:
        The scanned dataset (`search.data.DatasetIndex`).
    """
    from search.data import scan_dataset

    check_study_name(settings.study)
    if settings.sampler not in SAMPLERS:
        raise TLSearchError(f"unknown sampler {settings.sampler!r}; available: {', '.join(SAMPLERS)}")
    _writable(Path(settings.studies_dir).resolve(), "studies")
    _check_experiment_dir(settings.experiment_dir, settings.study)
    _writable(settings.experiment_dir, "experiment")
    _writable(Path(settings.reports_dir).resolve(), "reports")
    index = scan_dataset(settings.data, val_fraction=settings.val_fraction, seed=settings.seed)
    check_space_weights(space, settings.weights_dir)
    return index


def check_space_weights(space: SearchSpace, weights_dir: str | None) -> None:
    """Makes sure every backbone of `space` has its pretrained weights, fetching those not at hand
    (a random-init space needs none). `fit` calls it before it sets the search's budget, so that a
    download is measured time, not time the budget did not know of.

    Args:
        space: the search space.
        weights_dir: the --weights-dir folder, or None.
    """
    from search import backbones

    if _uses_pretrained(space):
        for name in backbones_in(space):
            backbones.check_weights(name, weights_dir)


def _open_study(
    settings: SearchSettings, storage: Any, index: DatasetIndex, space: SearchSpace
) -> tuple[optuna.Study, bool]:
    """Creates the study, or checks that an existing one matches this dataset and space.

    Returns:
        (the study, whether this call created it): of several drivers starting on one new study,
        exactly one creates it.
    """
    direction = "maximize" if settings.mode == "max" else "minimize"
    try:
        study = optuna.create_study(study_name=settings.study, storage=storage, direction=direction)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=settings.study, storage=storage)
        created = False
    attrs = study.user_attrs
    if attrs.get("dataset_fingerprint") and attrs["dataset_fingerprint"] != index.fingerprint:
        raise TLSearchError(
            f"study {settings.study!r} was searched on a different dataset (fingerprint "
            f"{attrs['dataset_fingerprint']}, now {index.fingerprint} for {index.source}); "
            "use a new --study name"
        )
    if attrs.get("class_names") is not None and list(attrs["class_names"]) != list(index.classes):
        raise TLSearchError(
            f"study {settings.study!r} has classes {attrs['class_names']}, the dataset now has "
            f"{list(index.classes)}; use a new --study name"
        )
    if attrs.get("space"):
        why = SearchSpace.from_dict(attrs["space"], source="stored space").incompatibility(space)
        if why:
            raise TLSearchError(f"study {settings.study!r} cannot continue with this space: {why}; use a new --study name")
    stored_metric = (attrs.get("settings") or {}).get("metric") if isinstance(attrs.get("settings"), dict) else None
    if stored_metric and stored_metric != settings.metric:
        # Its per-epoch values, ASHA's rungs and the sampler's history are all of the stored metric.
        raise TLSearchError(
            f"study {settings.study!r} ranks trials by {stored_metric}, not {settings.metric}; "
            f"use a new --study name (or --metric {stored_metric})"
        )
    if study.direction != optuna.study.StudyDirection[direction.upper()]:
        raise TLSearchError(f"study {settings.study!r} was created to {study.direction.name.lower()}, not to {direction}")
    with warnings.catch_warnings():  # experimental in Optuna, but what optuna-dashboard reads
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([settings.metric])
    study.set_user_attr("dataset", index.source)  # the folder, or the label file
    study.set_user_attr("dataset_fingerprint", index.fingerprint)
    study.set_user_attr("class_names", list(index.classes))
    study.set_user_attr("split", index.split)
    study.set_user_attr("split_spec", index.split_spec.to_dict())  # what export records and train reuses
    study.set_user_attr("settings", settings.to_dict())
    study.set_user_attr("space", space.to_dict())
    return study, created
