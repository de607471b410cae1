"""Presets of `tlsearch fit`: named for what a user wants, each a search space and a ship policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from search.config import ConfigError

if TYPE_CHECKING:
    from search.space import SearchSpace


@dataclass(frozen=True)
class Preset:
    """One preset: how `fit` changes the default space, and whether it tries ensembles."""

    name: str  # what the user types after --preset
    description: str  # one line, listed by `tlsearch fit --help` and the README
    # Parameters set in the default space (a list is a choice, a scalar a constant); {}: the
    # default space as it is, which the runner then fits to the dataset and the weights at hand.
    overrides: Mapping[str, Any] = field(default_factory=dict)
    # The ship step runs `tlsearch ensemble`'s procedure over the kept trials and ships a soup or
    # an ensemble when it wins out of sample; otherwise the best trial's own weights ship.
    ensemble: bool = False


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("fast", "linear probes of the backbones at hand, no augmentation; the best probe ships",
               overrides={"freeze_depth": "all", "augmentation": "none"}),
        Preset("good", "the default space: linear probes, then fine-tunes of the best-probed backbones; "
                       "the best trial ships"),
        # RandAugment and AugMix pay off over more epochs than a CPU budget allows: meant for a GPU.
        Preset("best", "the default space with a wider augmentation search (RandAugment, AugMix), then soups "
                       "and ensembles of the kept trials, shipped when they win out of sample; meant for a GPU",
               overrides={"augmentation": ["none", "flip", "trivialaugment", "randaugment", "augmix"]},
               ensemble=True),
    )
}
DEFAULT_PRESET = "good"


def get_preset(name: str) -> Preset:
    """The preset of that name.

    Args:
        name: a `PRESETS` key.

    Returns:
        The preset; an unknown name is a `ConfigError` listing the valid ones.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_space(preset: Preset, base: SearchSpace) -> SearchSpace:
    """The space a preset searches: `base` (the default space at hand) with its overrides.

    Args:
        preset: the preset.
        base: the default space over the backbones whose weights are at hand.

    Returns:
        The space; `base` itself when the preset overrides nothing.
    """
    return base.fixed(**preset.overrides) if preset.overrides else base
