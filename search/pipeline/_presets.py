"""Presets of `tlsearch fit`: named for what a user wants, each a search space and a ship policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from search.config import ConfigError

if TYPE_CHECKING:
    from search.space import SearchSpace


@dataclass(frozen=True)
class Preset:
    """One preset: how `fit` changes the default space, and whether it tries ensembles."""

    name: str  # what the user types after --preset
    description: str  # one line, listed by `tlsearch fit --help` and the command reference
    # Parameters set in the default space (a list is a choice, a scalar a constant); {}: the
    # default space as it is, which the runner then fits to the dataset and the weights at hand.
    overrides: Mapping[str, Any] = field(default_factory=dict)
    # The ship step runs `tlsearch ensemble`'s procedure over the kept trials and ships a soup or
    # an ensemble when it wins out of sample; otherwise the best trial's own weights ship.
    ensemble: bool = False
    # Backbones beyond the default space's for this hardware: every built-in default (the CPU and
    # the GPU lists) whose pretrained weights are at hand joins the search.
    more_backbones: bool = False


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("fast", "linear probes of the backbones at hand, no augmentation; the best probe ships",
               overrides={"freeze_depth": "all", "augmentation": "none"}),
        Preset("good", "the default space: linear probes, then fine-tunes of the best-probed backbones; "
                       "the best trial ships"),
        # RandAugment and AugMix pay off over more epochs than a CPU budget allows: meant for a GPU.
        Preset("best", "the default space with more backbones (every default whose weights are at hand) and a "
                       "wider augmentation search (RandAugment, AugMix), then soups and ensembles of the kept "
                       "trials, shipped when they win out of sample; meant for a GPU",
               overrides={"augmentation": ["none", "flip", "trivialaugment", "randaugment", "augmix"]},
               ensemble=True, more_backbones=True),
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


def preset_space(preset: Preset, base: SearchSpace, *, more: Sequence[str] = ()) -> SearchSpace:
    """The space a preset searches: `base` (the default space at hand) with its overrides.

    Args:
        preset: the preset.
        base: the default space over the backbones whose weights are at hand.
        more: further backbones with weights at hand (`more_backbones_at_hand`), added to base's
            when the preset searches more backbones.

    Returns:
        The space; `base` itself when the preset changes nothing.
    """
    from search.space import backbones_in

    overrides = dict(preset.overrides)
    have = backbones_in(base)
    extra = [b for b in more if b not in have] if preset.more_backbones else []
    if extra:
        overrides["backbone"] = [*have, *extra]
    return base.fixed(**overrides) if overrides else base


# Backbone families whose input size is fixed (ViT's position embeddings are for 224 px): they
# join a space only at that size.
FIXED_INPUT_SIZE = {"vit": 224}


def more_backbones_at_hand(*, weights_dir: str | None, image_size: int | None = None) -> list[str]:
    """The built-in defaults of every hardware (CPU and GPU lists) whose pretrained weights are at
    hand: in `weights_dir` or the torch/timm caches.

    Args:
        weights_dir: the --weights-dir folder, or None.
        image_size: the space's image size; a backbone that takes only another size is left out
            (None: the size is not one constant, none is left out).

    Returns:
        Backbone names, the CPU list's first.
    """
    from search.backbones import get_spec
    from search.space import backbones_at_hand, backbones_in, default_space

    names = [n for gpu in (False, True) for n in backbones_in(default_space(gpu=gpu))]
    if image_size is not None:
        names = [n for n in names if FIXED_INPUT_SIZE.get(get_spec(n).family, image_size) == image_size]
    return backbones_at_hand(list(dict.fromkeys(names)), weights_dir=weights_dir)
