"""Tests for search/data/: scanning, validation, splits, decoding rules and the image cache."""

from __future__ import annotations

import os
import pickle
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from search.data import _cache, _hashes
from search.config import TLSearchError
from search.data import (
    BadImageError,
    DatasetError,
    DatasetIndex,
    ImageDataset,
    SplitSpec,
    dataset_splits,
    decode_resized,
    default_cache_dir,
    format_summary,
    load_image,
    resplit,
    scan_dataset,
    stored_size,
)
from tests.conftest import make_image_folder


class Warnings(list):
    """Collects warn() lines."""

    def __call__(self, message: str) -> None:
        self.append(message)

    def naming(self, name: str) -> list[str]:
        return [w for w in self if name in w]


def _rgb(path: Path, colour=(200, 30, 30), size=(24, 24), fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt, **kw)
    return path


def _noise_jpeg(path: Path, size=(64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
    return path


def _png_bomb(path: Path, side: int) -> Path:
    """A valid 1-bit PNG of side x side pixels that is a few KB on disk."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


# --- scanning: layouts, errors ----------------------------------------------------------------


def test_folders_layout(tiny_dataset: Path) -> None:
    index = scan_dataset(tiny_dataset, warn=Warnings())
    assert index.classes == ("circle", "square", "triangle")
    assert index.split == "folders: train/val"
    assert len(index.train) == 18 and len(index.val) == 18
    assert index.root == str(tiny_dataset.resolve())
    assert all(os.path.isabs(p) for p, _ in index.train + index.val)
    assert {y for _, y in index.train} == {0, 1, 2}
    assert all(Path(p).parent.name == index.classes[y] for p, y in index.train + index.val)
    assert index.skipped == ()
    assert len(index.fingerprint) == 16
    # A frozen record.
    with pytest.raises(Exception):
        index.split = "x"  # type: ignore[misc]


def test_valid_accepted_as_val(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", splits=("train", "valid"), per_class=2, size=16)
    index = scan_dataset(root, warn=Warnings())
    assert index.split == "folders: train/valid"
    assert len(index.val) == 6 and index.test == ()
    assert index.split_spec == SplitSpec("folders", train="train", val="valid")


def test_train_and_test_without_val_splits_val_from_train(tmp_path: Path) -> None:
    # test/ is for the final evaluation: validation is drawn from train/ and test/ stays whole.
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=5, size=16, splits=("train", "test"))
    w = Warnings()
    index = scan_dataset(root, val_fraction=0.4, seed=3, warn=w)
    assert w == []
    assert index.split_spec == SplitSpec("random", train="train", val_fraction=0.4, seed=3, test="test")
    assert index.split.startswith("random from train/: fraction=0.4 seed=3") and "test/" in index.split
    assert all(Path(p).parts[-3] == "train" for p, _ in index.train + index.val)
    assert len(index.train) == 6 and len(index.val) == 4
    test_files = sorted(str(p) for p in (root / "test").rglob("*.png"))
    assert sorted(p for p, _ in index.test) == test_files
    assert all(Path(p).parent.name == index.classes[y] for p, y in index.test)
    assert index.counts()["a"] == {"train": 3, "val": 2, "test": 5}
    s = index.summary()
    assert s["totals"] == {"train": 6, "val": 4, "test": 10}
    assert s["split_spec"] == {"layout": "random", "train": "train", "val_fraction": 0.4, "seed": 3, "test": "test"}
    assert "test" in format_summary(index).splitlines()[5]  # the table's header has a test column
    # test/ is part of the dataset: changing it changes the fingerprint.
    _rgb(root / "test" / "a" / "new.png")
    assert scan_dataset(root, val_fraction=0.4, seed=3, warn=w).fingerprint != index.fingerprint


def test_train_val_test_records_test_for_the_final_evaluation(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=3, size=16, splits=("train", "val", "test"))
    w = Warnings()
    index = scan_dataset(root, warn=w)
    assert w == []  # no "ignoring folder(s) beside train/: test"
    assert index.split_spec == SplitSpec("folders", train="train", val="val", test="test")
    assert {Path(p).parts[-3] for p, _ in index.val} == {"val"}
    assert {Path(p).parts[-3] for p, _ in index.test} == {"test"} and len(index.test) == 6
    assert not {p for p, _ in index.test} & {p for p, _ in index.train + index.val}
    assert index.summary()["totals"] == {"train": 6, "val": 6, "test": 6}


def test_test_folder_with_other_classes_is_refused(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=16, splits=("train", "val"))
    make_image_folder(root, classes=("a", "z"), per_class=1, size=16, splits=("test",))
    with pytest.raises(DatasetError, match="only in test/: z"):
        scan_dataset(root, warn=Warnings())


def test_split_spec_round_trip_and_errors() -> None:
    spec = SplitSpec("random", val_fraction=0.3, seed=3)
    assert spec.to_dict() == {"layout": "random", "val_fraction": 0.3, "seed": 3}
    assert SplitSpec.from_dict(spec.to_dict()) == spec
    assert spec.scan_args() == {"val_fraction": 0.3, "seed": 3}
    assert SplitSpec("folders", train="train", val="val").scan_args() == {}
    with pytest.raises(DatasetError, match="best.yaml: split: val_fraction must be between 0 and 1.*1.5"):
        SplitSpec.from_dict({"layout": "random", "val_fraction": 1.5, "seed": 0}, source="best.yaml: split")
    with pytest.raises(DatasetError, match="layout must be one of folders, random, csv, got 'magic'"):
        SplitSpec.from_dict({"layout": "magic"})
    with pytest.raises(DatasetError, match="unknown key.*colour"):
        SplitSpec.from_dict({"layout": "folders", "val": "val", "colour": 1})
    with pytest.raises(DatasetError, match="expected a mapping"):
        SplitSpec.from_dict("random")


def test_resplit_equals_a_fresh_scan(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=6, size=16, splits=("train", "test"))
    first = scan_dataset(root, warn=Warnings())
    again = resplit(first, val_fraction=0.3, seed=3)
    assert again == scan_dataset(root, val_fraction=0.3, seed=3, warn=Warnings())
    assert again.fingerprint != first.fingerprint and again.content_fingerprint == first.content_fingerprint
    folders = scan_dataset(make_image_folder(tmp_path / "f", per_class=2, size=16), warn=Warnings())
    with pytest.raises(DatasetError, match="split by its folders"):
        resplit(folders, val_fraction=0.3, seed=3)


def test_errors_are_tlsearch_errors() -> None:
    assert issubclass(DatasetError, TLSearchError) and issubclass(BadImageError, TLSearchError)


def test_no_such_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such folder.*nope"):
        scan_dataset(tmp_path / "nope")


def test_no_class_folders(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        scan_dataset(tmp_path / "d")
    _rgb(tmp_path / "d" / "a.png")
    with pytest.raises(DatasetError, match=r"found 1 image\(s\) directly in it"):
        scan_dataset(tmp_path / "d")


def test_single_class(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("cat",), per_class=2, size=16)
    with pytest.raises(DatasetError, match="only one class \\('cat'\\)"):
        scan_dataset(root, warn=Warnings())


def test_empty_class_folder_in_val(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=16)
    for f in (root / "val" / "b").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match="class 'b' has no usable image in val/"):
        scan_dataset(root, warn=Warnings())


def test_empty_class_folder_without_split(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=3, size=16, splits=())
    (root / "c").mkdir()
    with pytest.raises(DatasetError, match="class 'c' has no usable image"):
        scan_dataset(root, warn=Warnings())


def test_class_too_small_to_split(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=3, size=16, splits=())
    for f in sorted((root / "b").iterdir())[1:]:
        f.unlink()
    with pytest.raises(DatasetError, match="class 'b' has only 1 usable image"):
        scan_dataset(root, warn=Warnings())


def test_class_emptied_by_bad_files_names_class_and_split(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=16)
    for f in (root / "train" / "a").iterdir():
        f.write_bytes(b"")
    w = Warnings()
    with pytest.raises(DatasetError, match="class 'a' has no usable image in train/"):
        scan_dataset(root, warn=w)
    assert len(w) == 2


def test_different_classes_in_train_and_val(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=1, size=16)
    (root / "val" / "c").rename(root / "val" / "d")
    with pytest.raises(DatasetError, match="only in train/: c; only in val/: d"):
        scan_dataset(root, warn=Warnings())


def test_hidden_files_and_folders_ignored(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=16)
    for hidden in ("__MACOSX", ".ipynb_checkpoints", ".hidden"):
        _rgb(root / "train" / hidden / "x.png")
        _rgb(root / "train" / "a" / hidden / "x.png")
    (root / "train" / "a" / "._a_0.png").write_bytes(b"\x00\x05junk")  # macOS resource fork
    (root / "train" / "a" / ".DS_Store").write_bytes(b"junk")
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    w = Warnings()
    index = scan_dataset(root, warn=w)
    assert index.classes == ("a", "b")
    assert len(index.train) == 4 and index.skipped == () and w == []


def test_upper_case_extensions_and_png_named_jpg(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=1, size=16)
    _rgb(root / "train" / "a" / "UP.JPG", fmt="JPEG")
    _rgb(root / "train" / "a" / "Mixed.JpEg", fmt="JPEG")
    _rgb(root / "train" / "b" / "really_png.jpg", fmt="PNG")
    _rgb(root / "train" / "b" / "TIFF.TIF", fmt="TIFF")
    index = scan_dataset(root, warn=Warnings())
    names = {Path(p).name for p, _ in index.train}
    assert {"UP.JPG", "Mixed.JpEg", "really_png.jpg", "TIFF.TIF"} <= names
    assert index.skipped == ()


def test_symlink_loop_and_dangling_link(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=16)
    a = root / "train" / "a"
    os.symlink(a, a / "loop")  # a folder that contains itself
    os.symlink(tmp_path / "missing.jpg", a / "dangling.jpg")
    os.symlink("self.jpg", a / "self.jpg")  # a link to itself: ELOOP
    os.symlink(tmp_path / "gone", root / "train" / "ghost_class")
    _rgb(tmp_path / "elsewhere" / "linked.png")
    os.symlink(tmp_path / "elsewhere" / "linked.png", a / "linked.png")
    w = Warnings()
    index = scan_dataset(root, warn=w)
    reasons = {Path(p).name: r for p, r in index.skipped}
    assert reasons["loop"].startswith("symlink loop")
    assert reasons["dangling.jpg"] == "dangling symlink"
    assert reasons["self.jpg"] == "symlink loop"
    assert reasons["ghost_class"] == "dangling symlink"
    assert w.naming("dangling.jpg") and w.naming("loop")
    assert index.classes == ("a", "b")
    names = [Path(p).name for p, y in index.train if y == 0]
    assert sorted(names) == ["a_0.png", "a_1.png", "linked.png"]


# --- skipped files --------------------------------------------------------------------------


def test_bad_files_skipped_with_warning(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=16)
    t = root / "train" / "a"
    full = _noise_jpeg(tmp_path / "full.jpg").read_bytes()
    (t / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (t / "empty.jpg").write_bytes(b"")
    (t / "text.jpg").write_text("hello, I am not a JPEG\n")
    _png_bomb(t / "bomb.png", 9000)  # 81 MP: over the guard, a few KB on disk
    w = Warnings()
    index = scan_dataset(root, warn=w)
    reasons = {Path(p).name: r for p, r in index.skipped}
    assert set(reasons) == {"truncated.jpg", "empty.jpg", "text.jpg", "bomb.png"}
    assert "truncated" in reasons["truncated.jpg"]
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["text.jpg"] == "not an image file"
    assert "decompression bomb" in reasons["bomb.png"] and "9000x9000" in reasons["bomb.png"]
    for name in reasons:
        (line,) = w.naming(name)
        assert line.startswith("skipping ") and line.endswith(reasons[name])
    assert len(index.train) == 4
    assert all(Path(p).name not in reasons for p, _ in index.train)
    # The summary lists them too.
    assert {Path(s["path"]).name for s in index.summary()["skipped"]} == set(reasons)
    assert "bomb.png: decompression bomb" in format_summary(index)


def test_default_warning_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=16)
    (root / "val" / "b" / "zero.png").write_bytes(b"")
    scan_dataset(root)
    assert "warning: skipping " in capsys.readouterr().err


def test_huge_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    # Beyond Pillow's own hard limit (2 x its MAX_IMAGE_PIXELS): still a clean BadImageError.
    p = _png_bomb(tmp_path / "big.png", 14000)
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_image(p)


def test_verify_false_keeps_bad_files(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=16)
    (root / "train" / "a" / "empty.jpg").write_bytes(b"")
    index = scan_dataset(root, verify=False, warn=Warnings())
    assert len(index.train) == 5 and index.skipped == ()


def test_truncated_images_stay_errors() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --- decoding rules -------------------------------------------------------------------------


def test_modes_converted_to_rgb(tmp_path: Path) -> None:
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(cmyk)  # red in CMYK
    grey = tmp_path / "grey.png"
    Image.new("L", (8, 8), 77).save(grey)
    one_bit = tmp_path / "bits.png"
    Image.new("1", (8, 8), 1).save(one_bit)
    rgba = tmp_path / "rgba.png"
    im = Image.new("RGBA", (8, 8), (10, 20, 30, 255))
    im.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent pixel -> white
    im.save(rgba)
    la = tmp_path / "la.png"
    Image.new("LA", (8, 8), (0, 0)).save(la)  # transparent black -> white
    pal = tmp_path / "pal.png"
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.save(pal, transparency=0)  # index 0 (black) transparent
    gif = tmp_path / "pal.gif"
    p.save(gif, transparency=0)

    for path in (cmyk, grey, one_bit, rgba, la, pal, gif):
        out = load_image(path)
        assert out.mode == "RGB" and out.size == (8, 8), path.name
    assert np.allclose(np.asarray(load_image(cmyk))[4, 4], (255, 0, 0), atol=3)
    assert tuple(np.asarray(load_image(grey))[4, 4]) == (77, 77, 77)
    assert tuple(np.asarray(load_image(one_bit))[4, 4]) == (255, 255, 255)
    a = np.asarray(load_image(rgba))
    assert tuple(a[0, 0]) == (255, 255, 255) and tuple(a[4, 4]) == (10, 20, 30)
    assert tuple(np.asarray(load_image(la))[4, 4]) == (255, 255, 255)
    for path in (pal, gif):
        a = np.asarray(load_image(path))
        assert tuple(a[0, 0]) == (255, 255, 255) and tuple(a[4, 4]) == (0, 255, 0), path.name


def test_16_bit_png_scaled_not_white(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    values = np.array([[0, 32896, 65535, 1000]], dtype=np.uint16)  # 32896 = 0x8080 (mid grey)
    Image.fromarray(values).save(path)  # uint16 -> mode I;16
    reopened = Image.open(path)
    assert reopened.mode in ("I;16", "I;16B", "I")  # really a 16-bit image on disk
    out = np.asarray(load_image(path))[0, :, 0]
    assert list(out) == [0, 128, 255, 4]


def test_exif_rotation_applied(tmp_path: Path) -> None:
    # Stored landscape, left half red, right half blue; orientation 6 = rotate 90 degrees clockwise.
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(a).save(path, exif=exif, quality=95)
    out = np.asarray(load_image(path))
    assert out.shape == (40, 20, 3)  # now portrait
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60  # red on top
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 60  # blue at the bottom


def test_bad_image_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(BadImageError, match="empty file"):
        load_image(tmp_path / "empty.jpg")
    with pytest.raises(BadImageError, match="file not found"):
        load_image(tmp_path / "absent.jpg")
    full = _noise_jpeg(tmp_path / "n.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(full[:-200])
    for draft in (None, 8):
        with pytest.raises(BadImageError, match="truncated"):
            load_image(tmp_path / "cut.jpg", draft=draft)


def test_stored_size_and_decode_resized(tmp_path: Path) -> None:
    assert stored_size(224) == 256 and stored_size(160) == 183 and stored_size(32) == 37
    # 60x30: left third red, middle blue, right third green -> the center crop is all blue.
    a = np.zeros((30, 90, 3), np.uint8)
    a[:, :30] = (255, 0, 0)
    a[:, 30:60] = (0, 0, 255)
    a[:, 60:] = (0, 255, 0)
    p = tmp_path / "wide.png"
    Image.fromarray(a).save(p)
    out = decode_resized(p, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert np.all(out[:, 2:-2, 2] > 240) and np.all(out[:, 2:-2, 0] < 15)
    # A big JPEG goes through draft mode and still comes out at the requested size.
    big = _noise_jpeg(tmp_path / "big.jpg", size=(900, 700))
    assert decode_resized(big, 64).shape == (64, 64, 3)


# --- random split and fingerprint ------------------------------------------------------------


def test_random_split_stratified_deterministic_recorded(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=10, size=16, splits=())
    (root / "c" / "c_9.png").unlink()
    (root / "c" / "c_8.png").unlink()  # 8 images: round(8 * 0.2) = 2 in val
    index = scan_dataset(root, warn=Warnings())
    assert index.split == "random: fraction=0.2 seed=0"
    counts = index.counts()
    assert counts == {"a": {"train": 8, "val": 2}, "b": {"train": 8, "val": 2}, "c": {"train": 6, "val": 2}}
    assert not {p for p, _ in index.train} & {p for p, _ in index.val}
    again = scan_dataset(root, warn=Warnings())
    assert again == index
    other = scan_dataset(root, seed=1, warn=Warnings())
    assert other.split == "random: fraction=0.2 seed=1"
    assert other.val != index.val and other.fingerprint != index.fingerprint
    half = scan_dataset(root, val_fraction=0.5, warn=Warnings())
    assert half.split == "random: fraction=0.5 seed=0" and half.counts()["a"] == {"train": 5, "val": 5}


def test_random_split_keeps_one_image_each_side(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=16, splits=())
    for fraction in (0.01, 0.9):
        index = scan_dataset(root, val_fraction=fraction, warn=Warnings())
        assert index.counts() == {"a": {"train": 1, "val": 1}, "b": {"train": 1, "val": 1}}
    with pytest.raises(DatasetError, match="val_fraction"):
        scan_dataset(root, val_fraction=1.0)


def test_train_folder_alone_is_split(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=5, size=16, splits=("train",))
    index = scan_dataset(root, warn=Warnings())
    assert index.split == "random from train/: fraction=0.2 seed=0"
    assert len(index.val) == 2 and len(index.train) == 8


def test_fingerprint_changes_with_files(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2, size=16)
    first = scan_dataset(root, warn=Warnings()).fingerprint
    assert scan_dataset(root, warn=Warnings()).fingerprint == first
    p = root / "train" / "a" / "a_0.png"
    _rgb(p, colour=(1, 2, 3), size=(17, 17))  # new content
    changed = scan_dataset(root, warn=Warnings()).fingerprint
    assert changed != first
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched only: the same content
    touched = scan_dataset(root, warn=Warnings()).fingerprint
    assert touched == changed
    # New bytes of the same size, the old modification time put back: still a change.
    before = p.stat()
    _rgb(p, colour=(3, 2, 1), size=(17, 17))
    assert p.stat().st_size == before.st_size
    os.utime(p, ns=(before.st_atime_ns, before.st_mtime_ns))
    rewritten = scan_dataset(root, warn=Warnings()).fingerprint
    assert rewritten != touched
    _rgb(root / "val" / "b" / "new.png")  # a file added
    assert scan_dataset(root, warn=Warnings()).fingerprint != rewritten


@pytest.mark.parametrize("splits", [(), ("train", "val", "test")])
def test_copy_elsewhere_with_new_mtimes_is_the_same_dataset(tmp_path: Path, splits: tuple[str, ...]) -> None:
    import shutil

    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=5, size=16, splits=splits)
    copy = Path(shutil.copytree(root, tmp_path / "elsewhere" / "copy"))
    for i, f in enumerate(sorted(copy.rglob("*.png"))):
        os.utime(f, ns=(10**18 + i, 10**18 + i))  # another machine, other times
    original = scan_dataset(root, val_fraction=0.3, seed=3, warn=Warnings())
    copied = scan_dataset(copy, val_fraction=0.3, seed=3, warn=Warnings())
    assert copied.root != original.root
    assert copied.fingerprint == original.fingerprint
    assert copied.content_fingerprint == original.content_fingerprint
    rel = lambda index: [os.path.relpath(p, index.root) for p, _ in index.val]  # noqa: E731
    assert rel(copied) == rel(original)


def test_rescan_hashes_only_changed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=3, size=16)
    cache = tmp_path / "cache"
    hashed: list[str] = []
    real = _hashes._sha256_file
    monkeypatch.setattr(_hashes, "_sha256_file", lambda p: hashed.append(p) or real(p))
    first = scan_dataset(root, warn=Warnings(), cache_dir=cache)
    assert len(hashed) == 12 and list((cache / "hashes").iterdir())
    hashed.clear()
    assert scan_dataset(root, warn=Warnings(), cache_dir=cache) == first
    assert hashed == []
    p = root / "val" / "b" / "b_0.png"
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert scan_dataset(root, warn=Warnings(), cache_dir=cache).fingerprint == first.fingerprint
    assert hashed == [str(p)]
    # An unreadable cache file is ignored, not an error.
    for f in (cache / "hashes").iterdir():
        f.write_text("{not json")
    hashed.clear()
    assert scan_dataset(root, warn=Warnings(), cache_dir=cache).fingerprint == first.fingerprint
    assert len(hashed) == 12


def test_summary_and_format(tiny_dataset: Path) -> None:
    index = scan_dataset(tiny_dataset, warn=Warnings())
    s = index.summary()
    assert s["classes"] == ["circle", "square", "triangle"]
    assert s["counts"]["square"] == {"train": 6, "val": 6}
    assert s["totals"] == {"train": 18, "val": 18}
    assert s["split"] == "folders: train/val" and s["fingerprint"] == index.fingerprint
    assert s["skipped"] == [] and s["root"] == index.root
    import json

    json.dumps(s)
    text = format_summary(index)
    assert "circle" in text and "total" in text and "18" in text and index.fingerprint in text


# --- image cache ------------------------------------------------------------------------------


def test_cache_build_reuse_and_equal_to_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = scan_dataset(make_image_folder(tmp_path / "d", per_class=3), warn=Warnings())
    cache_dir = tmp_path / "cache"
    train, val = dataset_splits(
        index,
        image_size=28,
        train_transform=None,
        eval_transform=lambda x: x.float() / 255,
        cache_dir=cache_dir,
    )
    assert train.size == val.size == stored_size(28) == 32
    assert train.cached and val.cached
    x, y = train[4]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and y == index.train[4][1]
    assert val[0][0].dtype == torch.float32
    path = train.cache_path
    assert path is not None and path.exists() and path.parent == cache_dir / "images"
    assert path.name.startswith(f"{index.fingerprint}-train-32")
    assert path.stat().st_size == len(index.train) * 32 * 32 * 3
    assert not list(path.parent.glob("*.tmp"))

    # A second dataset (another trial) maps the same file without decoding anything.
    def no_decode(*a, **k):
        raise AssertionError("decoded instead of reusing the cache")

    monkeypatch.setattr(_cache, "decode_resized", no_decode)
    again = ImageDataset(index.train, size=32, cache_dir=cache_dir, cache_key=f"{index.fingerprint}-train")
    assert again.cache_path == path
    cached = torch.stack([again[i][0] for i in range(len(again))])
    monkeypatch.undo()
    streamed = ImageDataset(index.train, size=32, cache=False)
    assert not streamed.cached
    decoded = torch.stack([streamed[i][0] for i in range(len(streamed))])
    assert torch.equal(cached, decoded)
    # Pickling (DataLoader workers, Ray) never carries the mapped array.
    clone = pickle.loads(pickle.dumps(again))
    assert clone._array is None and torch.equal(clone[1][0], cached[1])


def test_concurrent_builders_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = scan_dataset(make_image_folder(tmp_path / "d", per_class=4, size=24), warn=Warnings())
    calls = []
    real = _cache.decode_resized

    def counting(path, size):
        calls.append(path)
        return real(path, size)

    monkeypatch.setattr(_cache, "decode_resized", counting)
    sets = [ImageDataset(index.train, size=16, cache_dir=tmp_path / "c", cache_key="k") for _ in range(3)]
    threads = [threading.Thread(target=s.prepare) for s in sets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == len(index.train)
    assert all(s._array is not None for s in sets)


def test_over_budget_streams(tmp_path: Path) -> None:
    index = scan_dataset(make_image_folder(tmp_path / "d", per_class=2, size=16), warn=Warnings())
    w = Warnings()
    ds = ImageDataset(index.train, size=16, cache_dir=tmp_path / "c", max_cache_bytes=100, warn=w)
    assert not ds.cached and w.naming("exceeds the budget")
    assert ds[0][0].shape == (3, 16, 16)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("cache", [True, False])
def test_file_broken_after_scan_is_counted(tmp_path: Path, cache: bool) -> None:
    index = scan_dataset(make_image_folder(tmp_path / "d", per_class=2, size=16), warn=Warnings())
    broken = index.train[1][0]
    Path(broken).write_bytes(b"gone bad")
    w = Warnings()
    ds = ImageDataset(index.train, size=16, cache=cache, cache_dir=tmp_path / "c", warn=w)
    images = [ds[i][0] for i in range(len(ds))] + [ds[1][0]]
    assert list(ds.bad_files) == [broken] and ds.bad_files[broken] == "not an image file"
    assert len(w.naming(broken)) == 1
    assert int(images[1].sum()) == 0 and int(images[0].sum()) > 0
    if cache:  # a later process mapping the same cache learns about it too
        other = ImageDataset(index.train, size=16, cache_dir=tmp_path / "c", warn=Warnings())
        other.prepare()
        assert list(other.bad_files) == [broken]


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TLSEARCH_CACHE", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("TLSEARCH_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "tlsearch"


def _dataset_of(index: DatasetIndex, cache_dir: Path, key: str, **kw) -> ImageDataset:
    ds = ImageDataset(index.train, size=16, cache_dir=cache_dir, cache_key=key, **kw)
    ds.prepare()
    return ds


def _age(path: Path, seconds: float) -> None:
    t = path.stat().st_mtime - seconds
    os.utime(path, (t, t))


def test_image_cache_keeps_to_its_budget_least_recently_used_first(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    index = scan_dataset(make_image_folder(tmp_path / "d", per_class=2, size=16), warn=Warnings())
    nbytes = len(index.train) * 16 * 16 * 3
    monkeypatch.setenv("TLSEARCH_IMAGE_CACHE_BYTES", str(int(2.5 * nbytes)))
    one, two = (_dataset_of(index, tmp_path / "c", k).cache_path for k in ("one", "two"))
    _age(one, 300)
    _age(two, 600)
    # Using "two" again makes "one" the least recently used.
    assert _dataset_of(index, tmp_path / "c", "two").cache_path == two
    assert two.stat().st_mtime > one.stat().st_mtime
    three = _dataset_of(index, tmp_path / "c", "three").cache_path
    assert not one.exists() and two.exists() and three.exists()
    assert sum(p.stat().st_size for p in (tmp_path / "c" / "images").glob("*.u8")) <= 2.5 * nbytes


def test_array_larger_than_the_cache_budget_streams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = scan_dataset(make_image_folder(tmp_path / "d", per_class=2, size=16), warn=Warnings())
    monkeypatch.setenv("TLSEARCH_IMAGE_CACHE_BYTES", "1000")
    w = Warnings()
    ds = ImageDataset(index.train, size=16, cache_dir=tmp_path / "c", warn=w)
    assert not ds.cached and w.naming("exceeds the budget")
    monkeypatch.setenv("TLSEARCH_IMAGE_CACHE_BYTES", "lots")
    with pytest.raises(TLSearchError, match="TLSEARCH_IMAGE_CACHE_BYTES must be a number of bytes, got 'lots'"):
        ImageDataset(index.train, size=16, cache_dir=tmp_path / "c")


def test_cache_file_removed_before_it_is_opened_is_built_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = scan_dataset(make_image_folder(tmp_path / "d", per_class=2, size=16), warn=Warnings())
    first = _dataset_of(index, tmp_path / "c", "k")
    expected = torch.stack([first[i][0] for i in range(len(first))])
    real, raced = _cache._complete, []

    def trimmed_right_after_the_check(path: Path, nbytes: int) -> bool:
        ok = real(path, nbytes)
        if ok and not raced:  # another trial's trim removes it between the check and the open
            raced.append(path)
            path.unlink()
        return ok

    monkeypatch.setattr(_cache, "_complete", trimmed_right_after_the_check)
    w = Warnings()
    again = _dataset_of(index, tmp_path / "c", "k", warn=w)
    assert raced and again.cached and not w, w
    assert torch.equal(torch.stack([again[i][0] for i in range(len(again))]), expected)
    # Removed while mapped: the trial reading it goes on reading it.
    again.cache_path.unlink()
    assert torch.equal(torch.stack([again[i][0] for i in range(len(again))]), expected)


def test_cache_built_chunk_by_chunk_equals_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = scan_dataset(make_image_folder(tmp_path / "d", per_class=5, size=20), warn=Warnings())
    broken = index.train[4][0]
    Path(broken).write_bytes(b"gone bad")
    monkeypatch.setattr(_cache, "BUILD_CHUNK_BYTES", 2 * 16 * 16 * 3 + 1)  # chunks of 2 images, 1 left over
    cached = _dataset_of(index, tmp_path / "c", "k", warn=Warnings())
    streamed = ImageDataset(index.train, size=16, cache=False, warn=Warnings())
    assert len(cached) % 2 == 1 and list(cached.bad_files) == [broken]
    assert torch.equal(torch.stack([cached[i][0] for i in range(len(cached))]),
                       torch.stack([streamed[i][0] for i in range(len(streamed))]))
    cached.release_pages()  # pages given back are read again from the page cache
    assert torch.equal(cached[3][0], streamed[3][0])


# --- real data ----------------------------------------------------------------------------------


@pytest.mark.shared
def test_hymenoptera(shared_dir: Path) -> None:
    w = Warnings()
    index = scan_dataset(shared_dir / "data" / "hymenoptera", warn=w)
    assert isinstance(index, DatasetIndex)
    assert index.classes == ("ants", "bees") and index.split == "folders: train/val"
    # train/ants/imageNotFound.gif decodes (a well-formed GIF) but is a host's "image could not
    # be found" placeholder, not an ant: skipped by its known signature, named in a warning.
    assert [Path(p).name for p, _ in index.skipped] == ["imageNotFound.gif"]
    assert "placeholder" in index.skipped[0][1]
    assert len(w) == 1 and "imageNotFound.gif" in w[0]
    assert index.counts() == {"ants": {"train": 123, "val": 70}, "bees": {"train": 121, "val": 83}}
    assert len(index.train) == 244 and len(index.val) == 153
    assert not any(p.endswith("imageNotFound.gif") for p, _ in index.train)
