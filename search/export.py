"""Best trial -> config file; trained model -> deployable folder; predict with it.

A model folder holds everything `tlsearch predict` (or a user's own code) needs:

    model.pt            state_dict of the whole model (load with weights_only=True)
    model.torchscript   TorchScript, runs without tlsearch installed
    model.onnx          ONNX, where the export works offline
    config.yaml         the trial config it was trained with
    model.json          class names, preprocessing, metrics, library versions
"""

from __future__ import annotations

import json
import platform
import warnings
from pathlib import Path
from typing import Any

from search.config import (
    RECORD_KEYS, ConfigError, TLSearchError, TrialConfig, atomic_save, atomic_write_text, check_study_name, dump_yaml,
)

FORMATS = ("yaml", "json")


def library_versions() -> dict[str, str]:
    """Versions of the libraries a trained model depends on, for the record."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("tlsearch", "torch", "torchvision", "timm", "optuna", "ray"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


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
    for key in ("val_acc", "val_balanced_acc", "val_loss", "best_val_acc", "epochs_run", "params_total", "latency_ms"):
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
    record = dict(TrialConfig.from_dict(rec.config).to_dict())
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


# ---------------------------------------------------------------------------------------------
# Model folders


def save_model(result: Any, out_dir: str | Path, *, record: dict[str, Any] | None = None) -> Path:
    """Saves a trained model as a deployable folder (see the module docstring).

    Args:
        result: a `search.trial.TrialResult` with `model` kept.
        out_dir: the folder to write.
        record: extra fields for model.json (e.g. dataset fingerprint).

    Returns:
        The folder.
    """
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = result.model.cpu().eval().to(memory_format=torch.contiguous_format)
    atomic_save(out / "model.pt", model.state_dict())
    dump_yaml(result.config.to_dict(), out / "config.yaml")
    size = result.config.image_size
    example = torch.zeros(1, 3, size, size)
    notes = []
    with warnings.catch_warnings():  # both exporters warn about their own deprecation on every call
        warnings.simplefilter("ignore")
        notes += _export_graphs(model, example, out)
    meta = {
        "class_names": result.class_names,
        "preprocessing": result.preprocessing,
        "metrics": {k: v for k, v in result.final.items() if k != "confusion_matrix"},
        "params_total": result.params_total,
        "versions": library_versions(),
        "notes": notes,
        **(record or {}),
    }
    atomic_write_text(out / "model.json", json.dumps(meta, indent=2) + "\n")
    return out


def _export_graphs(model: Any, example: Any, out: Path) -> list[str]:
    """Writes TorchScript and ONNX next to the state_dict; returns notes on what could not be written."""
    import torch

    notes = []
    try:
        with torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
        traced.save(str(out / "model.torchscript"))
    except Exception as e:  # some timm models do not trace; the state_dict still works
        notes.append(f"torchscript: {str(e).splitlines()[0]}")
    try:
        torch.onnx.export(
            model, (example,), str(out / "model.onnx"), input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
        )
    except Exception as e:  # ONNX export needs the onnx package on some torch versions
        (out / "model.onnx").unlink(missing_ok=True)
        notes.append(f"onnx: {str(e).splitlines()[0]}")
    return notes


def load_model(model_dir: str | Path) -> tuple[Any, dict[str, Any]]:
    """Loads a model folder written by `save_model` (weights with `weights_only=True`).

    Returns:
        (model in eval mode, model.json contents).
    """
    from search.backbones import build_backbone
    from search.config import load_trial_config
    from search.trial import load_checkpoint

    folder = Path(model_dir)
    if not (folder / "model.pt").is_file() or not (folder / "model.json").is_file():
        raise TLSearchError(f"{folder} is not a model folder (needs model.pt and model.json; see tlsearch train)")
    meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    config = load_trial_config(folder / "config.yaml")
    bb = build_backbone(config.backbone, len(meta["class_names"]), pretrained=False, dropout=config.dropout)
    state = load_checkpoint(folder / "model.pt")
    try:
        bb.model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise TLSearchError(f"{folder / 'model.pt'} does not match {config.backbone}: {str(e).splitlines()[0]}") from None
    return bb.model.eval(), meta


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
