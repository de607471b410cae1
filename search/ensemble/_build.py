"""`build_ensemble`: a study's kept trials -> candidates, honest held-out scores, a model folder.

Choices read validation only. The held-out score is test/ when the dataset has one; otherwise the
whole procedure runs on one half of validation and is scored on the other, and the reverse
(cross-fitting): optimistic, since the search chose its trials on that same validation set.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from search.config import (
    TLSearchError,
    TrialConfig,
    atomic_write_text,
    ensemble_summary_path,
)
from search.ensemble._choose import Candidate, decide, heldout_probs
from search.ensemble._predict import PoolTrial, Predictions
from search.ensemble._select import (
    METRICS,
    classification_summary,
    expected_calibration_error,
    halves,
    metric_value,
    reliability_bins,
    score,
)

if TYPE_CHECKING:
    import optuna

    from search.data import DatasetIndex

# Greedy ensemble selection steps when the user sets none: a few members keep inference cheap.
DEFAULT_MAX_MEMBERS = 5


def build_ensemble(
    name: str,
    *,
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_latency_ms: float | None = None,
    out: str | Path | None = None,
    data: str | Path | None = None,
    storage: str | None = None,
    studies_dir: str | Path = "studies",
    device: str | None = None,
    allow_changed_data: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Soups, ensembles, TTA and temperature over a study's kept trials, without retraining.

    Args:
        name: the study.
        max_members: greedy ensemble selection steps (members, counted with repetition).
        max_latency_ms: only candidates at most this slow (batch 1, this machine) may ship.
        out: the model folder to write; None: models/<study>-ensemble.
        data: the dataset folder; None: the one the study recorded.
        storage: the study's storage URL; None: studies/<name>.db.
        studies_dir: where default SQLite studies live.
        device: where forward passes run; None: CUDA when available.
        allow_changed_data: go on when DATA is not the study's dataset (a warning).
        progress: one line per step on stderr.

    Returns:
        The summary (see `ensemble_pool`), with the study's name; also written to
        studies/<name>/ensemble.json, where the study's report finds it.
    """
    from search.studies import load_study, objective_of
    from search.trial import training_index

    study = load_study(name, storage=storage, studies_dir=studies_dir)
    metric, _ = objective_of(study)
    pool = kept_trials(study)
    if not pool:
        raise TLSearchError(f"study {name!r} has no COMPLETE trial with a kept checkpoint; nothing to ensemble")
    attrs = study.user_attrs
    source = data or attrs.get("dataset")
    if not source:
        raise TLSearchError(f"study {name!r} records no dataset; give it with --data")
    record = {"split": attrs.get("split_spec"), "dataset_fingerprint": attrs.get("dataset_fingerprint"), "study": name}
    index = training_index(source, record, allow_changed_data=allow_changed_data, source=f"study {name!r}")
    if attrs.get("class_names") is not None and list(attrs["class_names"]) != list(index.classes):
        raise TLSearchError(f"study {name!r} has classes {attrs['class_names']}, {index.source} has "
                            f"{list(index.classes)}")
    summary = ensemble_pool(
        pool, index, metric=metric if metric in METRICS else "val_acc", max_members=max_members,
        max_latency_ms=max_latency_ms, out=Path(out) if out is not None else Path("models", f"{name}-ensemble"),
        device=device, progress=progress, record={"study": name},
    )
    summary = {"study": name, **summary}
    _keep_summary(summary, ensemble_summary_path(name, studies_dir=studies_dir))
    return summary


def _keep_summary(summary: dict[str, Any], path: Path) -> None:
    """Writes the summary where the study's report finds it; a failure costs a warning, not the model."""
    try:
        atomic_write_text(path, json.dumps({**summary, "written_at": time.time()}, indent=2, default=str) + "\n")
    except OSError as e:
        _say(f"warning: could not write {path} (the report will not show this ensemble): {e.strerror or e}")


def kept_trials(study: optuna.Study) -> list[PoolTrial]:
    """The study's COMPLETE trials whose checkpoint is still on disk, best first (the pool)."""
    from search.disk import removed_on_study
    from search.studies import TrialRecord, is_finite, objective_of

    _, maximize = objective_of(study)
    gone = removed_on_study(study.user_attrs)
    out = []
    for t in study.get_trials(deepcopy=False):
        rec = TrialRecord.from_trial(t)
        if rec.state != "COMPLETE" or not is_finite(rec.value) or not rec.config or rec.checkpoint_removed:
            continue
        if t.number in gone or not rec.checkpoint or not Path(rec.checkpoint).is_file():
            continue
        out.append((rec.value, PoolTrial(t.number, TrialConfig.from_dict(rec.config), rec.checkpoint)))
    out.sort(key=lambda vt: ((-vt[0] if maximize else vt[0]), vt[1].number))
    return [t for _, t in out]


