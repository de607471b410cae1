"""`load_model`: a model folder of either kind, one trial's (`search.model_io`) or an ensemble's
(`_module.py`). It sits here, above both, because only this layer knows both kinds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from search.ensemble._module import load_ensemble
from search.model_io import load_trial_model, read_model_meta


def load_model(model_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Loads a model folder written by `tlsearch train` or by `tlsearch ensemble` (weights with
    `weights_only=True`).

    Args:
        model_dir: the folder.

    Returns:
        (model in eval mode, model.json contents).
    """
    folder, meta = read_model_meta(model_dir)
    # An ensemble's model.json says so (members, averaging, temperature); a trial's has no kind.
    load = load_ensemble if meta.get("kind") == "ensemble" else load_trial_model
    return load(folder, meta), meta
