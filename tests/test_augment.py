"""Augmentation policies: shapes, dtypes, determinism of `none`, MixUp/CutMix targets."""

from __future__ import annotations

import pytest
import torch

from search import augment
from search.config import ConfigError, TrialConfig

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _stored_size(image_size: int) -> int:
    return round(image_size / 0.875)


def _image(image_size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    side = _stored_size(image_size)
    return torch.randint(0, 256, (3, side, side), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("policy", augment.policy_names())
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_each_policy_outputs_normalised_float_crop(policy: str, interpolation: str) -> None:
    config = TrialConfig(augmentation=policy, image_size=32)
    t = augment.train_transform(config, mean=MEAN, std=STD, interpolation=interpolation)
    out = t(_image(32))
    assert out.dtype == torch.float32
    assert out.shape == (3, 32, 32)
    assert torch.isfinite(out).all()


def test_registry_matches_config_and_has_descriptions() -> None:
    from search.config import AUGMENTATIONS

    assert augment.policy_names() == list(AUGMENTATIONS)
    assert all(d for d in augment.policy_descriptions().values())
    assert augment.POLICIES["randaugment"].params == ("randaugment_num_ops", "randaugment_magnitude")
    with pytest.raises(ConfigError, match="unknown augmentation 'foo'; available: none, flip"):
        augment.get_policy("foo")


def test_none_is_deterministic_and_equals_eval() -> None:
    config = TrialConfig(augmentation="none", image_size=48)
    assert augment.is_deterministic(config)
    img = _image(48, seed=1)
    train = augment.train_transform(config, mean=MEAN, std=STD)
    evaluate = augment.eval_transform(48, mean=MEAN, std=STD)
    a, b, c = train(img), train(img), evaluate(img)
    assert torch.equal(a, b) and torch.equal(a, c)
    # Center crop of side 48 from 55, then (x/255 - mean) / std.
    off = round((55 - 48) / 2)  # torchvision rounds half up here: 4
    crop = img[:, off : off + 48, off : off + 48].float() / 255
    expected = (crop - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    assert torch.allclose(c, expected, atol=1e-5)


def test_random_policies_are_not_deterministic() -> None:
    assert not augment.is_deterministic(TrialConfig(augmentation="flip"))
    assert not augment.is_deterministic(TrialConfig(augmentation="none", mixup_alpha=0.2))
    torch.manual_seed(0)
    t = augment.train_transform(TrialConfig(augmentation="flip", image_size=32), mean=MEAN, std=STD)
    img = _image(32, seed=2)
    assert not all(torch.equal(t(img), t(img)) for _ in range(3))


def test_bad_interpolation_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="interpolation must be one of bilinear, bicubic, got 'nearest'"):
        augment.train_transform(TrialConfig(), mean=MEAN, std=STD, interpolation="nearest")


def test_batch_mix_off_by_default() -> None:
    assert augment.batch_mix(TrialConfig(), 3) is None


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_batch_mix_makes_soft_targets(mixup: float, cutmix: float) -> None:
    torch.manual_seed(0)
    mix = augment.batch_mix(TrialConfig(mixup_alpha=mixup, cutmix_alpha=cutmix), 3)
    assert mix is not None
    images = torch.rand(4, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 0])
    out, targets = mix(images, labels)
    assert out.shape == images.shape
    assert targets.shape == (4, 3) and targets.dtype.is_floating_point
    assert torch.allclose(targets.sum(dim=1), torch.ones(4))
    assert not torch.equal(targets, torch.nn.functional.one_hot(labels, 3).float())
