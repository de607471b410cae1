"""Label issues (`search.label_issues`) and near-duplicates across splits (`search.data._near`),
on tiny generated ImageFolders; `tlsearch check` prints and returns both."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from search.cli import main
from search.data import near_duplicates, scan_dataset
from tests.conftest import make_image_folder

# Three classes a random network tells apart by colour alone: the probe then has something to learn.
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def _colour_folder(root: Path, *, per_class: int = 16, size: int = 64) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name, rgb in COLOURS.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                noise = rng.integers(-40, 40, size=(size, size, 3))
                px = np.clip(np.array(rgb)[None, None, :] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(px).save(d / f"{name}_{i}.png")
    return root


def test_a_planted_wrong_label_is_ranked_first(tmp_path: Path) -> None:
    pytest.importorskip("cleanlab")
    from search.label_issues import find_label_issues

    root = _colour_folder(tmp_path / "d")
    planted = root / "train" / "green" / "red_3.png"  # a red picture filed as green
    shutil.move(root / "train" / "red" / "red_3.png", planted)
    index = scan_dataset(root)
    result = find_label_issues(index, backbone="resnet18", image_size=32, pretrained=False, device="cpu",
                               cache_dir=str(tmp_path / "cache"))
    assert result.images == 96 and result.folds == 5
    first = result.issues[0]
    assert first["path"] == str(planted) and first["rank"] == 1
    assert (first["split"], first["given"], first["suggested"]) == ("train", "green", "red")
    assert first["given_prob"] < 0.5 < first["suggested_prob"]
    assert not any("/test/" in r["path"] for r in result.issues)


def test_out_of_fold_probabilities_never_see_their_own_row() -> None:
    from search.label_issues import out_of_fold_probs

    # Pure noise features with a memorable label per row: a probe that saw the row would predict
    # it; out of fold it cannot beat chance by much.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 400)).astype(np.float32)
    y = rng.integers(0, 2, size=200)
    p = out_of_fold_probs(x, y.tolist(), n_classes=2, folds=5)
    assert p.shape == (200, 2) and np.allclose(p.sum(1), 1.0)
    assert (p.argmax(1) == y).mean() < 0.7


def _copy_resized(src: Path, dst: Path, *, scale: float = 0.6, quality: int = 70, trim: float = 0.0) -> Path:
    im = Image.open(src).convert("RGB")
    w, h = im.size
    dx, dy = round(trim * w), round(trim * h)
    im = im.crop((dx, dy, w - dx, h - dy))
    im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BILINEAR).save(
        dst, "JPEG", quality=quality)
    return dst


def test_near_duplicates_across_splits_are_found_with_their_splits(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", per_class=8, size=96)
    assert near_duplicates(scan_dataset(root)) == []  # different pictures are never paired
    val_image = root / "val" / "square" / "square_2.png"
    copy = _copy_resized(val_image, root / "train" / "square" / "copy_of_val.jpg")
    trimmed = _copy_resized(root / "val" / "circle" / "circle_5.png", root / "train" / "circle" / "trimmed.jpg",
                            scale=0.8, trim=0.04)
    found = near_duplicates(scan_dataset(root))
    pairs = {(d.split_a, d.path_a, d.split_b, d.path_b) for d in found}
    assert pairs == {("train", str(copy), "val", str(val_image)),
                     ("train", str(trimmed), "val", str(root / "val" / "circle" / "circle_5.png"))}
    assert all(0.985 <= d.similarity <= 1.0 for d in found)


def test_check_names_near_and_exact_copies_with_their_splits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_image_folder(tmp_path / "d", per_class=8, size=96)
    val_image = root / "val" / "square" / "square_2.png"
    copy = _copy_resized(val_image, root / "train" / "square" / "copy_of_val.jpg")
    exact = root / "train" / "circle" / "exact.png"
    shutil.copy(root / "val" / "circle" / "circle_1.png", exact)
    assert main(["check", str(root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    near = out["near_duplicates_across_splits"]
    assert [(d["a"]["split"], d["a"]["path"], d["b"]["split"], d["b"]["path"]) for d in near] == [
        ("train", str(copy), "val", str(val_image))]
    # The exact copy is still found by its content hash, as before, and only there.
    assert out["duplicates_across_splits"] == [[{"split": "train", "path": str(exact)},
                                                {"split": "val", "path": str(root / "val" / "circle" / "circle_1.png")}]]
    assert main(["check", str(root)]) == 0
    text = capsys.readouterr().out
    assert "near-duplicates across splits: 1 pair(s)" in text
    assert "train/square/copy_of_val.jpg (train) ~ val/square/square_2.png (val)" in text
    assert "duplicates across splits: 1 group(s) of identical files" in text


def test_check_labels_without_cleanlab_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "cleanlab", None)  # import cleanlab then raises ImportError
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)
    root = make_image_folder(tmp_path / "d", per_class=2)
    assert main(["check", str(root), "--labels"]) == 2
    err = capsys.readouterr().err
    assert "needs cleanlab" in err and "pip install 'tlsearch[labels]'" in err and "Traceback" not in err
    assert main(["check", str(root), "--folds", "3"]) == 2
    assert "only go with --labels" in capsys.readouterr().err


def test_check_labels_prints_and_keeps_the_ranking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("cleanlab")
    from search import label_issues

    monkeypatch.setenv("TLSEARCH_CACHE", str(tmp_path / "cache"))
    root = _colour_folder(tmp_path / "d", per_class=10)
    planted = root / "val" / "blue" / "green_4.png"
    shutil.move(root / "val" / "green" / "green_4.png", planted)
    real = label_issues.find_label_issues
    monkeypatch.setattr(label_issues, "find_label_issues",
                        lambda index, **kw: real(index, **{**kw, "pretrained": False, "device": "cpu"}))
    assert main(["check", str(root), "--labels", "--backbone", "resnet18", "--image-size", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    issues = out["label_issues"]["issues"]
    assert issues[0]["path"] == str(planted) and issues[0]["split"] == "val" and issues[0]["suggested"] == "green"
    kept = label_issues.read_kept(out["fingerprint"])
    assert kept is not None and kept["issues"][0]["path"] == str(planted)
