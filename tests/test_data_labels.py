"""Label files (CSV/TSV of path, label[, split]) as datasets, and the health `check` reports.

A bad row is skipped with a warning naming the file and the row; a bad file stops with one line
(exit 2 from the CLI). The split, the fingerprint and the caches follow the file's labels and
splits, not the folders the images sit in.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from search.cli import main
from search.data import DatasetError, SplitSpec, format_summary, resplit, scan_dataset
from tests.conftest import make_image_folder

# The file's labels differ from the folder names: what the scan finds must come from the file.
NAMES = {"circle": "round", "square": "box", "triangle": "tri"}


class Warnings(list):
    def __call__(self, message: str) -> None:
        self.append(message)


def _images(root: Path, per_class: int = 6) -> dict[str, list[str]]:
    """root/images/<shape>/<shape>_<i>.png; returns {file label: [paths relative to root]}."""
    make_image_folder(root / "images", per_class=per_class, size=16, splits=())
    return {NAMES[c]: [f"images/{c}/{c}_{i}.png" for i in range(per_class)] for c in NAMES}


def _write(path: Path, header: str, rows: list[str], sep: str = ",") -> Path:
    path.write_text("\n".join([header, *rows]).replace(",", sep) + "\n")
    return path


def _csv(root: Path, *, split: bool = False, per_class: int = 6) -> Path:
    """labels.csv listing every image; with split, the first 4 of a class train, then val, test."""
    images = _images(root, per_class)
    rows = []
    for label, paths in images.items():
        for i, p in enumerate(paths):
            rows.append(f"{p},{label}" + (f",{('train', 'train', 'train', 'train', 'val', 'test')[i % 6]}" if split else ""))
    return _write(root / "labels.csv", "path,label" + (",split" if split else ""), rows)


def test_csv_without_split_column_is_split_at_random(tmp_path: Path) -> None:
    labels = _csv(tmp_path / "d")
    index = scan_dataset(labels, val_fraction=0.34, seed=3, warn=Warnings(), cache_dir=tmp_path / "c")
    assert index.classes == ("box", "round", "tri")  # the file's labels, not the folder names
    assert index.label_file == str(labels) and index.root == str(tmp_path / "d")
    assert (len(index.train), len(index.val), len(index.test)) == (12, 6, 0)
    assert index.split_spec == SplitSpec("csv", labels="labels.csv", val_fraction=0.34, seed=3)
    assert all(index.classes[y] == NAMES[Path(p).parent.name] for p, y in index.train + index.val)
    # `train` reproduces it from the record alone: same spec, same scan
    spec = SplitSpec.from_dict(index.split_spec.to_dict())
    again = scan_dataset(labels, **spec.scan_args(), warn=Warnings(), cache_dir=tmp_path / "c")
    assert again == index
    assert resplit(index, val_fraction=0.34, seed=3) == index
    assert resplit(index, val_fraction=0.34, seed=4).val != index.val
    # the folder holding the file is the same dataset
    assert scan_dataset(tmp_path / "d", val_fraction=0.34, seed=3, warn=Warnings(), cache_dir=tmp_path / "c") == index


def test_csv_split_column_decides_train_val_test(tmp_path: Path) -> None:
    labels = _csv(tmp_path / "d", split=True)
    index = scan_dataset(labels, seed=5, warn=Warnings(), cache_dir=tmp_path / "c")
    assert (len(index.train), len(index.val), len(index.test)) == (12, 3, 3)
    assert index.split_spec == SplitSpec("csv", labels="labels.csv", test="test")
    assert index.split_spec.scan_args() == {}
    assert {Path(p).name for p, _ in index.val} == {"circle_4.png", "square_4.png", "triangle_4.png"}
    assert index.counts()["round"] == {"train": 4, "val": 1, "test": 1}
    with pytest.raises(DatasetError, match="split by its val rows"):
        resplit(index, val_fraction=0.2, seed=0)
    # a seed does not move a split the file gives
    assert scan_dataset(labels, seed=6, warn=Warnings(), cache_dir=tmp_path / "c").fingerprint == index.fingerprint


def test_tsv_and_a_split_column_with_train_and_test_only(tmp_path: Path) -> None:
    root = tmp_path / "d"
    images = _images(root)
    # columns in another order, an extra column, split values in any case
    rows = [f"{label}\t{p}\t{'Test' if i == 5 else 'TRAIN'}\tx" for label, ps in images.items() for i, p in enumerate(ps)]
    labels = _write(root / "labels.tsv", "Label\tpath\tsplit\tnote", rows)
    index = scan_dataset(labels, val_fraction=0.2, seed=0, warn=Warnings(), cache_dir=tmp_path / "c")
    assert (len(index.train), len(index.val), len(index.test)) == (12, 3, 3)  # val drawn from the 5 train rows
    assert index.split_spec.to_dict() == {"layout": "csv", "val_fraction": 0.2, "seed": 0, "test": "test",
                                          "labels": "labels.tsv"}
    assert "test rows held out" in index.split


def test_every_bad_row_is_skipped_with_the_file_and_row_named(tmp_path: Path) -> None:
    root = tmp_path / "d"
    images = _images(root)
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [f"{p},{label}" for label, ps in images.items() for p in ps]  # rows 2..19
    rows += [
        "images/missing.png,round",  # row 20: no such image
        "images/broken.png,box",  # row 21: unreadable image
        "images/circle/circle_0.png,round",  # row 22: the same row again
        "images/circle/circle_1.png,box",  # row 23: the same image, another label
        ",round",  # row 24: no path
        "images/square/square_0.png,",  # row 25: no label
    ]
    labels = _write(root / "labels.csv", "path,label", rows)
    warnings = Warnings()
    index = scan_dataset(labels, warn=warnings, cache_dir=tmp_path / "c")
    assert len(index.train) + len(index.val) == 18  # every good row, none of the bad ones
    expected = {
        20: "image not found", 21: "not an image file", 22: "duplicate of row 2", 23: "the same image as row 3",
        24: "no path", 25: "no label",
    }
    assert len(warnings) == len(expected), warnings
    for row, reason in expected.items():
        [line] = [w for w in warnings if f"labels.csv row {row}" in w]
        assert reason in line, line
    assert len(index.skipped) == len(expected)
    assert "labels.csv row 20: image not found" in format_summary(index)


@pytest.mark.parametrize(
    "content, message",
    [
        ("images/circle/circle_0.png,round\nimages/square/square_0.png,box\n", "has no header row"),
        ("file,class\nimages/circle/circle_0.png,round\n", "missing column(s) path, label; the header names file, class"),
        ("path,label,split\nimages/circle/circle_0.png,round,train\nimages/square/square_0.png,box,training\n",
         "labels.csv row 3: unknown split 'training'"),
        ("path,label\n", "has a header but no row"),
        ("path,label\nimages/nope.png,round\nimages/nope2.png,box\n", "no usable row in"),
        ("path,label\n" + "".join(f"images/circle/circle_{i}.png,round\n" for i in range(4))
         + "images/nope.png,box\n", "class 'box' has no usable image"),
        ("path,label,split\n" + "".join(f"images/circle/circle_{i}.png,round,train\n" for i in range(3))
         + "".join(f"images/square/square_{i}.png,box,train\n" for i in range(3))
         + "images/circle/circle_4.png,round,val\n", "class 'box' has no usable image among the val rows"),
        ("path,label\nimages/circle/circle_0.png,round\nimages/circle/circle_1.png,round\n", "only the label 'round'"),
        ("path,label,label\nimages/circle/circle_0.png,round,round\n", "names the column 'label' twice"),
    ],
    ids=["no-header", "missing-columns", "unknown-split", "no-row", "no-usable-row", "empty-class",
         "class-without-val", "one-class", "column-twice"],
)
def test_every_bad_file_is_one_line_exit_2(
    tmp_path: Path, content: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "d"
    _images(root)
    (root / "labels.csv").write_text(content)
    with pytest.raises(DatasetError, match=_escape(message)):
        scan_dataset(root / "labels.csv", warn=Warnings(), cache_dir=tmp_path / "c")
    assert main(["check", str(root / "labels.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tlsearch: error:") and message in err[-1] and "Traceback" not in "".join(err)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_which_folder_is_a_label_file_dataset(tmp_path: Path) -> None:
    # An ImageFolder with a stray CSV that names no path/label is still an ImageFolder.
    folder = make_image_folder(tmp_path / "f", classes=("a", "b"), per_class=4, size=16, splits=())
    (folder / "notes.csv").write_text("who,when\nme,today\n")
    index = scan_dataset(folder, warn=Warnings(), cache_dir=tmp_path / "c")
    assert index.label_file is None and index.classes == ("a", "b")
    # Two label files: the user must say which.
    d = tmp_path / "d"
    _csv(d)
    shutil.copy(d / "labels.csv", d / "other.csv")
    with pytest.raises(DatasetError, match="several label files .*labels.csv, other.csv.*pass the one"):
        scan_dataset(d, warn=Warnings(), cache_dir=tmp_path / "c")
    # A train/ folder wins over a label file beside it.
    make_image_folder(d, classes=("a", "b"), per_class=4, size=16, splits=("train", "val"))
    assert scan_dataset(d, warn=Warnings(), cache_dir=tmp_path / "c").label_file is None
    # A file that is not a label file is no dataset.
    with pytest.raises(DatasetError, match="not a folder nor a .csv/.tsv label file"):
        scan_dataset(d / "images" / "circle" / "circle_0.png", warn=Warnings())


def test_fingerprint_follows_the_file_labels_and_splits(tmp_path: Path) -> None:
    root = tmp_path / "d"
    labels = _csv(root, split=True)
    base = scan_dataset(labels, warn=Warnings(), cache_dir=tmp_path / "c")
    text = labels.read_text()
    # Swap one image from train to test: the same files, another split.
    labels.write_text(text.replace("images/circle/circle_0.png,round,train", "images/circle/circle_0.png,round,test"))
    moved = scan_dataset(labels, warn=Warnings(), cache_dir=tmp_path / "c")
    assert moved.val == base.val and moved.fingerprint != base.fingerprint
    assert moved.content_fingerprint != base.content_fingerprint
    # Relabel one image: the same files and splits, another label.
    labels.write_text(text.replace("images/circle/circle_0.png,round,train", "images/circle/circle_0.png,box,train"))
    relabelled = scan_dataset(labels, warn=Warnings(), cache_dir=tmp_path / "c")
    assert relabelled.fingerprint != base.fingerprint
    # Rows in another order, a copy elsewhere: the same dataset.
    header, *rows = text.strip().splitlines()
    labels.write_text("\n".join([header, *reversed(rows)]) + "\n")
    assert scan_dataset(labels, warn=Warnings(), cache_dir=tmp_path / "c").fingerprint == base.fingerprint
    copy = shutil.copytree(root, tmp_path / "copy")
    assert scan_dataset(copy / "labels.csv", warn=Warnings(), cache_dir=tmp_path / "c").fingerprint == base.fingerprint


def test_health_duplicates_across_splits_imbalance_sizes_and_modes(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=6, size=16)
    # two train images copied into val under other names; one copied within train (not a leak)
    shutil.copy(root / "train" / "a" / "a_0.png", root / "val" / "a" / "copy.png")
    shutil.copy(root / "train" / "b" / "b_1.png", root / "val" / "b" / "other_name.png")
    shutil.copy(root / "train" / "b" / "b_2.png", root / "train" / "b" / "again.png")
    for i in range(6):  # make "a" 3x as large as "b" in train
        shutil.copy(root / "train" / "a" / f"a_{i}.png", root / "train" / "a" / f"x_{i}.jpg")
        Image.new("L", (20, 30), 90 + i).save(root / "train" / "a" / f"grey_{i}.png")
    Image.new("RGBA", (50, 12), (0, 0, 0, 0)).save(root / "val" / "b" / "alpha.png")
    Image.new("CMYK", (16, 16), (0, 0, 0, 0)).save(root / "val" / "a" / "cmyk.jpg")
    index = scan_dataset(root, warn=Warnings(), cache_dir=tmp_path / "c")
    across = index.duplicates_across_splits()
    pairs = sorted(sorted((s, Path(p).name) for s, p in g) for g in across)
    assert [g for g in pairs if ("val", "copy.png") in g or ("val", "other_name.png") in g] == [
        [("train", "a_0.png"), ("train", "x_0.jpg"), ("val", "copy.png")],
        [("train", "b_1.png"), ("val", "other_name.png")],
    ]
    assert index.imbalance_ratio() == pytest.approx(18 / 7)
    st = index.image_stats
    assert (st.min_width, st.max_width, st.min_height, st.max_height) == (16, 50, 12, 30)
    assert (st.grey, st.alpha, st.cmyk) == (6, 1, 1)
    summary = index.summary()
    assert summary["imbalance_ratio"] == pytest.approx(18 / 7, abs=1e-4)
    assert summary["duplicate_groups_within_splits"] == 6  # a_i == x_i (i = 1..5), b_2 == again
    assert summary["images"] == {"images": 18 + 7 + 8 + 8, "width": [16, 50], "height": [12, 30], "grey": 6,
                                 "alpha": 1, "cmyk": 1}
    assert len(summary["duplicates_across_splits"]) == 2


def test_check_names_both_pairs_duplicated_across_train_and_val(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=5, size=16)
    shutil.copy(root / "train" / "a" / "a_0.png", root / "val" / "a" / "leak_one.png")
    shutil.copy(root / "train" / "b" / "b_3.png", root / "val" / "b" / "leak_two.png")
    assert main(["check", str(root)]) == 0
    text = capsys.readouterr().out
    assert "duplicates across splits: 2 group(s)" in text
    assert "train/a/a_0.png == val/a/leak_one.png" in text and "train/b/b_3.png == val/b/leak_two.png" in text
    assert "imbalance (train, largest/smallest class): 1.00" in text
    assert "images: 22 decoded, width 16-16, height 16-16; grey 0, alpha 0, CMYK 0" in text
    assert main(["check", str(root), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    found = [sorted((f["split"], Path(f["path"]).name) for f in g) for g in summary["duplicates_across_splits"]]
    assert sorted(found) == [[("train", "a_0.png"), ("val", "leak_one.png")],
                             [("train", "b_3.png"), ("val", "leak_two.png")]]
    assert summary["imbalance_ratio"] == 1.0 and summary["images"]["images"] == 22


def test_check_names_the_split_of_each_duplicate_in_a_random_split(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=8, size=16, splits=())
    for i in range(8):  # every image of a twice: the random draw puts some pairs across train and val
        shutil.copy(root / "a" / f"a_{i}.png", root / "a" / f"copy_{i}.png")
    assert main(["check", str(root), "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["duplicates_across_splits"]
    assert groups
    assert main(["check", str(root)]) == 0
    text = capsys.readouterr().out
    for group in groups:  # the paths (a/...) do not say which split each file is in: the line does
        assert " == ".join(f"{Path(f['path']).relative_to(root)} ({f['split']})" for f in group) in text


def test_check_on_a_label_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = _csv(tmp_path / "d", split=True)
    # the same picture listed under another path, once as train and once as val: a leak
    shutil.copy(tmp_path / "d" / "images" / "circle" / "circle_0.png", tmp_path / "d" / "images" / "dup.png")
    with labels.open("a") as f:
        f.write("images/dup.png,round,val\n")
    assert main(["check", str(labels), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["label_file"] == str(labels) and summary["split_spec"]["layout"] == "csv"
    assert summary["totals"] == {"train": 12, "val": 4, "test": 3}
    [group] = summary["duplicates_across_splits"]
    assert sorted((f["split"], Path(f["path"]).name) for f in group) == [("train", "circle_0.png"), ("val", "dup.png")]
    assert main(["check", str(labels)]) == 0
    text = capsys.readouterr().out
    assert f"dataset: {labels}" in text and "images/circle/circle_0.png (train) == images/dup.png (val)" in text


def test_check_on_real_data_names_both_pairs(tmp_path: Path, shared_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's check: hymenoptera with two train photos copied into val under other names."""
    root = shutil.copytree(shared_dir / "data" / "hymenoptera", tmp_path / "hym")
    ants, bees = min((root / "train" / "ants").glob("*.jpg")), min((root / "train" / "bees").glob("*.jpg"))
    shutil.copy(ants, root / "val" / "ants" / "copy_of_ant.jpg")
    shutil.copy(bees, root / "val" / "bees" / "renamed_bee.jpg")
    assert main(["check", str(root), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    found = sorted(sorted((f["split"], Path(f["path"]).name) for f in g) for g in summary["duplicates_across_splits"])
    assert found == [[("train", ants.name), ("val", "copy_of_ant.jpg")], [("train", bees.name), ("val", "renamed_bee.jpg")]]
