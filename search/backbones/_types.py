"""The types every backbone source shares: stages, registry entries, the built model, its errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from search.config import TLSearchError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(TLSearchError):
    """Pretrained weights are missing, cannot be fetched, or do not fit the network."""


@dataclass(frozen=True)
class Stage:
    """One named stage of a backbone: the unit that `freeze` freezes."""

    name: str  # e.g. "stem", "layer1", "norm"
    paths: tuple[str, ...]  # dotted names of modules or parameters inside the body


StageLayout = Callable[[nn.Module], list[Stage]]


@dataclass(frozen=True)
class BackboneSpec:
    """A registry entry: how to build a backbone, where its classifier is, how to cut stages."""

    name: str  # registry name: torchvision model name, or timm/<name>
    family: str  # architecture family, e.g. "resnet", "efficientnet", "timm"
    description: str  # one line for `tlsearch backbones`
    classifier: str  # dotted path of the module replaced by nn.Identity (holds the last Linear)
    stages: StageLayout = field(repr=False)  # body (classifier already removed) -> ordered stages


@dataclass(frozen=True)
class Preprocessing:
    """What the pretrained weights expect of an image: normalisation, resampling, input side."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bilinear" or "bicubic", as the weights were trained
    size: int  # input side the weights were trained/evaluated at


class TransferModel(nn.Module):
    """A pretrained body plus a new head; frozen stages stay in eval mode under `train()`."""

    def __init__(self, body: nn.Module, head: nn.Sequential) -> None:
        super().__init__()
        self.body = body
        self.head = head
        # Body-relative module paths kept in eval mode: frozen BatchNorm keeps its running
        # stats and frozen dropout / stochastic depth stay off, so frozen features are fixed.
        self.frozen_paths: list[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def train(self, mode: bool = True) -> "TransferModel":
        super().train(mode)
        if mode:
            for path in self.frozen_paths:
                self.body.get_submodule(path).eval()
        return self


@dataclass
class Backbone:
    """A built backbone: the model and what training and preprocessing need to know about it.

    `weights_id` is the identity of the weights the body started from: "sha256:<16 hex digits>"
    of the content of the file actually loaded (a --weights-dir file, the torch hub cache file or
    the Hugging Face cache file), or "random" for a random initialisation (then the trial's seed
    tells which). Two files with different content never share an id; a copy of a file at another
    path keeps it. Feature caches key on it and trial records store it.
    """

    model: TransferModel  # body + head
    name: str  # registry name, e.g. "resnet18" or "timm/tf_efficientnet_lite0"
    stages: list[Stage]  # ordered, stem first, head excluded; cover every body parameter once
    num_features: int  # width of the pooled pre-logit features (the head's input)
    mean: tuple[float, float, float]  # normalisation of the pretrained weights
    std: tuple[float, float, float]
    interpolation: str  # "bilinear" or "bicubic", as the weights were trained
    default_size: int  # input side the weights were trained/evaluated at
    params_total: int  # parameters of body + head
    source: str  # where the weights came from: "random", "file <path>", "cache <path>", ...
    # content identity of the initial weights: "sha256:<16 hex>" or "random"; "" means unknown
    # (a Backbone built by hand), which nothing may cache under
    weights_id: str = ""
    freeze_depth: int = 0  # stages frozen now (set by `freeze`)
