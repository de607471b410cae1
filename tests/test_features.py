"""Frozen-feature caching at the freeze boundary (partial freezing)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from search import backbones, features
from search.config import TrialConfig
from search.data import scan_dataset
from search.trial import fine_tune

TINY = dict(backbone="resnet18", pretrained=False, image_size=32, batch_size=8, epochs=3, lr=1e-3)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "vgg11_bn",
                                  "regnet_y_400mf", "shufflenet_v2_x1_0", "densenet121", "convnext_tiny"])
def test_every_inner_boundary_splits_into_parts_equal_to_the_body(name: str) -> None:
    torch.manual_seed(0)
    bb = backbones.build_backbone(name, 3, pretrained=False)
    x = torch.randn(2, 3, 64, 64)
    for depth in range(1, len(bb.stages)):
        backbones.freeze(bb, depth)
        split = features.split_at_boundary(bb, depth, 64)
        assert split is not None, f"{name}: no split after {depth} stages"
        frozen_part, rest, shape = split
        bb.model.eval()
        with torch.no_grad():
            mid = frozen_part(x)
            assert tuple(mid.shape[1:]) == shape
            torch.testing.assert_close(rest(mid.clone()), bb.model.body(x), rtol=1e-3, atol=1e-4)
        # The parts share the body's parameters: nothing was copied.
        body_params = {id(p) for p in bb.model.body.parameters()}
        assert {id(p) for p in rest.parameters()} <= body_params


def _toy_backbone(body: torch.nn.Module) -> backbones.Backbone:
    stages = [backbones.Stage("stem", ("stem",)), backbones.Stage("block", ("block",)), backbones.Stage("last", ("last",))]
    model = backbones.TransferModel(body, torch.nn.Sequential(torch.nn.Linear(4, 3)))
    return backbones.Backbone(model=model, name="toy", stages=stages, num_features=4, mean=(0, 0, 0), std=(1, 1, 1),
                              interpolation="bilinear", default_size=16, params_total=0, source="random")


class _UsesInputLate(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block, self.last = (torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 1),
                                            torch.nn.Conv2d(4, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.block(self.stem(x)) + x.mean()).mean((2, 3))


class _DropoutBeforeBoundary(_UsesInputLate):
    def __init__(self) -> None:
        super().__init__()
        self.drop = torch.nn.Dropout(0.5)  # in no stage: active in training, off in the cached pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.block(self.drop(self.stem(x)))).mean((2, 3))


@pytest.mark.parametrize("body", [_UsesInputLate, _DropoutBeforeBoundary])
def test_bodies_whose_frozen_part_is_not_self_contained_are_not_split(body: type) -> None:
    bb = _toy_backbone(body())
    backbones.freeze(bb, 2)
    assert features.split_at_boundary(bb, 2, 16) is None


def test_vit_splits_after_its_class_token_joins() -> None:
    bb = backbones.build_backbone("vit_b_16", 3, pretrained=False)
    backbones.freeze(bb, 3)
    split = features.split_at_boundary(bb, 3, 224)
    assert split is not None and split[2] == (197, 768)


def test_partial_freeze_cached_matches_uncached(tiny_dataset: Path, tmp_path: Path) -> None:
    index = scan_dataset(tiny_dataset)
    cfg = TrialConfig(**TINY, freeze_depth=3, augmentation="none")
    cached = fine_tune(cfg, index, cache=True, cache_dir=str(tmp_path / "c"))
    assert len(list((tmp_path / "c" / "features").glob("*.pt"))) == 2, "train and val boundary features"
    uncached = fine_tune(cfg, index, cache=False)
    assert cached.final["val_acc"] == pytest.approx(uncached.final["val_acc"], abs=0.06)
    assert cached.final["val_loss"] == pytest.approx(uncached.final["val_loss"], rel=0.05)
    assert cached.params_trainable == uncached.params_trainable
    # A second trial reads the features back: the first one left them as it found them.
    again = fine_tune(cfg, index, cache=True, cache_dir=str(tmp_path / "c"))
    assert [m["val_loss"] for m in again.history] == pytest.approx([m["val_loss"] for m in cached.history], rel=1e-6)


@pytest.mark.parametrize("depth, val_rel", [(2, 0.02), ("all", 1e-4)])  # boundary features are float16
def test_augmented_training_caches_validation_only(tiny_dataset: Path, tmp_path: Path, depth, val_rel: float) -> None:
    index = scan_dataset(tiny_dataset)
    cfg = TrialConfig(**TINY, freeze_depth=depth, augmentation="flip")
    cached = fine_tune(cfg, index, cache=True, cache_dir=str(tmp_path / "c"))
    assert len(list((tmp_path / "c" / "features").glob("*.pt"))) == 1, "only the val split is deterministic"
    uncached = fine_tune(cfg, index, cache=False)
    # Same seed, same augmented batches: only the val pass reads the cache.
    assert [m["train_loss"] for m in cached.history] == pytest.approx([m["train_loss"] for m in uncached.history], rel=1e-3)
    assert cached.final["val_loss"] == pytest.approx(uncached.final["val_loss"], rel=val_rel)


def test_boundary_over_budget_runs_uncached(tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features, "PARTIAL_BUDGET_BYTES", 1)
    index = scan_dataset(tiny_dataset)
    result = fine_tune(TrialConfig(**TINY, freeze_depth=2, augmentation="none"), index, cache_dir=str(tmp_path / "c"))
    assert not list((tmp_path / "c" / "features").glob("*.pt"))
    assert len(result.history) == 3
