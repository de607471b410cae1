"""Checkpoints and model folders on disk: the one place that saves and loads trained weights.

A checkpoint is one state_dict (`save_checkpoint`, `load_checkpoint`): a trial writes its last
epoch's after every epoch. A model folder (`save_model`, `load_trial_model`) holds everything
`tlsearch predict` (or a user's own code) needs:

    model.pt            state_dict of the whole model (load with weights_only=True)
    model.torchscript   TorchScript, runs without tlsearch installed
    model.onnx          ONNX, where the export works offline
    config.yaml         the trial config it was trained with
    model.json          class names, preprocessing, metrics, library versions

`tlsearch ensemble` writes model folders of its own kind; `search.ensemble.load_model` loads
either kind.

Weights are always read with `weights_only=True`: a pickled payload is refused, never run.
torch is imported inside the functions, so `tlsearch export` (which only writes a config file)
does not load it.
"""

from __future__ import annotations

import json
import os
import platform
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.config import TLSearchError, atomic_save, atomic_write_text, dump_yaml
from search.disk import logits_path

if TYPE_CHECKING:
    import torch
    from torch import nn


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


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Saves the model's state_dict atomically (a crash never leaves half a file)."""
    atomic_save(path, model.state_dict())


def save_val_logits(logits: torch.Tensor, labels: torch.Tensor, checkpoint_path: str | os.PathLike) -> Path:
    """Saves a trial's validation logits (N x classes, float32) and labels beside its checkpoint.

    Args:
        logits: the model's outputs on the validation images, in the index's val order.
        labels: the true class of each row.
        checkpoint_path: the trial's checkpoint; the file goes to `logits_path(checkpoint_path)`.

    Returns:
        The file written.
    """
    path = logits_path(checkpoint_path)
    atomic_save(path, {"logits": logits.detach().float().cpu(), "labels": labels.detach().long().cpu()})
    return path


def load_val_logits(checkpoint_path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (logits, labels) saved beside a checkpoint; None when there is no such file (older
    trials) or it cannot be read (then the caller computes them again)."""
    import torch

    path = logits_path(checkpoint_path)
    if not path.is_file():
        return None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        return d["logits"].float(), d["labels"].long()
    except Exception:
        return None


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Loads a state_dict with `weights_only=True`: a pickled payload is refused, never run."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TLSearchError(f"no checkpoint at {path}") from None
    except Exception as e:
        # Some loader errors have no message (an empty file): name the exception instead.
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TLSearchError(f"cannot load checkpoint {path}: {why}") from None


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


def eval_preprocessing(config: Any, bb: Any) -> dict[str, Any]:
    """What `predict` needs to see an image as a trial's evaluation saw it.

    Args:
        config: the trial's config (its image size).
        bb: its built backbone (`search.backbones.build_backbone`): normalisation, interpolation.

    Returns:
        image_size, resize_size (the side images are decoded at), mean, std, interpolation.
    """
    from search.data import stored_size

    return {
        "image_size": config.image_size,
        "resize_size": stored_size(config.image_size),
        "mean": list(bb.mean),
        "std": list(bb.std),
        "interpolation": bb.interpolation,
    }


def _export_graphs(model: nn.Module, example: torch.Tensor, out: Path) -> list[str]:
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


def read_model_meta(model_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """Checks that a folder is a model folder (of any kind) and reads its model.json.

    Args:
        model_dir: the folder.

    Returns:
        (the folder, model.json contents); its "kind" is "ensemble" for a folder `tlsearch
        ensemble` wrote, absent for one `save_model` wrote.
    """
    folder = Path(model_dir)
    if not (folder / "model.pt").is_file() or not (folder / "model.json").is_file():
        raise TLSearchError(f"{folder} is not a model folder (needs model.pt and model.json; see tlsearch train)")
    return folder, json.loads((folder / "model.json").read_text(encoding="utf-8"))


def load_trial_model(folder: str | Path, meta: dict[str, Any]) -> nn.Module:
    """Rebuilds the model of a folder written by `save_model` and loads model.pt (`weights_only=True`).

    Args:
        folder: the model folder.
        meta: its model.json (`read_model_meta`).

    Returns:
        The model in eval mode.
    """
    from search.config import load_trial_config

    folder = Path(folder)
    config = load_trial_config(folder / "config.yaml")
    import torch

    model = load_trained(config, len(meta["class_names"]), folder / "model.pt").model
    return model.to(memory_format=torch.channels_last).eval()  # the layout it trained in: faster convolutions


def load_trained(config: Any, num_classes: int, weights: str | Path, *, what: str | None = None) -> Any:
    """A config's backbone with its head, built without pretrained weights, then trained weights
    loaded (`weights_only=True`, every key matching).

    Args:
        config: the `TrialConfig` the weights were trained with (backbone, dropout).
        num_classes: outputs of its head.
        weights: a state_dict of the whole model (a trial's checkpoint, a folder's model.pt).
        what: how to name the file in an error (default: its path).

    Returns:
        The `search.backbones.Backbone` (its model in train mode; callers set eval).
    """
    from search.backbones import build_backbone

    bb = build_backbone(config.backbone, num_classes, pretrained=False, dropout=config.dropout)
    try:
        bb.model.load_state_dict(load_checkpoint(weights), strict=True)
    except RuntimeError as e:
        raise TLSearchError(f"{what or weights} does not match {config.backbone}: {str(e).splitlines()[0]}") from None
    return bb
