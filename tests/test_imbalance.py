"""Class imbalance as search dimensions: loss weighting and the class-balanced sampler, on images and
on cached features, and the default space that offers them only where the training split is lopsided."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import make_image_folder
from search import backbones, imbalance
from search.config import ConfigError, TrialConfig
from search.data import scan_dataset
from search.space import SearchSpace, default_space, for_dataset
from search.trial import fine_tune, load_data

# 15 training images in batches of 5: no partial batch is dropped, every draw is counted.
TINY = dict(backbone="resnet18", pretrained=False, image_size=32, batch_size=5, epochs=1, lr=1e-3)


def make_imbalanced(root: Path, *, many: int = 12, few: int = 3) -> Path:
    """Two classes, `many` circles and `few` squares in train; val balanced (4 each)."""
    make_image_folder(root, classes=("circle", "square"), per_class=many, splits=("train",))
    make_image_folder(root, classes=("circle", "square"), per_class=4, splits=("val",), seed=1)
    for p in sorted((root / "train" / "square").iterdir())[few:]:
        p.unlink()
    return root


def test_class_weights_inverse_frequency_and_sqrt() -> None:
    counts = [30, 10, 0]
    assert imbalance.class_weights(counts, "none") is None
    inv = imbalance.class_weights(counts, "inverse_frequency")
    assert inv[1] / inv[0] == pytest.approx(3.0)
    # Mean weight over the training images is 1: the loss keeps its size, the lr its meaning.
    assert (inv[0] * 30 + inv[1] * 10) / 40 == pytest.approx(1.0)
    sq = imbalance.class_weights(counts, "inverse_sqrt")
    assert sq[1] / sq[0] == pytest.approx(3 ** 0.5)
    assert inv[2] == max(inv[:2])  # a class with no training image: finite, never NaN
    assert imbalance.imbalance_ratio([30, 10]) == 3.0 and imbalance.is_imbalanced([30, 10])
    assert not imbalance.is_imbalanced([29, 10]) and imbalance.imbalance_ratio([5]) == 1.0


def test_trial_config_validates_the_new_fields_and_old_files_keep_their_meaning() -> None:
    old = TrialConfig.from_dict({"backbone": "resnet18", "lr": 1e-3})  # a best.yaml from before these fields
    assert old.loss_weighting == "none" and old.balanced_sampler is False
    with pytest.raises(ConfigError, match="unknown loss_weighting 'inverse'; available: none, inverse_frequency"):
        TrialConfig(loss_weighting="inverse")
    with pytest.raises(ConfigError, match="balanced_sampler"):
        TrialConfig.from_dict({"balanced_sampler": "yes"})
    space = SearchSpace.from_dict({"loss_weighting": ["none", "inverse_sqrt"], "balanced_sampler": [False, True]})
    assert space.to_dict()["balanced_sampler"] == [False, True]


def _train_labels(loader) -> Counter:
    return Counter(int(y) for _, ys in loader for y in ys)


@pytest.mark.parametrize("head_only", [False, True], ids=["images", "cached-features"])
def test_balanced_sampler_draws_classes_evenly(tmp_path: Path, head_only: bool) -> None:
    index = scan_dataset(make_imbalanced(tmp_path / "data"))
    cfg = TrialConfig(**TINY, freeze_depth="all" if head_only else 0, augmentation="none", balanced_sampler=True)
    bb = backbones.build_backbone(cfg.backbone, 2, pretrained=False)
    backbones.freeze(bb, cfg.freeze_depth)
    train, _, plan = load_data(cfg, index, bb, device=torch.device("cpu"), cache=True, cache_dir=str(tmp_path / "c"))
    assert plan.train_cached == head_only  # the path under test is the one meant
    plain = _train_labels(load_data(cfg.replace(balanced_sampler=False), index, bb, device=torch.device("cpu"),
                                    cache=True, cache_dir=str(tmp_path / "c"))[0])
    assert plain == Counter({0: 12, 1: 3})
    drawn = Counter()
    for _ in range(4):  # four epochs' draws
        drawn += _train_labels(train)
    assert sum(drawn.values()) == 4 * 15
    assert drawn[1] >= 0.35 * sum(drawn.values()), drawn  # ~half the draws, not 1 in 5


@pytest.mark.parametrize("head_only", [False, True], ids=["images", "cached-features"])
def test_loss_weighting_changes_the_training_loss(tmp_path: Path, head_only: bool) -> None:
    index = scan_dataset(make_imbalanced(tmp_path / "data"))
    # Head only either way (cheap); without the cache the images go through the frozen body every step.
    cfg = TrialConfig(**TINY, freeze_depth="all", augmentation="none")
    run = dict(cache=head_only, cache_dir=str(tmp_path / "c"))
    losses = {}
    for weighting in ("none", "inverse_frequency", "inverse_sqrt"):
        r = fine_tune(cfg.replace(loss_weighting=weighting), index, **run)
        losses[weighting] = r.final["train_loss"]
    assert losses["none"] != pytest.approx(losses["inverse_frequency"], rel=1e-4)
    assert losses["inverse_sqrt"] != pytest.approx(losses["inverse_frequency"], rel=1e-4)
    # The differences are the weighting's, not noise: the same config trains to the same loss.
    again = fine_tune(cfg, index, **run)
    assert again.final["train_loss"] == pytest.approx(losses["none"], rel=1e-5)


def test_default_space_searches_imbalance_only_on_an_imbalanced_split() -> None:
    base = default_space(gpu=False)
    assert "loss_weighting" not in base.param_dict and "balanced_sampler" not in base.param_dict
    assert for_dataset(base, [10, 10, 4]) is base  # ratio 2.5: left out
    space = for_dataset(base, [30, 10])  # ratio 3
    assert list(space.param_dict["loss_weighting"].values) == ["none", "inverse_sqrt", "inverse_frequency"]
    assert list(space.param_dict["balanced_sampler"].values) == [False, True]
    baseline = space.baseline()
    assert baseline["loss_weighting"] == "none" and baseline["balanced_sampler"] is False
    fixed = base.fixed(loss_weighting="inverse_sqrt")  # what the space sets itself is kept
    assert for_dataset(fixed, [30, 10]).param_dict["loss_weighting"].value == "inverse_sqrt"
