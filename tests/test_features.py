"""Frozen-feature caching: the boundary split (partial freezing), the cache key, safe reading."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from search import backbones, features
from search.config import TrialConfig
from search.data import scan_dataset
from search.trial import fine_tune, load_data
from tests.conftest import make_image_folder

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


# ----- the cache key and what the cache may hold ---------------------------------------------------


def test_feature_key_changes_with_every_input(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TrialConfig(**TINY)
    bb = SimpleNamespace(name="resnet18", weights_id="sha256:0123456789abcdef")

    def key(cfg: TrialConfig = cfg, bb: SimpleNamespace = bb, split: str = "val", depth: int | None = None,
            fingerprint: str = "f1") -> str:
        return features.feature_key(cfg, bb, fingerprint=fingerprint, split=split, depth=depth)

    base = key()
    assert key() == base, "a key is stable"
    variants = {
        "image size": key(cfg=cfg.replace(image_size=48)),
        "boundary": key(depth=2),
        "another boundary": key(depth=3),
        "weights": key(bb=SimpleNamespace(name="resnet18", weights_id="sha256:fedcba9876543210")),
        "backbone": key(bb=SimpleNamespace(name="resnet34", weights_id=bb.weights_id)),
        "split": key(split="train"),
        "dataset": key(fingerprint="f2"),
        "random seed 0": key(bb=SimpleNamespace(name="resnet18", weights_id="random")),
        "random seed 1": key(cfg=cfg.replace(seed=1), bb=SimpleNamespace(name="resnet18", weights_id="random")),
    }
    assert len({base, *variants.values()}) == len(variants) + 1, variants
    assert key(cfg=cfg.replace(seed=1)) == base, "the seed does not change pretrained weights"
    for module, attr in [(torch, "__version__"), (features, "FEATURE_FORMAT")]:
        with monkeypatch.context() as m:
            m.setattr(module, attr, "other")
            assert key() != base, attr
    import torchvision

    with monkeypatch.context() as m:
        m.setattr(torchvision, "__version__", "other")
        assert key() != base, "torchvision version"
    with monkeypatch.context() as m:
        m.setattr(features, "_timm_version", lambda: "other")
        assert key() != base, "timm version"


def test_backbone_without_a_weights_id_is_never_cached(tmp_path: Path) -> None:
    bb = backbones.build_backbone("resnet18", 3, pretrained=False)
    bb.weights_id = ""  # built by hand: nobody can tell which weights these are
    backbones.freeze(bb, "all")
    cfg = TrialConfig(**TINY, freeze_depth="all", augmentation="none")
    train_ds = val_ds = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.zeros(4))
    index = SimpleNamespace(fingerprint="f")
    assert features.cached_loaders(cfg, bb, train_ds, val_ds, index=index, device=torch.device("cpu"),
                                   cache_dir=tmp_path) is None
    assert not (tmp_path / "features").exists()


def _cached_and_direct(cfg: TrialConfig, bb: backbones.Backbone, index, cache_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(the body's output on the val images as the cache serves it, the body's output computed now)."""
    cpu = torch.device("cpu")
    backbones.freeze(bb, cfg.freeze_depth)
    _, val_cached, plan = load_data(cfg, index, bb, device=cpu, cache=True, cache_dir=str(cache_dir))
    assert plan.tail is not None, "the val split should come from the feature cache"
    _, val_images, _ = load_data(cfg, index, bb, device=cpu, cache=False, cache_dir=None)
    bb.model.eval()
    with torch.no_grad():
        from_cache = torch.cat([plan.tail(f) for f, _ in val_cached])
        direct = torch.cat([bb.model.body(x) for x, _ in val_images])
    return from_cache, direct


def _small_index(tmp_path: Path) -> Any:
    """Two images per class and split: these tests compare features, they train nothing."""
    return scan_dataset(make_image_folder(tmp_path / "data", per_class=2, size=32))


