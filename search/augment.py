"""Augmentation policies by name -> torchvision.transforms.v2 pipelines.

Inputs are the decoded-image cache's uint8 CHW tensors of side `stored_size` (=
round(image_size / 0.875)); outputs are float32 normalised CHW tensors of side `image_size`.
Policy `none` is exactly the eval transform (a center crop), so its inputs to a frozen backbone
prefix are deterministic and features.py can cache them (`is_deterministic`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from search.config import ConfigError, TrialConfig

_INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


@dataclass(frozen=True)
class Policy:
    """A named augmentation policy: what `augmentation: <name>` in a trial config means."""

    name: str  # the value of TrialConfig.augmentation
    description: str  # one line for the CLI and the report
    params: tuple[str, ...] = ()  # child TrialConfig fields it reads (conditional in the search space)
    # (config, interpolation) -> the uint8 augmentations applied after the random crop
    extra: Callable[[TrialConfig, InterpolationMode], list[nn.Module]] = field(
        default=lambda c, i: [], repr=False
    )
    random_crop: bool = True  # RandomResizedCrop + flip first; False: center crop only


POLICIES: dict[str, Policy] = {
    p.name: p
    for p in [
        Policy("none", "center crop only (deterministic: frozen features can be cached)", random_crop=False),
        Policy("flip", "random-resized crop + horizontal flip"),
        Policy(
            "trivialaugment",
            "crop + flip + TrivialAugmentWide (one random op, random strength)",
            extra=lambda c, i: [v2.TrivialAugmentWide(interpolation=i)],
        ),
        Policy(
            "randaugment",
            "crop + flip + RandAugment (num_ops ops of a fixed magnitude)",
            params=("randaugment_num_ops", "randaugment_magnitude"),
            extra=lambda c, i: [
                v2.RandAugment(
                    num_ops=c.randaugment_num_ops, magnitude=c.randaugment_magnitude, interpolation=i
                )
            ],
        ),
        Policy(
            "autoaugment",
            "crop + flip + AutoAugment (ImageNet policy)",
            extra=lambda c, i: [v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=i)],
        ),
        Policy(
            "augmix",
            "crop + flip + AugMix (mixes augmentation chains; child: severity)",
            params=("augmix_severity",),
            extra=lambda c, i: [v2.AugMix(severity=c.augmix_severity, interpolation=i)],
        ),
    ]
}


def policy_names() -> list[str]:
    """Names of the augmentation policies, registry order."""
    return list(POLICIES)


def policy_descriptions() -> dict[str, str]:
    """Policy name -> one-line description, for the CLI."""
    return {p.name: p.description for p in POLICIES.values()}


def get_policy(name: str) -> Policy:
    """Returns a policy by name; unknown names raise ConfigError listing the valid ones."""
    policy = POLICIES.get(name)
    if policy is None:
        raise ConfigError(f"unknown augmentation {name!r}; available: {', '.join(POLICIES)}")
    return policy


def _interpolation(name: str) -> InterpolationMode:
    mode = _INTERPOLATIONS.get(name)
    if mode is None:
        raise ConfigError(f"interpolation must be one of {', '.join(_INTERPOLATIONS)}, got {name!r}")
    return mode


def _to_float(mean: Sequence[float], std: Sequence[float]) -> list[nn.Module]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def eval_transform(image_size: int, *, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """The evaluation transform: center crop + float + normalise.

    Args:
        image_size: side of the output crop.
        mean: per-channel mean of the backbone's weights.
        std: per-channel std of the backbone's weights.

    Returns:
        A v2.Compose mapping uint8 (3, S, S) to float32 (3, image_size, image_size).
    """
    return v2.Compose([v2.CenterCrop(image_size), *_to_float(mean, std)])


def train_transform(
    config: TrialConfig,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bilinear",
) -> v2.Compose:
    """The training transform of a trial's augmentation policy.

    Args:
        config: the trial config (augmentation, its child params, image_size).
        mean: per-channel mean of the backbone's weights.
        std: per-channel std of the backbone's weights.
        interpolation: "bilinear" or "bicubic", as the backbone's weights were trained.

    Returns:
        A v2.Compose mapping uint8 (3, S, S) to float32 (3, image_size, image_size).
    """
    policy = get_policy(config.augmentation)
    size = config.image_size
    if not policy.random_crop:
        return eval_transform(size, mean=mean, std=std)
    mode = _interpolation(interpolation)
    steps: list[nn.Module] = [
        v2.RandomResizedCrop(size, interpolation=mode, antialias=True),
        v2.RandomHorizontalFlip(),
        # The policies' geometric ops (rotate, shear) cannot do bicubic on tensors.
        *policy.extra(config, InterpolationMode.BILINEAR),
    ]
    return v2.Compose(steps + _to_float(mean, std))


def batch_mix(config: TrialConfig, num_classes: int) -> nn.Module | None:
    """MixUp / CutMix over whole batches, or None when both alphas are 0.

    Apply as `images, targets = mix(images, labels)`: labels are int64 class indices, targets
    come back as soft (batch, num_classes) float tensors. With both alphas > 0 each batch gets
    one of the two at random.

    Args:
        config: the trial config (mixup_alpha, cutmix_alpha).
        num_classes: number of classes of the dataset.

    Returns:
        A v2 transform taking (images, labels), or None.
    """
    mixes: list[nn.Module] = []
    if config.mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=config.mixup_alpha, num_classes=num_classes))
    if config.cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=config.cutmix_alpha, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def is_deterministic(config: TrialConfig) -> bool:
    """Whether training inputs are the same every epoch, so features.py may cache them.

    True for policy `none` (equal to eval) without MixUp/CutMix: those mix the images
    themselves, and mixing images is not mixing their (cached) features.

    Args:
        config: the trial config.

    Returns:
        True when every epoch sees the same training tensors.
    """
    return config.deterministic_input
