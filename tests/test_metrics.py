"""The objectives a search ranks by (`--metric`), and the scores and per-class table of a confusion matrix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from search.config import ConfigError
from search.metrics import OBJECTIVES, check_metric, confusion_scores, mode_of, per_class_table
from search.settings import SearchSettings

ROOT = Path(__file__).resolve().parents[1]

# 3 classes: rows true, columns predicted. Class 2 is rare and half missed.
CONFUSION = [
    [8, 2, 0],
    [1, 9, 0],
    [0, 1, 1],
]


def test_per_class_table_matches_hand_computed_precision_recall_f1() -> None:
    rows = per_class_table(CONFUSION, ["ants", "bees", "wasps"])
    assert [r["class"] for r in rows] == ["ants", "bees", "wasps"]
    assert [r["support"] for r in rows] == [10, 10, 2]
    ants, bees, wasps = rows
    assert ants["precision"] == pytest.approx(8 / 9) and ants["recall"] == pytest.approx(0.8)
    assert bees["precision"] == pytest.approx(9 / 12) and bees["recall"] == pytest.approx(0.9)
    assert wasps["precision"] == pytest.approx(1.0) and wasps["recall"] == pytest.approx(0.5)
    assert wasps["f1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    # Names missing or of the wrong length: "class i", never a crash.
    assert [r["class"] for r in per_class_table(CONFUSION)] == ["class 0", "class 1", "class 2"]


def test_confusion_scores_match_scikit_learn_conventions() -> None:
    s = confusion_scores(CONFUSION)
    assert s["acc"] == pytest.approx(18 / 22)
    assert s["balanced_acc"] == pytest.approx((0.8 + 0.9 + 0.5) / 3)
    f1 = [r["f1"] for r in per_class_table(CONFUSION)]
    assert s["macro_f1"] == pytest.approx(sum(f1) / 3)
    # A class never predicted: F1 0 (zero_division=0), still averaged in.
    never = confusion_scores([[5, 0], [3, 0]])
    assert never["macro_f1"] == pytest.approx((2 * (5 / 8) * 1.0 / (5 / 8 + 1.0)) / 2)
    # A class absent from the true labels and never predicted says nothing: left out.
    absent = confusion_scores([[4, 0, 0], [0, 4, 0], [0, 0, 0]])
    assert absent["macro_f1"] == pytest.approx(1.0) and absent["balanced_acc"] == pytest.approx(1.0)
    assert confusion_scores([[0, 0], [0, 0]]) == {"acc": 0.0, "balanced_acc": 0.0, "macro_f1": 0.0}


def test_metric_is_checked_and_mode_follows_it(tmp_path: Path) -> None:
    assert set(OBJECTIVES) == {"val_acc", "val_balanced_acc", "val_macro_f1", "val_loss"}
    assert mode_of("val_loss") == "min" and mode_of("val_macro_f1") == "max"
    with pytest.raises(ConfigError, match="unknown metric 'f1'; available: val_acc, val_balanced_acc"):
        check_metric("f1")
    base = dict(study="s", data=str(tmp_path))
    assert SearchSettings(**base).mode == "max"
    assert SearchSettings(**base, metric="val_loss").mode == "min"
    assert SearchSettings(**base, metric="val_macro_f1").mode == "max"
    with pytest.raises(ConfigError, match="unknown metric"):
        SearchSettings(**base, metric="accuracy")
    with pytest.raises(ConfigError, match="does not fit metric val_loss"):
        SearchSettings(**base, metric="val_loss", mode="max")
    # Changing the metric brings its direction; stored and read back, the settings stay the same.
    s = SearchSettings(**base).replace(metric="val_loss")
    assert s.mode == "min" and SearchSettings.from_dict(s.to_dict()) == s


def test_bad_metric_on_the_command_line_is_one_line_and_exit_2(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "search", "run", str(tmp_path), "--study", "s", "--metric", "f1"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)})
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown metric 'f1'" in lines[0] and "val_macro_f1" in lines[0]
    assert not (tmp_path / "studies").exists()  # refused before anything was made


def test_every_epoch_reports_every_metric_and_the_per_class_table(tmp_path: Path) -> None:
    from conftest import make_image_folder
    from search.config import TrialConfig
    from search.data import scan_dataset
    from search.trial import fine_tune

    cfg = TrialConfig(backbone="resnet18", pretrained=False, image_size=32, batch_size=8, epochs=2, lr=1e-2,
                      freeze_depth="all", augmentation="none")
    for n_classes in (3, 10):
        names = tuple(f"c{i:02d}" for i in range(n_classes))
        index = scan_dataset(make_image_folder(tmp_path / f"d{n_classes}", classes=names, per_class=2, size=24))
        seen: list[dict] = []
        fine_tune(cfg, index, report=seen.append, cache_dir=str(tmp_path / "c"))
        for m in seen:
            scores = confusion_scores(m["confusion_matrix"])
            assert m["val_macro_f1"] == pytest.approx(scores["macro_f1"])
            assert m["val_balanced_acc"] == pytest.approx(scores["balanced_acc"])
            assert m["per_class"] == per_class_table(m["confusion_matrix"], names)
            # Top-5 only where it means something (10 classes or more); it bounds top-1 from above.
            assert ("val_top5_acc" in m) == (n_classes >= 10)
            if n_classes >= 10:
                assert m["val_acc"] <= m["val_top5_acc"] <= 1.0