def test_cache_keeps_image_sizes_and_freeze_depths_apart(tmp_path: Path) -> None:
    index = _small_index(tmp_path)
    torch.manual_seed(0)
    bb = backbones.build_backbone("resnet18", len(index.classes), pretrained=False)
    runs = [(32, "all"), (48, "all"), (32, 2), (32, 3)]
    for size, depth in runs:
        # augmented training: only the val split is cached, which is all these checks need
        cfg = TrialConfig(**{**TINY, "image_size": size}, freeze_depth=depth, augmentation="flip")
        from_cache, direct = _cached_and_direct(cfg, bb, index, tmp_path / "c")
        # boundary features are cached in float16
        torch.testing.assert_close(from_cache, direct, rtol=2e-2, atol=2e-3, msg=f"size {size}, depth {depth}")
    assert len(list((tmp_path / "c" / "features").glob("*.pt"))) == len(runs), "one val file per run"


SMALL = "shufflenet_v2_x1_0"  # 2.3M params: a 9 MB weights file


def _save_weights(path: Path, seed: int) -> None:
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(backbones._registry._create_network(backbones.get_spec(SMALL)).state_dict(), path)


@pytest.mark.parametrize("where", ["weights dir", "torch hub cache"])
def test_cached_features_follow_the_content_of_the_weights_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    monkeypatch.setenv("TLSEARCH_CACHE", str(tmp_path / "tlsearch-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(backbones._weights, "_DIGESTS", {})
    weights_dir = tmp_path / "w" if where == "weights dir" else None
    path = weights_dir / f"{SMALL}.pth" if weights_dir else backbones._weights._hub_path(backbones._torchvision._tv_weights(SMALL).url)
    index = _small_index(tmp_path)
    cfg = TrialConfig(**{**TINY, "backbone": SMALL, "pretrained": True}, freeze_depth="all", augmentation="flip")

    def features_now(folder: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
        bb = backbones.build_backbone(SMALL, len(index.classes), pretrained=True, weights_dir=folder)
        return _cached_and_direct(cfg, bb, index, tmp_path / "c")

    _save_weights(path, seed=1)
    first, direct = features_now(weights_dir)
    torch.testing.assert_close(first, direct)

    # Same path, same size, same mtime, other content: new features, not the cached ones.
    before = path.stat()
    _save_weights(path, seed=2)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    second, direct = features_now(weights_dir)
    assert not torch.allclose(second, first)
    torch.testing.assert_close(second, direct)

    if weights_dir:  # another folder, a file of the same name and size
        _save_weights(tmp_path / "w2" / f"{SMALL}.pth", seed=3)
        third, direct = features_now(tmp_path / "w2")
        torch.testing.assert_close(third, direct)


class Payload:
    """Unpickling this runs code: it writes `path` (the side effect the tests look for)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # noqa: ANN204
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


def test_pickle_payload_in_the_feature_cache_is_recomputed_not_run(tmp_path: Path) -> None:
    index = _small_index(tmp_path)
    torch.manual_seed(0)
    bb = backbones.build_backbone("resnet18", len(index.classes), pretrained=False)
    cfg = TrialConfig(**TINY, freeze_depth="all", augmentation="flip")  # only val is cached
    path = tmp_path / "c" / "features" / f"{features.feature_key(cfg, bb, fingerprint=index.fingerprint, split='val')}.pt"
    path.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    n = len(index.val)
    torch.save({"features": torch.zeros(n, bb.num_features), "labels": torch.zeros(n, dtype=torch.long),
                "evil": Payload(marker)}, path)
    from_cache, direct = _cached_and_direct(cfg, bb, index, tmp_path / "c")
    assert not marker.exists(), "the pickled payload ran"
    torch.testing.assert_close(from_cache, direct)
    assert set(torch.load(path, weights_only=True)) == {"features", "labels"}, "replaced by real features"