def ensemble_pool(
    pool: Sequence[PoolTrial],
    index: DatasetIndex,
    *,
    metric: str = "val_acc",
    max_members: int = DEFAULT_MAX_MEMBERS,
    max_latency_ms: float | None = None,
    out: str | Path | None = None,
    device: str | None = None,
    cache_dir: str | None = None,
    progress: bool = False,
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The procedure on a pool of trials and a dataset (what `build_ensemble` runs).

    Args:
        pool: the kept trials.
        index: the dataset on the study's split; its test samples, if any, are the held-out set.
        metric: what the choices maximise (`METRICS`).
        max_members: greedy ensemble selection steps.
        max_latency_ms: the latency budget of the shipped candidate.
        out: the model folder to write; None: none written.
        device: where forward passes run.
        cache_dir: the decoded-image cache.
        progress: one line per step on stderr.
        record: extra fields for model.json.

    Returns:
        metric; heldout (kind "test" or "cross-fitted", images, optimistic); val_images;
        candidates (name, kind, members, tta, temperature, val_score, heldout_score,
        heldout_accuracy, ece before/after on validation and held out, latency_ms, size_mb,
        shipped); shipped (name); guard (`decide`: the best on validation, its out-of-sample gain
        over the best single trial on validation halves, whether the single trial ships instead,
        the trials left out as slower alone than `max_latency_ms`);
        shipped_heldout_score (of the whole procedure); test (the
        shipped model's accuracy, balanced accuracy, per-class recall, confusion matrix, when
        there is test/); reliability (of the shipped model on held-out images, before and after
        temperature); model_dir. Scores are in the metric's own sign (val_loss: the log loss,
        lower is better); the guard's gains are larger-is-better.
    """
    from search.trial import measure_latency, pick_device

    if max_members < 1:
        raise TLSearchError(f"--max-members must be >= 1, got {max_members}")
    if max_latency_ms is not None and not max_latency_ms > 0:
        raise TLSearchError(f"--max-latency-ms must be > 0, got {max_latency_ms}")
    if len(index.val) < 2:
        raise TLSearchError(f"{index.source} has {len(index.val)} validation image(s); an ensemble is chosen on validation")
    say = _say if progress else (lambda _m: None)
    dev = pick_device(device)
    say(f"loading {len(pool)} kept trial(s)")
    preds = Predictions(pool, index, device=dev, cache_dir=cache_dir)
    latencies: dict[tuple, float] = {}

    def latency(c: Candidate) -> float:
        key = (tuple(k for k, _ in c.members), c.tta)
        if key not in latencies:
            net = preds.network(c.members, tta=c.tta, temperature=1.0)
            latencies[key] = measure_latency(net, preds.canvas, dev)
        return latencies[key]

    everything = torch.arange(len(index.val))
    say("choosing on validation")
    final, ship, guard = decide(preds, everything, metric=metric, max_members=max_members, latency=latency,
                                max_latency_ms=max_latency_ms)
    if len(index.test):
        say(f"scoring on test/ ({len(index.test)} images)")
        heldout = _test_scores(preds, final, ship, metric)
    else:
        say("no test/: cross-fitting on the two halves of validation")
        heldout = _crossfit_scores(preds, final, metric, max_members, latency, max_latency_ms)
    rows = []
    for c in final:
        h = heldout["candidates"][c.name]
        val_out = preds.output(c.members, "val", tta=c.tta)
        y = preds.labels["val"]
        rows.append({
            "name": c.name, "kind": c.kind, "shipped": c.name == ship.name,
            "members": [{"member": k, "trials": list(preds.specs[k].trials), "backbone": preds.specs[k].backbone,
                         "weight": w} for k, w in c.members],
            "tta": c.tta, "temperature": round(c.temperature, 4),
            "val_score": metric_value(c.val_score, metric), "heldout_score": metric_value(h["score"], metric),
            "heldout_accuracy": h["accuracy"],
            "val_ece_before": expected_calibration_error(val_out.softmax(1), y),
            "val_ece_after": expected_calibration_error((val_out / c.temperature).softmax(1), y),
            "heldout_ece_before": h["ece_before"], "heldout_ece_after": h["ece_after"],
            "latency_ms": round(latency(c), 3),
            "size_mb": round(sum(preds.params(k) for k, _ in c.members) * 4 / 2**20, 2),
        })
    summary: dict[str, Any] = {
        "metric": metric,
        "heldout": heldout["about"],
        "val_images": len(index.val),
        "candidates": rows,
        "shipped": ship.name,
        "guard": guard,
        "shipped_heldout_score": metric_value(heldout["shipped_score"], metric),
        "reliability": heldout["reliability"],
        "test": heldout.get("test"),
        "model_dir": None,
    }
    if out is not None:
        say(f"writing {ship.name} to {out}")
        summary["model_dir"] = str(_save(preds, ship, Path(out), index, summary, record or {}).resolve())
    return summary


def _test_scores(preds: Predictions, final: Sequence[Candidate], ship: Candidate, metric: str) -> dict[str, Any]:
    """Every candidate (chosen on all of validation) scored on test/."""
    y = preds.labels["test"]
    cands = {}
    for c in final:
        before, after = heldout_probs(preds, c, "test", calibrated=False), heldout_probs(preds, c, "test")
        cands[c.name] = _heldout_row(before, after, y, metric)
    before, after = heldout_probs(preds, ship, "test", calibrated=False), heldout_probs(preds, ship, "test")
    return {
        "about": {"kind": "test", "images": len(y), "optimistic": False,
                  "note": "test/: no choice read it"},
        "candidates": cands,
        "shipped_score": cands[ship.name]["score"],
        "reliability": {"before": reliability_bins(before, y), "after": reliability_bins(after, y)},
        "test": classification_summary(after, y, preds.index.classes),
    }


def _crossfit_scores(preds: Predictions, final: Sequence[Candidate], metric: str, max_members: int,
                     latency: Callable[[Candidate], float], max_latency_ms: float | None) -> dict[str, Any]:
    """The procedure run on each half of validation and scored on the other; predictions pooled."""
    y = preds.labels["val"]
    n, classes = len(y), len(preds.index.classes)
    a, b = halves(y)
    pooled: dict[str, list[torch.Tensor]] = {c.name: [torch.zeros(n, classes), torch.zeros(n, classes)] for c in final}
    ship_probs = [torch.zeros(n, classes), torch.zeros(n, classes)]
    for fit, held in ((a, b), (b, a)):
        chosen, ship, _ = decide(preds, fit, metric=metric, max_members=max_members, latency=latency,
                                 max_latency_ms=max_latency_ms)
        for c in chosen:
            if c.name in pooled:
                pooled[c.name][0][held] = heldout_probs(preds, c, "val", calibrated=False)[held]
                pooled[c.name][1][held] = heldout_probs(preds, c, "val")[held]
        ship_probs[0][held] = heldout_probs(preds, ship, "val", calibrated=False)[held]
        ship_probs[1][held] = heldout_probs(preds, ship, "val")[held]
    cands = {name: _heldout_row(p[0], p[1], y, metric) for name, p in pooled.items()}
    return {
        "about": {"kind": "cross-fitted", "images": n, "optimistic": True,
                  "note": "no test/: choices made on one half of validation, scored on the other, and the "
                          "reverse; optimistic, since the search chose its trials on this validation set; each row scores "
                          "its rule (best single, soup, ...), which may pick other trials on each half"},
        "candidates": cands,
        "shipped_score": score(ship_probs[1], y, metric),
        "reliability": {"before": reliability_bins(ship_probs[0], y), "after": reliability_bins(ship_probs[1], y)},
    }


def _heldout_row(before: torch.Tensor, after: torch.Tensor, y: torch.Tensor, metric: str) -> dict[str, float]:
    return {"score": score(after, y, metric), "accuracy": score(after, y, "val_acc"),
            "ece_before": expected_calibration_error(before, y), "ece_after": expected_calibration_error(after, y)}


def _save(preds: Predictions, ship: Candidate, out: Path, index: DatasetIndex, summary: dict[str, Any],
          record: dict[str, Any]) -> Path:
    from search.ensemble._module import save_ensemble

    net = preds.network(ship.members, tta=ship.tta, temperature=ship.temperature)
    row = next(r for r in summary["candidates"] if r["shipped"])
    return save_ensemble(
        net, [preds.specs[k] for k, _ in ship.members], out, class_names=index.classes,
        record={
            **record, "candidate": ship.name, "metric": summary["metric"],
            "metrics": {"val_score": row["val_score"], "heldout_score": row["heldout_score"],
                        "heldout_accuracy": row["heldout_accuracy"], "latency_ms": row["latency_ms"]},
            "heldout": summary["heldout"], "dataset": index.source, "dataset_fingerprint": index.fingerprint,
            "split": index.split_spec.to_dict() if index.split_spec is not None else None,
        },
    )


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
