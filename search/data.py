"""Datasets: scan an ImageFolder once, validate and split it, decode images, cache them.

`scan_dataset` walks DATA a single time and returns a `DatasetIndex`: the classes, the train and
val samples, how they were split, the files it skipped (and why) and a fingerprint that changes
whenever a file or the split changes. `ImageDataset` serves the samples as uint8 CHW tensors of
side `stored_size(image_size)`, from a memory-mapped array of decoded images that every trial on
the machine shares (built once per dataset fingerprint and size), or decoded on access when the
array would not fit the cache budget.

Image decoding rules (`load_image`), so that every image becomes the same kind of RGB picture:
EXIF orientation is applied; grey, 1-bit, CMYK and palette images are converted to RGB; anything
with transparency (RGBA, LA, palette or grey with a transparent colour) is composited on white,
because transparent pixels often hide arbitrary colours and white is what a viewer shows;
16-bit images are scaled to 8 bit (divided by 257). An image that cannot be fully decoded, or
whose header claims more than `MAX_IMAGE_PIXELS` pixels, raises `BadImageError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap as mmap_module
import os
import random
import shutil
import stat
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from search.config import TLSearchError

# File name endings accepted as images (compared in lower case).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
# Validation folder names, in order of preference, when DATA holds train/ beside one of them.
VAL_SPLIT_NAMES = ("val", "valid", "test")
# Folder names that are never classes nor walked into (besides anything starting with '.').
IGNORED_NAMES = frozenset({"__MACOSX", "__pycache__", "Thumbs.db", "desktop.ini"})
# Decompression-bomb guard: images whose header claims more pixels are skipped before decoding,
# so memory stays bounded (64 MP RGB is ~190 MB while decoding).
MAX_IMAGE_PIXELS = 64_000_000
# Short side of the crop is image_size / CROP_RATIO before the final image_size crop (as ImageNet).
CROP_RATIO = 0.875
# Bump when decoding or resizing changes, so old cache files are not reused.
CACHE_FORMAT = 1
# Default budget of one cached image array; larger datasets are decoded on access.
DEFAULT_MAX_CACHE_BYTES = 8 * 1024**3
# Default budget of the whole images/ cache folder ($TLSEARCH_IMAGE_CACHE_BYTES overrides it): the
# least recently used arrays are removed to make room for a new one.
DEFAULT_IMAGE_BUDGET_BYTES = 16 * 1024**3
# Images are decoded and written this many bytes at a time, so building the cache holds one chunk
# in memory whatever the dataset's size.
BUILD_CHUNK_BYTES = 64 * 1024**2

WarnFn = Callable[[str], None]
Sample = tuple[str, int]


class DatasetError(TLSearchError):
    """A dataset folder that cannot be used as it is (missing, no classes, a class too small)."""


class BadImageError(TLSearchError):
    """One image file that cannot be fully decoded; the message is the reason."""


def _default_warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(16, n))


# ---------------------------------------------------------------------------------------------
# Decoding


def load_image(path: str | os.PathLike[str], *, draft: int | None = None) -> Image.Image:
    """Fully decodes one image file into an RGB picture (see the module docstring for the rules).

    Args:
        path: the image file; its content decides the format, not its name (a PNG named .jpg is
            fine).
        draft: for JPEGs, let the decoder shrink the picture by up to 8x while both sides stay
            >= draft pixels (much faster for big photos; all the data is still read and checked).
            None decodes at full size.

    Returns:
        A loaded PIL image in mode RGB.
    """
    # A truncated file must fail here, not come back half grey: Pillow only guarantees that
    # while LOAD_TRUNCATED_IMAGES is False, which is its default and which this module never sets.
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise BadImageError(
                    f"decompression bomb guard: {w}x{h} = {w * h} pixels is more than "
                    f"{MAX_IMAGE_PIXELS}"
                )
            if draft is not None and im.format == "JPEG":
                im.draft("RGB", (draft, draft))
            im.load()
            rgb = _to_rgb(im)
            rgb = _apply_orientation(im, rgb)
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(f"decompression bomb guard: {e}") from None
    except FileNotFoundError:
        raise BadImageError("file not found") from None
    except Image.UnidentifiedImageError:
        size = _file_size(path)
        raise BadImageError("empty file" if size == 0 else "not an image file") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, TypeError) as e:
        # OSError covers "image file is truncated" and decoder errors; the others are what
        # plugins raise on malformed headers.
        raise BadImageError(f"cannot decode: {e}".rstrip(": ")) from None
    return rgb


def _file_size(path: str | os.PathLike[str]) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def _to_rgb(im: Image.Image) -> Image.Image:
    """Converts a loaded image of any mode to RGB (16 bit scaled, alpha composited on white)."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grey: 0..65535 -> 0..255; a plain convert("L") would clip and turn it white.
        a = np.asarray(im).astype(np.uint32)
        return Image.fromarray(np.clip((a + 128) // 257, 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float32))
        return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8)).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


