"""The built-in spaces and what fills a user's space: fine-tuning priors, imbalance dimensions."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from search.config import TrialConfig
from search.space._params import Constant, _describe, _lowest, _nearest, _stages, _values
from search.space._space import PROBE_LR, SearchSpace, _can_fine_tune, backbones_in



def default_space(*, gpu: bool) -> SearchSpace:
    """The built-in space: small backbones and images on CPU, larger ones on GPU.

    Args:
        gpu: whether trials get GPUs.

    Returns:
        The default space.
    """
    common: dict[str, Any] = {
        "augmentation": ["none", "flip", "trivialaugment"],
        "optimizer": "adamw",
        # The head's rate; stages train at a fraction of it (the prior below), drawn only by
        # trials that train stages. A user's own `lr` is every layer's rate (`with_finetune_priors`).
        "lr": {"low": 1e-4, "high": 1e-2, "log": True},
        "backbone_lr_mult": BACKBONE_LR_MULT_PRIOR,
        "weight_decay": {"low": 1e-6, "high": 1e-2, "log": True},
        "label_smoothing": [0.0, 0.1],
    }
    if gpu:
        d = {
            "backbone": ["resnet50", "convnext_tiny", "efficientnet_b2", "vit_b_16"],
            "freeze_depth": [0, 2, 4, "all"],
            **common,
            "batch_size": [32, 64],
            "image_size": 224,
            "max_epochs": 10,
        }
    else:
        d = {
            "backbone": ["resnet18", "mobilenet_v3_large", "efficientnet_b0"],
            # 4: the last stages only (resnet18's layer4; the last blocks of the others).
            "freeze_depth": [0, 2, 4, "all"],
            **common,
            "batch_size": [16, 32],
            "image_size": CPU_IMAGE_SIZE,  # or LARGE_IMAGE_SIZE, fitted to the data (`for_dataset`)
            "max_epochs": 6,
        }
    return SearchSpace.from_dict(d, source="default space")


def default_space_at_hand(*, gpu: bool, weights_dir: str | None) -> tuple[SearchSpace, str | None]:
    """The default space over the backbones whose pretrained weights are at hand.

    At hand: a default backbone found in `weights_dir` or the torch/timm caches, and every
    `weights_dir/<name>.pth` that names a registered backbone or a timm model (as `timm/<name>`).
    Offline, a default backbone without weights would stop the search at its pre-flight check;
    with nothing at hand at all, the defaults stay (an online machine downloads them).

    Args:
        gpu: whether trials get GPUs (`default_space`).
        weights_dir: the --weights-dir folder, or None.

    Returns:
        (the space, one line naming the defaults left out, or None when none were).
    """
    space = default_space(gpu=gpu)
    defaults = backbones_in(space)
    at_hand = backbones_at_hand(defaults, weights_dir=weights_dir)
    extra = [n for n in _backbones_in_dir(weights_dir) if n not in at_hand]
    chosen = at_hand + extra
    left_out = [n for n in defaults if n not in at_hand]
    if not chosen or chosen == defaults:
        return space, None
    most = max(_stages(n) for n in chosen)
    depths = [v for v in space.param_dict["freeze_depth"].values if v == "all" or int(v) <= most]
    space = space.fixed(backbone=chosen, freeze_depth=depths)
    note = None
    if left_out:
        where = f"{weights_dir} nor the torch/timm caches" if weights_dir else "the torch/timm caches"
        note = (f"default space: left out {', '.join(left_out)} (no pretrained weights in {where}); "
                f"searching {', '.join(chosen)}")
    return space, note


def backbones_at_hand(names: list[str], *, weights_dir: str | None) -> list[str]:
    """Those of `names` whose pretrained weights are in `weights_dir` or the torch/timm caches, in order."""
    from search import backbones

    return [n for n in names if backbones.weights_status(n, weights_dir) != "missing"]


def _backbones_in_dir(weights_dir: str | None) -> list[str]:
    """Backbone names of the `<name>.pth` files in a weights folder (registered or timm), sorted."""
    from search import backbones

    if not weights_dir or not Path(weights_dir).is_dir():
        return []
    names = []
    for f in sorted(Path(weights_dir).glob("*.pth")):
        for name in (f.stem, f"{backbones.TIMM_PREFIX}{f.stem}"):
            try:
                backbones.get_spec(name)
            except Exception:  # not a model either library knows
                continue
            names.append(name)
            break
    return names


# ----- fine-tuning priors -----------------------------------------------------------------------
#
# Where they come from (read in the sources, values adapted to a search over a few epochs):
# - AutoGluon AutoMM's fine-tuning defaults (docs "Customize AutoMM", optimization.*): AdamW,
#   learning_rate 1e-4 for the backbone, lr_choice "layerwise_decay" with lr_decay 0.9 per layer,
#   or "two_stages" with the head at lr_mult x the backbone's rate; cosine_decay schedule,
#   warmup over the first 10% of steps (warmup_steps 0.1), weight_decay 1e-3.
# - the torchvision references (references/classification/train.py): linear warm-up
#   (--lr-warmup-epochs) then cosine annealing; the transfer-learning tutorial fine-tunes a
#   pretrained ResNet at lr 1e-3 (SGD, momentum 0.9), far below the 0.1 used from scratch.
# - timm's fine-tuning practice (train.py --layer-decay, warm-up epochs, cosine schedule;
#   pretrained weights fine-tuned with AdamW at 1e-4..5e-4, heads at a larger rate).
# Our stages are groups of layers (5 to 12 per backbone) and the decay compounds per stage: from
# 0.6, the stem of an 8-stage backbone trained at 2% of the rate. The range stays near one rate
# for every layer, the plain loop a stated `lr` came from. Measured (benchmarks/parity.py,
# tlsearch-defaults, spoken_digits, 3 seeds): at this range's middle (0.9) the defaults ended
# 1.0 [-3.2, +1.2] points from one rate after 3 epochs; at 0.6-1.0's middle (0.8), 2.5 below.

# What a space that does not mention them gets: the head's rate is `lr`; the backbone's is a
# fraction of it (two_stages: head = 10 x backbone sits in the middle), decayed per stage.
#
# The backbone's rate as a fraction of the head's is a prior of the default space only, whose `lr`
# range (1e-4..1e-2) is the head's. A user's space that states `lr` and not `backbone_lr_mult`
# came from a plain loop where that rate trains every layer: read as the head's rate with the
# backbone at 0.01-0.3 of it, a range that works there (1e-4..1e-3 for a full fine-tune) could
# not learn (seen: one-epoch fine-tunes at 0.20-0.26 where the plain loop reached 0.87). So
# there `backbone_lr_mult` is 1.0: the stated rate trains the stage next to the head, as it did.
BACKBONE_LR_MULT_PRIOR: dict[str, Any] = {"low": 0.01, "high": 0.3, "log": True}
FINETUNE_PRIORS: dict[str, Any] = {
    "backbone_lr_mult": 1.0,
    "lr_decay": {"low": 0.8, "high": 1.0},
}
WARMUP_FRACTION = 0.1  # of the trial's epochs (AutoGluon's warmup_steps 0.1)
# Above these, pretrained stages are wrecked in the first steps (seen: AdamW at 3e-3 and more
# fine-tuning EfficientNet-Lite stages ends at chance); the head alone takes far more.
FINETUNE_LR_LIMIT = {"adamw": 3e-3, "adam": 3e-3, "rmsprop": 3e-3, "sgd": 0.1}


def with_finetune_priors(space: SearchSpace) -> SearchSpace:
    """The space with the fine-tuning priors it does not mention (what it states is kept).

    `lr` is then the head's rate, and backbone stages train at `lr * backbone_lr_mult *
    lr_decay**d` (d = 1 next to the head); warm-up over the first tenth of the epochs, then cosine
    decay. A space that fixes them (e.g. `backbone_lr_mult: 1.0`, `warmup_epochs: 0`) keeps its values.

    Args:
        space: a validated space.

    Returns:
        The space with `backbone_lr_mult`, `lr_decay` and `warmup_epochs` filled in.
    """
    stated = space.to_dict()
    added = {k: v for k, v in FINETUNE_PRIORS.items() if k not in stated}
    if "warmup_epochs" not in stated:
        added["warmup_epochs"] = round(WARMUP_FRACTION * space.max_epochs, 3)
    if "lr_schedule" not in stated:  # named, so that a resume knows which schedule the study ran
        added["lr_schedule"] = TrialConfig.lr_schedule
    if "lp_epochs" not in stated:
        # Fine-tunes start from a random head. LP-FT (`lp_epochs` > 0: from the head the space's
        # linear probe trains) keeps the pretrained features from moving much, which is what
        # data unlike ImageNet needs them to do: measured on spoken_digits (benchmarks/parity.py,
        # Lite0, every layer at 5e-4, 3 seeds, 3 epochs), it ended 3.7 points below a random head
        # (3.0-4.5 in each seed). Named,
        # so that a resume knows what the study ran.
        added["lp_epochs"] = 0
    elif stated["lp_epochs"] != 0 and "lp_lr" not in stated and _can_fine_tune(space):
        # The head a fine-tune starts from is the one the space's linear probe trains (the
        # portfolio's probe recipe: its rate moved into the space's `lr` range).
        added["lp_lr"] = float(_nearest(space.param_dict.get("lr", Constant(TrialConfig.lr)), PROBE_LR))
    return SearchSpace.from_dict({**stated, **added}) if added else space


# What `with_finetune_priors` fills in. A space stored with a study since then names them all.
PRIOR_PARAMS = (*FINETUNE_PRIORS, "warmup_epochs", "lr_schedule", "lp_epochs")
# What the trials of a study stored before a prior existed ran with, where it is not the
# `TrialConfig` default: the per-batch cosine came before the per-epoch one.
_BEFORE = {"lr_schedule": "cosine_steps"}


def keep_stored_schedule(space: SearchSpace) -> SearchSpace:
    """A study's stored space, fixed so that its remaining trials train as its earlier ones did.

    A space stored before the fine-tuning priors existed lacks some of `PRIOR_PARAMS`; its trials
    ran at the trial config's defaults for them (one rate for head and backbone, no warm-up).
    Those become constants here, so that `with_finetune_priors` adds nothing on resume and the
    study does not switch schedules half-way. A space that names them all is returned as it is.

    Args:
        space: the space stored with the study.

    Returns:
        The space with each missing prior fixed at `TrialConfig`'s default.
    """
    stated = space.to_dict()
    missing = {k: _BEFORE.get(k, getattr(TrialConfig, k)) for k in PRIOR_PARAMS if k not in stated}
    return SearchSpace.from_dict({**stated, **missing}) if missing else space


def lr_warnings(space: SearchSpace, *, source: str = "search space") -> list[str]:
    """One line when the space's learning rates cannot fine-tune backbone stages.

    The lowest rate a fine-tuning trial can give the stage next to the head (`lr *
    backbone_lr_mult * lr_decay`) is compared with `FINETUNE_LR_LIMIT` for each optimizer the
    space can use; a space whose every draw is above it would only ever diverge.

    Args:
        space: the space (after `with_finetune_priors`, or as the user wrote it).
        source: what to call it in the message.

    Returns:
        Zero or one warning line.
    """
    params = space.param_dict
    if not _can_fine_tune(space):
        return []
    lowest = _lowest("lr", params) * _lowest("backbone_lr_mult", params) * _lowest("lr_decay", params)
    bad = [o for o in _values("optimizer", params) if lowest > FINETUNE_LR_LIMIT.get(str(o), math.inf)]
    if not bad:
        return []
    opt = bad[0]
    return [
        f"{source}: lr {_describe(params.get('lr'))} with backbone_lr_mult {_describe(params.get('backbone_lr_mult'))} trains "
        f"backbone stages at {lowest:.2g} or more with {opt}; fine-tuning diverges above about "
        f"{FINETUNE_LR_LIMIT[opt]:g}: lower lr, or leave backbone_lr_mult out (its default scales the backbone's rate down)"
    ]


# Searched on an imbalanced training split when the space does not set them itself (`for_dataset`).
# Plain training comes first in each list: a warm-start trial (`SearchSpace.baseline`) takes it.
IMBALANCE_DIMENSIONS: dict[str, list[Any]] = {
    "loss_weighting": ["none", "inverse_sqrt", "inverse_frequency"],
    "balanced_sampler": [False, True],
}


# The image size of the default space on CPUs: 128 px, or 160 px for data whose images are larger
# than that (fine detail: at 128 px a plain 3-epoch fine-tune of 12 kinds of flowers scored 0.942 on
# test/, at 160 px 0.975) when a full fine-tune epoch there leaves the budget room for the rest.
# Smaller images are upscaled to 128 px (64-px aerial tiles gain from it).
CPU_IMAGE_SIZE = 128
LARGE_IMAGE_SIZE = 160
LARGE_SIDE = 176  # median shorter side of the files from which 160 px shows more than 128 px
# Images a full fine-tune of the default CPU backbones (EfficientNet-Lite0/1) trains per second
# and CPU core at 128 px, forward and backward, assumed for a machine the search has to itself
# (benchmarks/results/fairness-replay.md measured 2.1 on 2 cores busy with other work too).
FINE_TUNE_IMAGES_PER_CORE_S = 12.0
# A 160-px fine-tune is chosen when this many of its epochs take at most half the budget.
SIZED_EPOCHS = 3


def fitted_image_size(*, median_side: int, train_images: int, budget_s: float | None, cpus: int) -> int:
    """The default CPU space's image size for a dataset: `LARGE_IMAGE_SIZE` when its images are
    large (`LARGE_SIDE`) and `SIZED_EPOCHS` full fine-tune epochs at that size take at most half
    the budget (`FINE_TUNE_IMAGES_PER_CORE_S`), else `CPU_IMAGE_SIZE`.

    Args:
        median_side: the median shorter side of the dataset's files, in pixels (0: unknown).
        train_images: images in the training split.
        budget_s: the search's time budget; None: no budget (the size follows the data alone).
        cpus: CPU cores the search has.

    Returns:
        The side in pixels.
    """
    if median_side < LARGE_SIDE:
        return CPU_IMAGE_SIZE
    if budget_s is None:
        return LARGE_IMAGE_SIZE
    epoch_s = train_images / (FINE_TUNE_IMAGES_PER_CORE_S * max(1, cpus)) * (LARGE_IMAGE_SIZE / CPU_IMAGE_SIZE) ** 2
    return LARGE_IMAGE_SIZE if SIZED_EPOCHS * epoch_s <= 0.5 * budget_s else CPU_IMAGE_SIZE


def for_dataset(space: SearchSpace, class_counts: list[int], *, median_side: int = 0,
                budget_s: float | None = None, cpus: int = 1) -> SearchSpace:
    """The default space fitted to a dataset: imbalance handling searched where classes are
    lopsided, and the CPU space's image size fitted to the images and the time (`fitted_image_size`).

    When the training split's largest class has at least `imbalance.IMBALANCE_RATIO` times the
    images of its smallest, loss weighting and the class-balanced sampler become search dimensions
    (`IMBALANCE_DIMENSIONS`; a dimension the space already sets is kept as it is); otherwise
    neither costs the sampler a dimension. A space whose image size is not the CPU default's keeps it.

    Args:
        space: the default space (a user's space is searched as written).
        class_counts: training images per class.
        median_side: the median shorter side of the dataset's files (`ImageStats.median_side`).
        budget_s: the search's time budget, or None.
        cpus: CPU cores the search has.

    Returns:
        The space to search.
    """
    from search.imbalance import is_imbalanced

    changes: dict[str, Any] = {}
    size = space.param_dict.get("image_size")
    if isinstance(size, Constant) and size.value == CPU_IMAGE_SIZE:
        fitted = fitted_image_size(median_side=median_side, train_images=sum(class_counts), budget_s=budget_s, cpus=cpus)
        if fitted != CPU_IMAGE_SIZE:
            changes["image_size"] = fitted
    if is_imbalanced(class_counts):
        changes.update({k: v for k, v in IMBALANCE_DIMENSIONS.items() if k not in space.param_dict})
    return SearchSpace.from_dict({**space.to_dict(), **changes}, source="default space") if changes else space
