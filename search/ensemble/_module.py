"""The shipped thing as one `nn.Module`: members that each bring their own preprocessing, averaged
probabilities, optional flip test-time augmentation, and a temperature.

Input is an RGB image as floats in [0, 1], a square of side `canvas` (the largest size any member
decodes at): each member resizes it to its own decode size when that differs, center-crops it to
its image size and normalises it with its own mean and std, as its trial's evaluation did. The
output is log(averaged probabilities) / temperature: `softmax` of it is the calibrated probability,
its argmax the prediction, so `tlsearch predict` needs nothing new.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from search.config import TLSearchError, atomic_save, atomic_write_text


@dataclass(frozen=True)
class MemberSpec:
    """One member: a trial's weights, or a soup of several trials of one backbone."""

    name: str  # "trial 3" or "soup resnet18 [3, 5]"
    trials: tuple[int, ...]  # the trial, or the soup's ingredients (best first)
    backbone: str  # registry name
    dropout: float  # the head's dropout (part of the module's structure)
    image_size: int  # the crop fed to the backbone
    resize_size: int  # the side it is decoded at before the crop
    mean: tuple[float, ...]  # normalisation of its weights
    std: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["trials"], d["mean"], d["std"] = list(self.trials), list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemberSpec:
        return cls(name=str(d["name"]), trials=tuple(int(t) for t in d["trials"]), backbone=str(d["backbone"]),
                   dropout=float(d.get("dropout", 0.0)), image_size=int(d["image_size"]),
                   resize_size=int(d["resize_size"]), mean=tuple(map(float, d["mean"])),
                   std=tuple(map(float, d["std"])))


class MemberNet(nn.Module):
    """One member's preprocessing (resize, center crop, normalise) followed by its network."""

    def __init__(self, model: nn.Module, spec: MemberSpec, *, canvas: int) -> None:
        super().__init__()
        self.model = model
        self.canvas = int(canvas)
        self.resize = int(spec.resize_size)
        self.crop = int(spec.image_size)
        # As torchvision's center_crop rounds it, so the crop is the pixels the trial evaluated on.
        self.offset = int(round((self.resize - self.crop) / 2.0))
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize != self.canvas:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        if self.crop != self.resize:
            x = x[:, :, self.offset:self.offset + self.crop, self.offset:self.offset + self.crop]
        return self.model((x - self.mean) / self.std)


class EnsembleNet(nn.Module):
    """Weighted average of the members' probabilities (each over the image and, with TTA, its
    mirror image), returned as log-probabilities divided by the temperature."""

    def __init__(self, members: Sequence[MemberNet], weights: Sequence[float], *, tta: bool = False,
                 temperature: float = 1.0) -> None:
        super().__init__()
        if len(members) != len(weights) or not members:
            raise ValueError(f"need one weight per member, got {len(members)} members and {len(weights)} weights")
        total = float(sum(weights))
        self.members = nn.ModuleList(members)
        self.tta = bool(tta)
        self.register_buffer("weights", torch.tensor([w / total for w in weights], dtype=torch.float32))
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The sum starts from the first member's output, not from a new tensor: tracing would keep
        # a new tensor's device as a constant, and the TorchScript file would run on that device only.
        weighted = []
        for i, member in enumerate(self.members):
            p = member(x).float().softmax(1)
            if self.tta:
                p = 0.5 * (p + member(torch.flip(x, dims=[3])).float().softmax(1))
            weighted.append(self.weights[i] * p)
        probs = weighted[0]
        for w in weighted[1:]:
            probs = probs + w
        return probs.clamp_min(1e-12).log() / self.temperature


def build_member(spec: MemberSpec, state: dict[str, torch.Tensor] | None, num_classes: int, *,
                 canvas: int) -> MemberNet:
    """A member's module with random weights, then `state` (the whole model's state_dict) loaded."""
    from search.backbones import build_backbone

    bb = build_backbone(spec.backbone, num_classes, pretrained=False, dropout=spec.dropout)
    if state is not None:
        bb.model.load_state_dict(state, strict=True)
    return MemberNet(bb.model.eval(), spec, canvas=canvas).eval()


def canvas_preprocessing(canvas: int) -> dict[str, Any]:
    """What `predict` feeds an ensemble folder: the image decoded at `canvas`, scaled to [0, 1]."""
    return {"image_size": canvas, "resize_size": canvas, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0],
            "interpolation": "bilinear"}


def save_ensemble(net: EnsembleNet, specs: Sequence[MemberSpec], out_dir: str | Path, *,
                  class_names: Sequence[str], record: dict[str, Any]) -> Path:
    """Writes an ensemble as a model folder: model.pt (the whole module's state_dict), TorchScript
    and ONNX of the whole module, model.json (kind "ensemble", members, canvas, scores).

    Args:
        net: the module to ship (on any device; saved from the CPU).
        specs: one per member of `net`, in order.
        out_dir: the folder.
        class_names: index -> class name.
        record: extra fields for model.json (candidate, scores, dataset, ...).

    Returns:
        The folder.
    """
    import warnings

    from search.model_io import _export_graphs, library_versions

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = net.cpu().eval()
    canvas = net.members[0].canvas
    atomic_save(out / "model.pt", net.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        notes = _export_graphs(net, torch.zeros(1, 3, canvas, canvas), out)
    meta = {
        "kind": "ensemble",
        "class_names": list(class_names),
        "preprocessing": canvas_preprocessing(canvas),
        "members": [{**s.to_dict(), "weight": float(w)} for s, w in zip(specs, net.weights.tolist())],
        "tta": net.tta,
        "temperature": float(net.temperature.item()),
        "params_total": sum(p.numel() for p in net.parameters()),
        "versions": library_versions(),
        "notes": notes,
        **record,
    }
    atomic_write_text(out / "model.json", json.dumps(meta, indent=2, default=str) + "\n")
    return out


def load_ensemble(folder: str | Path, meta: dict[str, Any]) -> EnsembleNet:
    """Rebuilds the module of an ensemble folder from its model.json and loads model.pt.

    Args:
        folder: the model folder.
        meta: its model.json.

    Returns:
        The module in eval mode.
    """
    from search.model_io import load_checkpoint

    folder = Path(folder)
    try:
        specs = [MemberSpec.from_dict(m) for m in meta["members"]]
        weights = [float(m["weight"]) for m in meta["members"]]
        canvas = int(meta["preprocessing"]["resize_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise TLSearchError(f"{folder / 'model.json'}: not a valid ensemble record ({type(e).__name__}: {e})") from None
    n = len(meta["class_names"])
    net = EnsembleNet([build_member(s, None, n, canvas=canvas) for s in specs], weights,
                      tta=bool(meta.get("tta")), temperature=float(meta.get("temperature", 1.0)))
    try:
        net.load_state_dict(load_checkpoint(folder / "model.pt"), strict=True)
    except RuntimeError as e:
        raise TLSearchError(f"{folder / 'model.pt'} does not match its model.json: {str(e).splitlines()[0]}") from None
    return net.eval()
