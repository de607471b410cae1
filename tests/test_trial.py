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


def test_fine_tune_reports_every_epoch_and_saves_a_checkpoint(tiny_dataset: Path, tmp_path: Path) -> None:
    index = scan_dataset(tiny_dataset)
    seen: list[dict] = []
    ckpt = tmp_path / "ckpt" / "trial.pt"
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


def test_the_recorded_lr_is_the_heads(tiny_dataset: Path, tmp_path: Path) -> None:
    """`lr` names the head's rate: the per-epoch record shows it, not a backbone stage's fraction."""
    index = scan_dataset(tiny_dataset)
    seen: list[dict] = []
    cfg = TrialConfig(**{**TINY, "epochs": 3}, freeze_depth=3, backbone_lr_mult=0.1, lr_decay=0.5)
    fine_tune(cfg, index, report=seen.append, cache=False)
    # No warm-up: after the first of 3 epochs the cosine stands at 0.75 of the peak, whatever the
    # number of steps per epoch.
    assert seen[0]["lr"] == pytest.approx(cfg.lr * 0.75)


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


def test_value_checkpoint_and_confusion_are_the_last_epoch(tiny_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    """A trial whose best epoch is not its last is described by its last epoch everywhere."""
    import search.trial._loop as trial_module  # where `fine_tune` looks up `evaluate`

    real = trial_module.evaluate
    calls = {"n": 0}

    def evaluate_best_first(*args, **kwargs):  # epoch 1 looks perfect, epoch 2 does not
        out = real(*args, **kwargs)
        calls["n"] += 1
        n = sum(map(sum, out["confusion_matrix"]))
        k = len(out["confusion_matrix"])
        right = n if calls["n"] == 1 else n // 2
        confusion = [[0] * k for _ in range(k)]
        confusion[0][0], confusion[0][1] = right, n - right
        return {**out, "val_acc": right / n, "confusion_matrix": confusion}

    monkeypatch.setattr(trial_module, "evaluate", evaluate_best_first)
    ckpt = tmp_path / "trial.pt"
    seen: list[dict] = []
    result = fine_tune(TrialConfig(**TINY), scan_dataset(tiny_dataset), report=seen.append, cache=False,
                       checkpoint_path=str(ckpt), keep_model=True)
    last = seen[-1]
    assert last["val_acc"] < seen[0]["val_acc"] and last["best_val_acc"] == seen[0]["val_acc"]
    assert last["confusion_matrix"][0][0] / len(scan_dataset(tiny_dataset).val) == pytest.approx(last["val_acc"])
    saved = load_checkpoint(ckpt)
    final = result.model.state_dict()
    assert all(torch.equal(saved[k], final[k].cpu()) for k in final)


def test_train_refuses_a_freeze_depth_the_backbone_lacks(tiny_dataset: Path, tmp_path: Path) -> None:
    from search.config import ConfigError

    # Refused before any work: before the dataset is even looked at.
    with pytest.raises(ConfigError, match=r"between 0 and 5 for resnet18, got 99"):
        train(TrialConfig(**TINY, freeze_depth=99), tmp_path / "no-such-dataset", progress=False)


def test_a_complete_trial_keeps_its_validation_logits_beside_its_checkpoint(tiny_dataset: Path, tmp_path: Path) -> None:
    from search.model_io import load_val_logits, logits_path

    index = scan_dataset(tiny_dataset)
    ckpt = tmp_path / "ckpt" / "trial-0.pt"
    seen: list[dict] = []
    fine_tune(TrialConfig(**TINY, freeze_depth=2), index, report=seen.append,
              cache_dir=str(tmp_path / "cache"), checkpoint_path=str(ckpt))
    assert logits_path(ckpt) == tmp_path / "ckpt" / "trial-0.val-logits.pt"
    logits, labels = load_val_logits(ckpt)
    assert logits.shape == (len(index.val), len(index.classes))
    assert labels.tolist() == [y for _, y in index.val]
    # The same predictions the last epoch was scored with.
    assert (logits.argmax(1) == labels).float().mean().item() == pytest.approx(seen[-1]["val_acc"])


def test_the_probe_of_an_lp_ft_refit_trains_on_train_plus_val_too(tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from search.trial import _loop

    index = scan_dataset(tiny_dataset)
    seen = []
    load_data = _loop.load_data

    def spy(config, *args, train_on_val=False, **kwargs):
        seen.append((config.freeze_depth, train_on_val))
        return load_data(config, *args, train_on_val=train_on_val, **kwargs)

    monkeypatch.setattr(_loop, "load_data", spy)
    cfg = TrialConfig(**{**TINY, "epochs": 1}, freeze_depth=2, lp_epochs=1, lp_lr=1e-2)
    fine_tune(cfg, index, cache=False, train_on_val=True)
    assert seen == [("all", True), (2, True)]  # the probe, then the fine-tune: both on train+val
    seen.clear()
    fine_tune(cfg, index, cache=False)
    assert seen == [("all", False), (2, False)]  # a trial's probe trains on train only
