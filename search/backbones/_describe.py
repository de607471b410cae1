"""Summaries of backbones for `tlsearch backbones`, computed without loading weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from search.backbones._build import weights_status
from search.backbones._registry import _info, get_spec, list_backbones
from search.config import ConfigError


def describe(name: str, *, weights_dir: str | Path | None = None) -> dict[str, Any]:
    """A summary of one backbone without loading weights.

    Args:
        name: backbone name.
        weights_dir: the --weights-dir folder, for the weights status.

    Returns:
        A dict with name, family, description, stages (names), num_stages, params (body,
        without the classifier), num_features, default_size, interpolation and weights
        ("file <path>", "cached" or "missing").
    """
    spec = get_spec(name)
    info = _info(name)
    return {
        "name": name,
        "family": spec.family,
        "description": spec.description,
        "stages": [s.name for s in info.stages],
        "num_stages": len(info.stages),
        "params": info.params_body,
        "num_features": info.num_features,
        "default_size": info.default_size,
        "interpolation": info.interpolation,
        "weights": weights_status(name, weights_dir),
    }


def backbones_table(*, pattern: str = "*", weights_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """`describe` for every backbone matching a pattern, for `tlsearch backbones`.

    Args:
        pattern: fnmatch pattern over names; `timm/...` patterns list timm models.
        weights_dir: the --weights-dir folder, for the weights status.

    Returns:
        One dict per backbone, registry order.
    """
    names = list_backbones(pattern)
    if not names:
        raise ConfigError(f"no backbone matches {pattern!r}; see tlsearch backbones")
    return [describe(n, weights_dir=weights_dir) for n in names]
