"""Bad datasets end to end: `tlsearch check` and `tlsearch train` on planted faults.

Every bad file must either stop the command with exit 2 and one line naming the problem, or be
skipped with a warning naming the file while the work goes on; never a traceback, never a hang.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reliability._util import cli, clear_error, expect_bad_inputs, record_bad_input, stderr_lines
from tests.conftest import make_image_folder

SKIPPED = {  # file name -> a word its reason must hold
    "truncated.jpg": "truncated",
    "zero.jpg": "empty",
    "text.jpg": "not an image",
    "bomb.png": "decompression bomb",
    "dangling.jpg": "dangling",
    "loop": "loop",
}
ACCEPTED = ["png_named.jpg", "cmyk.jpg", "grey.png", "palette_t.png", "rgba.png", "sixteen.png",
            "UPPER.JPG", "Mixed.Png", "exif6.jpg"]
HIDDEN = [".ipynb_checkpoints/x.png", ".git/x.png", "__MACOSX/._y.jpg", ".DS_Store", "._x.jpg", ".hidden.png"]


def _noise_jpeg(path: Path, size=(64, 48)) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, "JPEG", quality=95)
    return path


def _png_bomb(path: Path, side: int) -> Path:
    """A valid 1-bit PNG of side x side pixels, a few KB on disk."""
    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def exif_rotated(path: Path) -> Path:
    """A JPEG stored sideways with EXIF orientation 6: upright it is red on top, blue below."""
    upright = np.zeros((60, 40, 3), np.uint8)
    upright[:30] = (220, 20, 20)
    upright[30:] = (20, 20, 220)
    stored = np.rot90(upright, k=1)  # orientation 6 = rotate 270 (clockwise 90) to show upright
    im = Image.fromarray(np.ascontiguousarray(stored))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


def plant(root: Path) -> Path:
    """Adds every planted fault to root/train/a (and hidden junk everywhere)."""
    a = root / "train" / "a"
    noisy = _noise_jpeg(a / "noisy.jpg")
    (a / "truncated.jpg").write_bytes(noisy.read_bytes()[: noisy.stat().st_size // 2])
    noisy.unlink()
    (a / "zero.jpg").write_bytes(b"")
    (a / "text.jpg").write_text("this is not a picture\n")
    _png_bomb(a / "bomb.png", 40000)  # 1.6 gigapixels: 4.8 GB as RGB
    os.symlink(a / "gone.jpg", a / "dangling.jpg")
    os.symlink("loop", a / "loop")  # a link to itself: ELOOP
    colour = Image.new("RGB", (24, 24), (200, 40, 40))
    colour.save(a / "png_named.jpg", "PNG")
    colour.convert("CMYK").save(a / "cmyk.jpg", "JPEG")
    colour.convert("L").save(a / "grey.png")
    pal = colour.convert("P")
    pal.info["transparency"] = 0
    pal.save(a / "palette_t.png", transparency=0)
    Image.new("RGBA", (24, 24), (10, 200, 10, 128)).save(a / "rgba.png")
    Image.fromarray(np.full((24, 24), 30000, np.uint16)).save(a / "sixteen.png")
    colour.save(a / "UPPER.JPG", "JPEG")
    colour.save(a / "Mixed.Png", "PNG")
    exif_rotated(a / "exif6.jpg")
    for rel in HIDDEN:
        p = a / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix == ".png":
            colour.save(p, "PNG")
        else:
            p.write_bytes(b"\x00\x05\x16\x07 resource fork junk")
    for d in (".ipynb_checkpoints", ".git", "__MACOSX"):  # hidden folders beside the classes too
        (root / "train" / d).mkdir(exist_ok=True)
        colour.save(root / "train" / d / "z.png", "PNG")
    return root


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("planted")
    plant(make_image_folder(work / "data", classes=("a", "b"), per_class=4, size=24))
    return work


def test_check_skips_bad_files_by_name_and_accepts_odd_good_ones(planted: Path) -> None:
    code = ("import resource, sys; from search.cli import main; rc = main(sys.argv[1:]); "
            "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)")
    import subprocess
    import sys

    from reliability._util import env, expect_bad_inputs
    from search.data import scan_dataset

    hidden = [h.split("/")[-1] for h in HIDDEN]
    expect_bad_inputs(*(f"data: {name}" for name in [*SKIPPED, *ACCEPTED, *hidden]))
    proc = subprocess.run([sys.executable, "-c", code, "check", "data", "--json"], cwd=planted, env=env(planted),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout)
    reasons = {Path(s["path"]).name: s["reason"] for s in summary["skipped"]}
    warnings = [line for line in stderr_lines(proc.stderr) if line.startswith("warning:")]
    for name, word in SKIPPED.items():
        named = any(name in w for w in warnings)
        record_bad_input(f"data: {name}", name in reasons and word in reasons[name] and named, (reasons, warnings))
    assert set(reasons) == set(SKIPPED), reasons  # hidden files are not even mentioned
    assert summary["classes"] == ["a", "b"]  # hidden folders are not classes
    assert summary["counts"]["a"]["train"] == 4 + len(ACCEPTED), summary["counts"]
    used = {Path(p).name for p, _ in scan_dataset(planted / "data", warn=lambda m: None).train}
    for name in ACCEPTED:  # odd but good images are trained on
        record_bad_input(f"data: {name}", name in used and name not in reasons, sorted(used))
    for name in hidden:  # hidden files are neither used nor mentioned
        record_bad_input(f"data: {name}", name not in used and name not in reasons
                         and not any(name in w for w in warnings), warnings)
    # Bounded memory: the bomb was refused from its header (decoding it would take 4.8 GB).
    rss = int(proc.stderr.split("MAXRSS_KB")[1].split()[0])
    assert rss < 1_500_000, f"peak RSS {rss / 1e6:.2f} GB"


def test_converted_modes_are_rgb_and_16_bit_not_white(planted: Path) -> None:
    from search.data import load_image

    a = planted / "data" / "train" / "a"
    for name in ACCEPTED:
        assert load_image(a / name).mode == "RGB", name
    grey16 = np.asarray(load_image(a / "sixteen.png"))
    assert abs(int(grey16.mean()) - 30000 // 257) <= 1  # 117, not 255
    assert np.asarray(load_image(a / "rgba.png")).min() > 0  # composited on white, not black


def test_train_goes_on_past_bad_files(planted: Path, tiny_config) -> None:
    cfg = tiny_config(planted / "tiny.yaml")
    proc = cli(["train", str(cfg), "data", "--json"], cwd=planted)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["epochs"] == 1 and 0.0 <= summary["val_acc"] <= 1.0
    for name in SKIPPED:
        assert any(name in w for w in stderr_lines(proc.stderr) if w.startswith("warning:")), name


def _fatal(root: Path, case: str) -> tuple[Path, list[str]]:
    if case == "no such folder":
        return root / "nope", ["no such folder"]
    if case == "no class folders":
        root.mkdir()
        Image.new("RGB", (16, 16)).save(root / "loose.png")
        return root, ["no class folders"]
    if case == "single class":
        return make_image_folder(root, classes=("cat",), per_class=2, size=16), ["only one class", "cat"]
    if case == "empty class folder":
        make_image_folder(root, classes=("a", "b"), per_class=3, size=16, splits=())
        (root / "c").mkdir()
        return root, ["class 'c'", "no usable image"]
    if case == "empty class folder in val":
        make_image_folder(root, classes=("a", "b"), per_class=2, size=16)
        for f in (root / "val" / "b").iterdir():
            f.unlink()
        return root, ["class 'b'", "val"]
    if case == "class too small to split":
        make_image_folder(root, classes=("a", "b"), per_class=3, size=16, splits=())
        for f in sorted((root / "b").iterdir())[1:]:
            f.unlink()
        return root, ["class 'b'", "only 1 usable image"]
    if case == "class emptied by bad files":
        make_image_folder(root, classes=("a", "b"), per_class=2, size=16)
        for f in (root / "train" / "a").iterdir():
            f.write_bytes(b"")
        return root, ["class 'a'", "train"]
    raise AssertionError(case)


FATAL = ["no such folder", "no class folders", "single class", "empty class folder", "empty class folder in val",
         "class too small to split", "class emptied by bad files"]


@pytest.mark.parametrize("case", FATAL)
def test_unusable_dataset_is_one_line_exit_2(tmp_path: Path, case: str) -> None:
    root, words = _fatal(tmp_path / "d", case)
    proc = cli(["check", str(root)], cwd=tmp_path)
    clear_error(proc, *words, name=f"dataset: {case}")


def test_unusable_dataset_stops_train_and_run_before_work(tmp_path: Path, tiny_config) -> None:
    root, words = _fatal(tmp_path / "d", "single class")
    cfg = tiny_config(tmp_path / "tiny.yaml")
    clear_error(cli(["train", str(cfg), str(root)], cwd=tmp_path), *words, name="dataset: single class (train)")
    clear_error(cli(["run", str(root), "--study", "s", "--no-pretrained", "--no-progress"], cwd=tmp_path), *words,
                name="dataset: single class (run)")


def test_file_broken_after_the_scan_is_skipped_in_training_and_counted(tmp_path: Path, capfd) -> None:
    from search.config import TrialConfig
    from search.data import scan_dataset
    from search.trial import fine_tune

    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=4, size=24)
    index = scan_dataset(root, warn=lambda m: None)
    victim = root / "train" / "a" / "a_0.png"
    victim.write_bytes(b"")  # goes bad after the scan
    cfg = TrialConfig(backbone="resnet18", pretrained=False, augmentation="none", image_size=32, epochs=2,
                      batch_size=4)
    expect_bad_inputs(*(f"data: broken after scan (cache={cache})" for cache in (False, True)))
    for cache in (False, True):
        result = fine_tune(cfg, index, cache=cache, cache_dir=str(tmp_path / f"c{cache}"))
        assert len(result.history) == 2
        err = capfd.readouterr().err
        named = [line for line in err.splitlines() if str(victim) in line]
        # Named once, though read every epoch.
        record_bad_input(f"data: broken after scan (cache={cache})", len(named) == 1, err[-2000:])


def test_exif_orientation_same_in_train_eval_and_predict(tmp_path: Path, trained_model: Path, monkeypatch) -> None:
    from search import data
    from search.data import ImageDataset, stored_size
    from search.export import predict

    expect_bad_inputs("data: EXIF-rotated JPEG")
    p = exif_rotated(tmp_path / "exif6.jpg")

    def upright(hwc: np.ndarray) -> bool:
        h = hwc.shape[0]
        top, bottom = hwc[: h // 4].mean((0, 1)), hwc[-h // 4:].mean((0, 1))
        return top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]

    size = stored_size(32)
    for cache in (True, False):  # train and eval share ImageDataset: cached array, or decoded on access
        ds = ImageDataset([(str(p), 0)], size=size, cache=cache, cache_dir=tmp_path / "c")
        x, _ = ds[0]
        record_bad_input("data: EXIF-rotated JPEG", upright(x.permute(1, 2, 0).numpy()), f"cache={cache}")
    seen: list[np.ndarray] = []
    real = data.decode_resized

    def spy(path, size):  # noqa: ANN001
        out = real(path, size)
        seen.append(out)
        return out

    monkeypatch.setattr(data, "decode_resized", spy)
    [row] = predict(trained_model, [p])
    record_bad_input("data: EXIF-rotated JPEG", "top" in row and len(seen) == 1 and upright(seen[0]), row)
