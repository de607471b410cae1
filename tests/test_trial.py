from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from search.config import TrialConfig
from search.data import scan_dataset
from search.trial import NonFiniteLossError, fine_tune, load_checkpoint, train, warmup_cosine

TINY = dict(backbone="resnet18", pretrained=False, image_size=32, batch_size=8, epochs=2, lr=1e-3)


def test_warmup_cosine_schedule() -> None:
    assert warmup_cosine(0, warmup_steps=4, total_steps=20) == pytest.approx(0.25)
    assert warmup_cosine(4, warmup_steps=4, total_steps=20) == pytest.approx(1.0)
    assert warmup_cosine(20, warmup_steps=4, total_steps=20) == pytest.approx(0.0)
    assert warmup_cosine(12, warmup_steps=4, total_steps=20) == pytest.approx(0.5)


def test_fine_tune_reports_every_epoch_and_saves_best_checkpoint(tiny_dataset: Path, tmp_path: Path) -> None:
    index = scan_dataset(tiny_dataset)
    seen: list[dict] = []
    ckpt = tmp_path / "ckpt" / "best.pt"
    result = fine_tune(TrialConfig(**TINY, freeze_depth=2), index, report=seen.append,
                       cache_dir=str(tmp_path / "cache"), checkpoint_path=str(ckpt))
    assert [m["epoch"] for m in seen] == [1, 2]
    for m in seen:
        for key in ("val_acc", "val_loss", "val_balanced_acc", "train_loss", "epoch_seconds", "images_per_s",
                    "params_total", "params_trainable", "latency_ms", "confusion_matrix"):
            assert key in m, key
        assert 0.0 <= m["val_acc"] <= 1.0 and math.isfinite(m["train_loss"])
        assert sum(map(sum, m["confusion_matrix"])) == len(index.val)
    assert 0 < result.params_trainable < result.params_total
    state = load_checkpoint(ckpt)
    assert any(k.startswith("head.") for k in state)


def test_same_seed_same_result(tiny_dataset: Path, tmp_path: Path) -> None:
    index = scan_dataset(tiny_dataset)
    cfg = TrialConfig(**TINY, augmentation="flip")
    a = fine_tune(cfg, index, cache_dir=str(tmp_path / "c"))
    b = fine_tune(cfg, index, cache_dir=str(tmp_path / "c"))
    assert [m["train_loss"] for m in a.history] == pytest.approx([m["train_loss"] for m in b.history], rel=1e-4)


def test_head_only_cached_features_match_uncached(tiny_dataset: Path, tmp_path: Path) -> None:
    index = scan_dataset(tiny_dataset)
    cfg = TrialConfig(**{**TINY, "epochs": 3, "lr": 1e-2}, freeze_depth="all", augmentation="none")
    cached = fine_tune(cfg, index, cache=True, cache_dir=str(tmp_path / "c"))
    assert list((tmp_path / "c" / "features").glob("*.pt")), "head-only trial wrote no feature cache"
    uncached = fine_tune(cfg, index, cache=False)
    assert cached.final["val_acc"] == pytest.approx(uncached.final["val_acc"], abs=0.06)
    assert cached.final["val_loss"] == pytest.approx(uncached.final["val_loss"], rel=0.05)


def test_diverging_loss_raises(tiny_dataset: Path, tmp_path: Path) -> None:
    index = scan_dataset(tiny_dataset)
    cfg = TrialConfig(**{**TINY, "lr": 1e12, "epochs": 3}, optimizer="sgd", momentum=0.0)
    with pytest.raises(NonFiniteLossError):
        fine_tune(cfg, index, cache_dir=str(tmp_path / "c"))


def test_train_saves_model_that_predicts(tiny_dataset: Path, tmp_path: Path) -> None:
    from search.export import predict

    summary = train(TrialConfig(**TINY), tiny_dataset, out=tmp_path / "model", progress=False)
    assert summary["epochs"] == 2 and 0 <= summary["val_acc"] <= 1
    folder = Path(summary["model_dir"])
    meta = json.loads((folder / "model.json").read_text())
    assert meta["class_names"] == ["circle", "square", "triangle"]
    assert (folder / "model.torchscript").exists()
    img = next((tiny_dataset / "val" / "square").iterdir())
    [row] = predict(folder, [img], top=2)
    assert len(row["top"]) == 2 and row["top"][0][0] in meta["class_names"]


def test_pickle_payload_in_checkpoint_is_refused(tmp_path: Path) -> None:
    from search.config import TLSearchError

    class Payload:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('pwned')" % str(tmp_path / "pwned"),))

    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(TLSearchError):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_pretrained_lite0_beats_random_on_hymenoptera(shared_dir: Path, tmp_path: Path) -> None:
    """Real transfer learning: head only on real photos, real ImageNet weights."""
    index = scan_dataset(shared_dir / "data" / "hymenoptera", warn=lambda m: None)
    cfg = TrialConfig(backbone="timm/tf_efficientnet_lite0", freeze_depth="all", augmentation="none",
                      image_size=160, epochs=8, batch_size=32, lr=3e-3, optimizer="adamw")
    weights = str(shared_dir / "weights")
    pre = fine_tune(cfg, index, weights_dir=weights, cache_dir=str(tmp_path / "c"))
    rnd = fine_tune(cfg.replace(pretrained=False), index, cache_dir=str(tmp_path / "c"))
    assert pre.best["val_acc"] >= 0.85, pre.best
    assert pre.best["val_acc"] - rnd.best["val_acc"] >= 0.2, (pre.best["val_acc"], rnd.best["val_acc"])
