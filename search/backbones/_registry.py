"""The registry of sources: which source owns a name, listing, specs, and cheap facts per name.

A name belongs to exactly one `BackboneSource`: `timm/<name>` to the timm source, the names of
`REGISTRY` to the torchvision source. Everything that differs between the libraries is asked of
the source; nothing here branches on a name's prefix.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from search.backbones._source import BackboneSource
from search.backbones._timm import TIMM
from search.backbones._torchvision import TORCHVISION
from search.backbones._types import BackboneSpec, Stage
from search.config import ConfigError

# Listing order: torchvision's registry first, then timm (whose names need their prefix).
SOURCES: tuple[BackboneSource, ...] = (TORCHVISION, TIMM)


def source_of(name: str) -> BackboneSource:
    """The source that builds a backbone.

    Args:
        name: a registry name or timm/<timm model name>.

    Returns:
        The source owning the name. Unknown names raise ConfigError listing the valid ones.
    """
    for source in SOURCES:
        if source.owns(name):
            return source
    raise ConfigError(f"unknown backbone {name!r}; available: {', or '.join(s.hint for s in SOURCES)}")


def list_backbones(pattern: str = "*") -> list[str]:
    """Lists registry names matching a shell-style pattern.

    Args:
        pattern: fnmatch pattern, e.g. "resnet*"; a pattern starting with "timm/" lists timm
            models instead (e.g. "timm/*lite*").

    Returns:
        Matching names, registry order (timm: timm's order).
    """
    return [name for source in SOURCES for name in source.names(pattern)]


def get_spec(name: str) -> BackboneSpec:
    """Returns the registry entry of a backbone.

    Args:
        name: a registry name or timm/<timm model name>.

    Returns:
        The spec. Unknown names raise ConfigError listing the valid ones.
    """
    return source_of(name).spec(name)


def _create_network(spec: BackboneSpec) -> nn.Module:
    """The full network with its original classifier and random weights."""
    return source_of(spec.name).create(spec)


@dataclass(frozen=True)
class _Info:
    """What describe/num_stages need, computed once per name from a weightless build."""

    stages: tuple[Stage, ...]
    params_body: int
    num_features: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    default_size: int


@functools.lru_cache(maxsize=None)
def _info(name: str) -> _Info:
    spec = get_spec(name)
    source = source_of(name)
    try:
        # The meta device allocates nothing, so even vgg16 / vit_b_16 "build" in milliseconds.
        with torch.device("meta"):
            net = source.create(spec)
    except (NotImplementedError, RuntimeError):
        net = source.create(spec)  # regnet computes its widths with tensor ops: build on CPU
    width = source.remove_classifier(net, spec)
    prep = source.preprocessing(spec, net)
    return _Info(
        stages=tuple(spec.stages(net)),
        params_body=sum(p.numel() for p in net.parameters()),
        num_features=width,
        mean=prep.mean,
        std=prep.std,
        interpolation=prep.interpolation,
        default_size=prep.size,
    )


def num_stages(name: str) -> int:
    """Number of stages of a backbone (cached; no weights loaded).

    Args:
        name: backbone name.

    Returns:
        len(stages), the largest valid freeze depth.
    """
    return len(_info(name).stages)


def stage_names(name: str) -> list[str]:
    """Names of a backbone's stages, stem first (cached; no weights loaded)."""
    return [s.name for s in _info(name).stages]