# EXIF orientation tag value -> the transpose that shows the picture upright (as ImageOps does).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _apply_orientation(original: Image.Image, rgb: Image.Image) -> Image.Image:
    """Rotates/flips as the EXIF orientation tag says; a broken EXIF block is ignored."""
    try:
        orientation = original.getexif().get(0x0112, 1)
    except Exception:  # malformed EXIF must not reject an otherwise good picture
        return rgb
    method = _ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    return rgb.transpose(method) if method is not None else rgb


def stored_size(image_size: int) -> int:
    """The side images are cached at: image_size / 0.875, so a crop of image_size is left.

    Args:
        image_size: the side of the square fed to the backbone.

    Returns:
        round(image_size / 0.875), e.g. 256 for 224.
    """
    return int(round(image_size / CROP_RATIO))


def decode_resized(path: str | os.PathLike[str], size: int) -> np.ndarray:
    """Decodes an image, resizes its short side to `size` (bicubic) and center-crops a square.

    Args:
        path: the image file.
        size: side of the square output.

    Returns:
        A uint8 array of shape (size, size, 3).
    """
    im = load_image(path, draft=size)
    w, h = im.size
    short = min(w, h)
    # Crop the centred square in source coordinates and resize only it: the same picture as
    # resize-then-crop, without resizing pixels that are thrown away.
    left, top = (w - short) / 2, (h - short) / 2
    box = (left, top, left + short, top + short)
    if (w, h) != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    return np.asarray(im, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Scanning


@dataclass(frozen=True)
class DatasetIndex:
    """What `scan_dataset` found: classes, the two splits, skipped files, a fingerprint."""

    root: str  # the dataset folder, absolute
    classes: tuple[str, ...]  # class names, sorted; a sample's label indexes this
    train: tuple[Sample, ...]  # (absolute path, label), sorted by path
    val: tuple[Sample, ...]  # (absolute path, label), sorted by path
    split: str  # how train/val were made, e.g. "folders: train/val", "random: fraction=0.2 seed=0"
    skipped: tuple[tuple[str, str], ...] = ()  # (path, reason) of files left out
    fingerprint: str = ""  # sha256[:16] over files, sizes, mtimes and the split

    def counts(self) -> dict[str, dict[str, int]]:
        """Returns {class: {"train": n, "val": n}}."""
        out = {c: {"train": 0, "val": 0} for c in self.classes}
        for split, samples in (("train", self.train), ("val", self.val)):
            for _, label in samples:
                out[self.classes[label]][split] += 1
        return out

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description (what `tlsearch check --json` prints).

        Returns:
            A dict with root, split, fingerprint, classes, counts per class and split, totals
            and the skipped files with their reasons.
        """
        return {
            "root": self.root,
            "split": self.split,
            "fingerprint": self.fingerprint,
            "classes": list(self.classes),
            "counts": self.counts(),
            "totals": {"train": len(self.train), "val": len(self.val)},
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }


def format_summary(index: DatasetIndex) -> str:
    """Human-readable report of a scan: a classes x splits table, then the skipped files.

    Args:
        index: the scan result.

    Returns:
        Multi-line text without a trailing newline.
    """
    counts = index.counts()
    width = max([len("class"), len("total"), *(len(c) for c in index.classes)])
    lines = [
        f"dataset: {index.root}",
        f"split: {index.split}",
        f"fingerprint: {index.fingerprint}",
        f"{len(index.classes)} classes, {len(index.train)} train / {len(index.val)} val images",
        "",
        f"{'class':<{width}}  {'train':>7}  {'val':>7}",
    ]
    for c in index.classes:
        lines.append(f"{c:<{width}}  {counts[c]['train']:>7}  {counts[c]['val']:>7}")
    lines.append(f"{'total':<{width}}  {len(index.train):>7}  {len(index.val):>7}")
    if index.skipped:
        lines += ["", f"skipped {len(index.skipped)} file(s):"]
        for p, reason in index.skipped:
            lines.append(f"  {_relative(p, index.root)}: {reason}")
    return "\n".join(lines)


def _relative(path: str, root: str) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return path


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES


@dataclass
class _Walk:
    """Mutable state of one scan: files found and problems met."""

    warn: WarnFn
    skipped: list[tuple[str, str]] = field(default_factory=list)
    stats: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (size, mtime_ns)

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append((path, reason))
        self.warn(f"skipping {path}: {reason}")


def _subdirs(folder: str, walk: _Walk) -> list[str]:
    """Visible sub-folders of `folder` (symlinks to folders included), sorted by name."""
    out = []
    with os.scandir(folder) as it:
        for e in it:
            if _hidden(e.name):
                continue
            try:
                if e.is_dir():  # follows symlinks
                    out.append(e.name)
                elif e.is_symlink() and not os.path.exists(e.path):
                    walk.skip(e.path, "dangling symlink")
            except OSError as err:  # e.g. a symlink loop: ELOOP
                walk.skip(e.path, f"cannot read: {err.strerror or err}")
    return sorted(out)


def _image_files(folder: str, walk: _Walk) -> list[str]:
    """Image files under `folder`, recursively, following symlinks but never in circles."""
    found: list[str] = []
    seen: set[str] = set()

    def visit(d: str) -> None:
        real = os.path.realpath(d)
        if real in seen:
            walk.skip(d, "symlink loop (folder already visited)")
            return
        seen.add(real)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as err:
            walk.skip(d, f"cannot list folder: {err.strerror or err}")
            return
        for e in entries:
            if _hidden(e.name):
                continue
            try:
                st = os.stat(e.path)  # follows symlinks
            except OSError as err:
                if e.is_symlink():
                    reason = "symlink loop" if _is_loop(err) else "dangling symlink"
                    walk.skip(e.path, reason)
                else:
                    walk.skip(e.path, f"cannot read: {err.strerror or err}")
                continue
            if stat.S_ISDIR(st.st_mode):
                visit(e.path)
            elif stat.S_ISREG(st.st_mode) and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                path = os.path.abspath(e.path)
                walk.stats[path] = (st.st_size, st.st_mtime_ns)
                found.append(path)

    visit(folder)
    return found


def _is_loop(err: OSError) -> bool:
    import errno

    return err.errno == errno.ELOOP


def scan_dataset(
    root: str | os.PathLike[str],
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    verify: bool = True,
    warn: WarnFn | None = None,
) -> DatasetIndex:
    """Scans an ImageFolder once: finds classes and images, checks them, splits train/val.

    Layouts: DATA/train/<class>/... beside DATA/val (or valid, or test); DATA/train alone (val is
    split off it at random); or DATA/<class>/... (split at random). A random split is stratified
    (every class keeps >= 1 image on each side), deterministic for a seed, and recorded in
    `DatasetIndex.split`. Hidden files and folders are ignored; image names are matched by
    extension in any case; broken links and symlink loops are skipped with a warning.

    Args:
        root: the dataset folder.
        val_fraction: share of each class that goes to val in a random split.
        seed: seed of the random split.
        verify: fully decode every image and skip those that fail (with a warning).
        warn: called with one line per skipped file; default prints "warning: ..." to stderr.

    Returns:
        The index of the dataset.
    """
    warn = _default_warn if warn is None else warn
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")
    root_abs = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.isdir(root_abs):
        what = "not a folder" if os.path.exists(root_abs) else "no such folder"
        raise DatasetError(f"dataset {what}: {root_abs}")
    walk = _Walk(warn=warn)
    top = _subdirs(root_abs, walk)
    val_name = next((n for n in VAL_SPLIT_NAMES if n in top), None)

    if "train" in top:
        others = [n for n in top if n not in ("train", val_name)]
        if others:
            warn(f"ignoring folder(s) beside train/: {', '.join(others)}")
        train_dir = os.path.join(root_abs, "train")
        train_files = _class_files(train_dir, walk)
        if val_name is not None:
            val_files = _class_files(os.path.join(root_abs, val_name), walk)
            _check_same_classes(train_files, val_files, val_name)
            classes = _check_classes(sorted(train_files), train_dir)
            split = f"folders: train/{val_name}"
        else:
            classes = _check_classes(sorted(train_files), train_dir)
            val_files = None
            split = f"random from train/: fraction={val_fraction:g} seed={seed}"
    else:
        train_files = _class_files(root_abs, walk)
        if not train_files:
            loose = _image_files_flat(root_abs)
            hint = f" (found {loose} image(s) directly in it: put them in class folders)" if loose else ""
            raise DatasetError(
                f"no class folders in {root_abs}{hint}; expected DATA/<class>/<image> or "
                "DATA/train/<class>/ and DATA/val/<class>/"
            )
        classes = _check_classes(sorted(train_files), root_abs)
        val_files = None
        split = f"random: fraction={val_fraction:g} seed={seed}"

    if verify:
        all_files = [p for files in train_files.values() for p in files]
        if val_files is not None:
            all_files += [p for files in val_files.values() for p in files]
        bad = _verify(all_files)
        for p in all_files:  # report in path order, whatever order the threads finished in
            if p in bad:
                walk.skip(p, bad[p])
        train_files = {c: [p for p in fs if p not in bad] for c, fs in train_files.items()}
        if val_files is not None:
            val_files = {c: [p for p in fs if p not in bad] for c, fs in val_files.items()}

    if val_files is None:
        train_files, val_files = _random_split(train_files, val_fraction=val_fraction, seed=seed)
    else:
        for split_name, files in (("train", train_files), (val_name, val_files)):
            for c in classes:
                if not files[c]:
                    raise DatasetError(f"class {c!r} has no usable image in {split_name}/")

    label = {c: i for i, c in enumerate(classes)}
    train = tuple(sorted((p, label[c]) for c, fs in train_files.items() for p in fs))
    val = tuple(sorted((p, label[c]) for c, fs in val_files.items() for p in fs))
    fingerprint = _fingerprint(root_abs, train, val, split, walk.stats)
    return DatasetIndex(
        root=root_abs,
        classes=tuple(classes),
        train=train,
        val=val,
        split=split,
        skipped=tuple(walk.skipped),
        fingerprint=fingerprint,
    )


def _class_files(folder: str, walk: _Walk) -> dict[str, list[str]]:
    """{class folder name: image paths}, for the class folders directly under `folder`."""
    return {c: _image_files(os.path.join(folder, c), walk) for c in _subdirs(folder, walk)}


def _image_files_flat(folder: str) -> int:
    with os.scandir(folder) as it:
        return sum(
            1
            for e in it
            if not _hidden(e.name) and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
        )


def _check_classes(classes: list[str], where: str) -> list[str]:
    if not classes:
        raise DatasetError(f"no class folders in {where}; expected {where}/<class>/<image>")
    if len(classes) == 1:
        raise DatasetError(
            f"only one class ({classes[0]!r}) in {where}; classification needs at least 2 class folders"
        )
    return classes


def _check_same_classes(train: dict[str, list[str]], val: dict[str, list[str]], val_name: str) -> None:
    if set(train) == set(val):
        return
    only_train = sorted(set(train) - set(val))
    only_val = sorted(set(val) - set(train))
    parts = []
    if only_train:
        parts.append(f"only in train/: {', '.join(only_train)}")
    if only_val:
        parts.append(f"only in {val_name}/: {', '.join(only_val)}")
    raise DatasetError(f"train/ and {val_name}/ have different classes: {'; '.join(parts)}")


# Placeholders that image hosts serve in place of a deleted photo. Scraped datasets are full of
# them; they decode fine but are not pictures of the class. Matched byte for byte (sha256), so a
# real photo is never caught: size -> {sha256: what it is}.
KNOWN_PLACEHOLDERS: dict[int, dict[str, str]] = {
    5504: {
        "6b4966252973c581b521f804453c6a0649ea6a2ce7e3e5c7deeb7d80623de231":
            "a 'we're sorry, this image could not be found' placeholder, not a photo",
    },
}


def _placeholder(path: str) -> str | None:
    """What the file is when it is a known placeholder, else None (hashes only files of a known size)."""
    known = KNOWN_PLACEHOLDERS.get(_file_size(path))
    if not known:
        return None
    with open(path, "rb") as f:
        return known.get(hashlib.sha256(f.read()).hexdigest())


def _verify(paths: list[str]) -> dict[str, str]:
    """Decodes every file (JPEGs in draft mode); returns {path: reason} for those that fail."""

    def check(path: str) -> str | None:
        try:
            load_image(path, draft=1)  # draft 1: smallest JPEG scale, still reads every byte
        except BadImageError as e:
            return str(e)
        return _placeholder(path)

    if not paths:
        return {}
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        reasons = list(pool.map(check, paths))
    return {p: r for p, r in zip(paths, reasons) if r is not None}


def _random_split(
    files: dict[str, list[str]], *, val_fraction: float, seed: int
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Stratified split: per class, round(n * val_fraction) images (1..n-1) go to val."""
    train, val = {}, {}
    for c in sorted(files):
        paths = sorted(files[c])
        n = len(paths)
        if n == 0:
            raise DatasetError(f"class {c!r} has no usable image")
        if n < 2:
            raise DatasetError(
                f"class {c!r} has only 1 usable image; a random train/val split needs at least 2 per class"
            )
        n_val = min(max(1, round(n * val_fraction)), n - 1)
        # One generator per class, seeded by (seed, class): adding a class leaves others' splits alone.
        rng = random.Random(f"{seed}/{c}")
        chosen = set(rng.sample(range(n), n_val))
        val[c] = [p for i, p in enumerate(paths) if i in chosen]
        train[c] = [p for i, p in enumerate(paths) if i not in chosen]
    return train, val


def _fingerprint(
    root: str,
    train: tuple[Sample, ...],
    val: tuple[Sample, ...],
    split: str,
    stats: dict[str, tuple[int, int]],
) -> str:
    h = hashlib.sha256()
    h.update(f"split={split}\n".encode())
    for name, samples in (("train", train), ("val", val)):
        for path, label in samples:
            size, mtime = stats[path]
            h.update(f"{name}\t{label}\t{_relative(path, root)}\t{size}\t{mtime}\n".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Decoded-image cache


def default_cache_dir() -> Path:
    """Where decoded images are cached: $TLSEARCH_CACHE, else ~/.cache/tlsearch."""
    env = os.environ.get("TLSEARCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tlsearch"


def image_budget_bytes() -> int:
    """The images/ cache folder's budget: $TLSEARCH_IMAGE_CACHE_BYTES, else DEFAULT_IMAGE_BUDGET_BYTES."""
    env = os.environ.get("TLSEARCH_IMAGE_CACHE_BYTES", "").strip()
    try:
        return int(float(env)) if env else DEFAULT_IMAGE_BUDGET_BYTES
    except ValueError:
        raise TLSearchError(f"TLSEARCH_IMAGE_CACHE_BYTES must be a number of bytes, got {env!r}") from None


class ImageDataset(torch.utils.data.Dataset):
    """Samples as (transform(uint8 CHW tensor of side `size`), label), cached or decoded on access.

    With cache=True and an array that fits `max_cache_bytes` (and the free disk), the first use
    decodes every image once into `<cache_dir>/images/<cache_key>-<size>.v<N>.u8` (N x size x size
    x 3 uint8, decoded and written a chunk at a time under a temporary name and renamed, under a
    file lock so concurrent trial processes build it once), then memory-maps it read-only: every
    process on the machine shares the same pages. Otherwise each image is decoded on access
    (streaming). The images/ folder is kept under `image_budget_bytes()` by removing the least
    recently used arrays before a new one is built; an array removed while a trial maps it stays
    readable by that trial, and one removed before a trial opens it is built again.

    A file that cannot be decoded any more (changed or broken after the scan) does not crash
    training: a warning names it once, the sample comes back as a black image, and its path and
    reason are recorded in `bad_files` (per process: DataLoader workers keep their own).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        size: int,
        transform: Callable[[torch.Tensor], Any] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_key: str | None = None,
        cache: bool = True,
        max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
        warn: WarnFn | None = None,
    ) -> None:
        """Args:
        samples: (path, label) pairs.
        size: side of the stored square images (`stored_size(image_size)`).
        transform: applied to each uint8 CHW tensor; None returns the tensor.
        cache_dir: cache folder; None: `default_cache_dir()`.
        cache_key: names the cache file (e.g. dataset fingerprint + split); None: derived from
            the sample paths, sizes and modification times.
        cache: False decodes on every access.
        max_cache_bytes: the largest array cached; bigger ones stream.
        warn: called with one line per problem; default prints to stderr.
        """
        self.samples = [(os.fspath(p), int(y)) for p, y in samples]
        self.size = int(size)
        self.transform = transform
        self.warn = _default_warn if warn is None else warn
        self.bad_files: dict[str, str] = {}  # path -> reason, for images that failed at access
        self.nbytes = len(self.samples) * self.size * self.size * 3
        self.cache_path: Path | None = None  # the cache file, when this dataset uses one
        self._array: np.ndarray | None = None
        self._lock = threading.Lock()
        if cache and self.samples:
            budget = min(max_cache_bytes, image_budget_bytes())
            if self.nbytes > budget:
                self.warn(
                    f"image cache of {self.nbytes / 2**30:.1f} GiB exceeds the budget of "
                    f"{budget / 2**30:.1f} GiB; decoding images on access"
                )
            else:
                key = cache_key or _samples_key(self.samples)
                folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
                self.cache_path = folder / "images" / f"{key}-{self.size}.v{CACHE_FORMAT}.u8"

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def cached(self) -> bool:
        """True when samples come from the memory-mapped cache file (built on first use)."""
        return self.cache_path is not None

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path, label = self.samples[i]
        if self.cache_path is not None:
            array = self._array if self._array is not None else self.prepare()
        else:
            array = None
        if array is not None:
            hwc = array[i]
        else:
            hwc = self._decode(path)
        x = torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))
        return (self.transform(x) if self.transform is not None else x), label

    def prepare(self) -> np.ndarray | None:
        """Builds (if needed) and maps the cache file; returns the array, or None when streaming.

        Called by the first `__getitem__`; call it yourself to build before forking workers.
        """
        if self.cache_path is None:
            return None
        with self._lock:
            if self._array is None:
                try:
                    self._array = self._open_or_build(self.cache_path)
                except OSError as e:
                    self.warn(
                        f"cannot use the image cache {self.cache_path} ({e}); decoding images on access"
                    )
                    self.cache_path = None
        return self._array

    def _decode(self, path: str) -> np.ndarray:
        try:
            return decode_resized(path, self.size)
        except BadImageError as e:
            self._record_bad(path, str(e))
            return np.zeros((self.size, self.size, 3), np.uint8)

    def _record_bad(self, path: str, reason: str) -> None:
        if path not in self.bad_files:
            self.bad_files[path] = reason
            self.warn(f"cannot decode {path} ({reason}); using a black image")

    def release_pages(self) -> None:
        """Unmaps the cache pages this process has read so far (the page cache keeps them, so a
        later read is cheap): a pass over a large cache then holds only what it reads next."""
        mm = getattr(self._array, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap_module, "MADV_DONTNEED"):
            with contextlib.suppress(OSError, ValueError):
                mm.madvise(mmap_module.MADV_DONTNEED)

    def _open_or_build(self, final: Path) -> np.ndarray:
        shape = (len(self.samples), self.size, self.size, 3)
        bad_path = final.with_suffix(".bad.json")
        final.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if not _complete(final, self.nbytes):
                with _file_lock(final.with_name(final.name + ".lock")):
                    if not _complete(final, self.nbytes):  # another process may have built it meanwhile
                        self._build(final, bad_path, shape)
            try:
                # Mapped through an open file: once open, another process trimming the cache
                # cannot take the array away from this one.
                with open(final, "rb") as f:
                    array = np.memmap(f, dtype=np.uint8, mode="r", shape=shape)
            except (FileNotFoundError, ValueError):  # trimmed (or cut) between the check and the open
                continue
            from search.disk import touch

            touch(final)  # least recently used goes first when the folder is trimmed
            with contextlib.suppress(FileNotFoundError, ValueError):
                for path, reason in json.loads(bad_path.read_text()).items():
                    self._record_bad(path, reason)
            return array
        raise OSError(f"{final} kept disappearing while it was opened (the cache folder is being cleared)")

    def _build(self, final: Path, bad_path: Path, shape: tuple[int, int, int, int]) -> None:
        from search.disk import tmp_name, trim_lru

        budget = image_budget_bytes()
        # Room for the new array first: least recently used arrays go (never one in use right now).
        trim_lru(final.parent.glob("*.u8"), budget - self.nbytes, companions=(".bad.json",), keep=(final,))
        free = shutil.disk_usage(final.parent).free
        if free < self.nbytes + 256 * 2**20:
            raise OSError(f"only {free / 2**30:.1f} GiB free, the cache needs {self.nbytes / 2**30:.1f} GiB")
        tmp = tmp_name(final)
        bad: dict[str, str] = {}
        per_image = self.size * self.size * 3
        chunk = np.empty((max(1, min(shape[0], BUILD_CHUNK_BYTES // per_image)), *shape[1:]), np.uint8)

        def fill(i: int, start: int) -> None:
            path = self.samples[i][0]
            try:
                chunk[i - start] = decode_resized(path, self.size)
            except BadImageError as e:
                bad[path] = str(e)
                chunk[i - start] = 0  # a black image

        try:
            with open(tmp, "wb") as out, ThreadPoolExecutor(max_workers=_workers()) as pool:
                # One chunk decoded at a time and written in order: memory stays at one chunk
                # whatever the dataset's size (the written pages are the page cache's).
                for start in range(0, shape[0], len(chunk)):
                    n = min(len(chunk), shape[0] - start)
                    for _ in pool.map(fill, range(start, start + n), [start] * n):
                        pass
                    out.write(memoryview(chunk[:n]))
            # The bad-file list goes first so a reader that sees the array also sees it.
            _atomic_write(bad_path, json.dumps(dict(sorted(bad.items()))) if bad else None)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into DataLoader workers / Ray: never ship the mapped pages, re-map there.
        state = self.__dict__.copy()
        state["_array"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _complete(path: Path, nbytes: int) -> bool:
    try:
        return path.stat().st_size == nbytes
    except OSError:
        return False


def _atomic_write(path: Path, text: str | None) -> None:
    if text is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    from search.disk import tmp_name

    tmp = tmp_name(path)
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes on this machine (a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: builders could race, but each writes a private temp file
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _samples_key(samples: Sequence[Sample]) -> str:
    h = hashlib.sha256()
    for path, label in samples:
        try:
            st = os.stat(path)
            sig = f"{st.st_size}\t{st.st_mtime_ns}"
        except OSError:
            sig = "missing"
        h.update(f"{os.path.abspath(path)}\t{label}\t{sig}\n".encode())
    return h.hexdigest()[:16]


def dataset_splits(
    index: DatasetIndex,
    *,
    image_size: int,
    train_transform: Callable[[torch.Tensor], Any] | None,
    eval_transform: Callable[[torch.Tensor], Any] | None,
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
) -> tuple[ImageDataset, ImageDataset]:
    """The train and val datasets of a scan, at side `stored_size(image_size)`.

    Args:
        index: the scan result.
        image_size: the side fed to the backbone; images are stored at stored_size(image_size).
        train_transform: applied to each train image (uint8 CHW tensor).
        eval_transform: applied to each val image.
        cache: False decodes every image on access.
        cache_dir: cache folder; None: `default_cache_dir()`.
        max_cache_bytes: the largest array cached per split.

    Returns:
        (train dataset, val dataset).
    """
    size = stored_size(image_size)
    common = dict(size=size, cache=cache, cache_dir=cache_dir, max_cache_bytes=max_cache_bytes)
    train = ImageDataset(
        index.train, transform=train_transform, cache_key=f"{index.fingerprint}-train", **common
    )
    val = ImageDataset(index.val, transform=eval_transform, cache_key=f"{index.fingerprint}-val", **common)
    return train, val
