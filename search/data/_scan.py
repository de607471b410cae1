"""Scanning: walk DATA once, find classes and images, check them, split train/val, fingerprint.

`scan_dataset` is the entry point; `resplit` draws another random split of a scan without reading
any file again. Hashing and verifying the files lives in `_hashes`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import stat
from dataclasses import dataclass, field

from search.data._hashes import (
    Header,
    _content_fingerprint,
    _duplicate_groups,
    _inspect,
    _label_file_fingerprint,
    _rel_key,
)
from search.data._index import (
    DatasetError,
    DatasetIndex,
    ImageStats,
    Sample,
    SplitSpec,
    WarnFn,
    _default_warn,
    _relative,
)
from search.data._labels import LabelRow, find_label_file, is_label_file, read_label_file

# File name endings accepted as images (compared in lower case).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
# Validation folder names, in order of preference, when DATA holds train/ beside one of them.
VAL_SPLIT_NAMES = ("val", "valid")
# The folder beside train/ kept for the final evaluation: never trained on, never used to choose.
TEST_SPLIT_NAME = "test"
# Folder names that are never classes nor walked into (besides anything starting with '.').
IGNORED_NAMES = frozenset({"__MACOSX", "__pycache__", "Thumbs.db", "desktop.ini"})


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES


@dataclass
class _Walk:
    """Mutable state of one scan: files found and problems met."""

    warn: WarnFn
    skipped: list[tuple[str, str]] = field(default_factory=list)
    stats: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # path -> (size, mtime_ns, ctime_ns)

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append((path, reason))
        self.warn(f"skipping {path}: {reason}")

    def skip_row(self, label_file: str, row: int, path: str, reason: str) -> None:
        where = f"{os.path.basename(label_file)} row {row}"
        self.skipped.append((path or label_file, f"{where}: {reason}"))
        image = f" ({_relative(path, os.path.dirname(label_file))})" if path else ""
        self.warn(f"skipping {where}{image}: {reason}")


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
                walk.stats[path] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
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
    cache_dir: str | os.PathLike[str] | None = None,
) -> DatasetIndex:
    """Scans a dataset once: finds classes and images, checks them, splits train/val.

    Layouts: DATA/train/<class>/... beside DATA/val (or valid); DATA/train alone (val is split off
    it at random); or DATA/<class>/... (split at random). Or a label file: DATA is a .csv/.tsv
    with a header row naming `path` and `label` (and optionally `split`: train, val, test), paths
    relative to it; or a folder without train/ holding such a file at its top (see
    `search.data._labels.find_label_file` for the rule). Its val rows are validation; without any,
    val is drawn from its train rows as for folders; test rows are kept apart as test/ is. A bad
    row (no path or label, a missing or undecodable image, the same image listed again) is skipped
    with a warning naming the file and the row; a bad file (no header, a missing column, an
    unknown split, no usable row, a class left empty) is a `DatasetError`. A test/ folder beside train/ is never
    validation: it is kept in `DatasetIndex.test` for the final evaluation. A random split is
    stratified (every class keeps >= 1 image on each side), deterministic for a seed, and recorded
    in `DatasetIndex.split` and `split_spec`. Hidden files and folders are ignored; image names are
    matched by extension in any case; broken links and symlink loops are skipped with a warning.

    The fingerprint hashes every file's content (sha256), not its modification time, so a copy of
    the dataset elsewhere is the same dataset. Digests are kept in a small per-dataset cache under
    `<cache_dir>/hashes/`, keyed by relative path, size and times, so a re-scan reads no file twice.

    Args:
        root: the dataset folder, or its label file.
        val_fraction: share of each class that goes to val in a random split.
        seed: seed of the random split.
        verify: fully decode every image and skip those that fail (with a warning).
        warn: called with one line per skipped file; default prints "warning: ..." to stderr.
        cache_dir: where the digest cache lives; None: `default_cache_dir()`.

    Returns:
        The index of the dataset.
    """
    warn = _default_warn if warn is None else warn
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")
    root_abs = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if os.path.isfile(root_abs) and is_label_file(root_abs):
        return _scan_label_file(root_abs, val_fraction=val_fraction, seed=seed, verify=verify, warn=warn,
                                cache_dir=cache_dir)
    if not os.path.isdir(root_abs):
        what = "not a folder nor a .csv/.tsv label file" if os.path.exists(root_abs) else "no such folder"
        raise DatasetError(f"dataset {what}: {root_abs}")
    walk = _Walk(warn=warn)
    top = _subdirs(root_abs, walk)
    label_file = find_label_file(root_abs, top) if "train" not in top else None
    if label_file is not None:
        return _scan_label_file(label_file, val_fraction=val_fraction, seed=seed, verify=verify, warn=warn,
                                cache_dir=cache_dir)
    val_name = next((n for n in VAL_SPLIT_NAMES if n in top), None)
    test_files: dict[str, list[str]] | None = None

    if "train" in top:
        test_name = TEST_SPLIT_NAME if TEST_SPLIT_NAME in top else None
        others = [n for n in top if n not in ("train", val_name, test_name)]
        if others:
            warn(f"ignoring folder(s) beside train/: {', '.join(others)}")
        train_dir = os.path.join(root_abs, "train")
        train_files = _class_files(train_dir, walk)
        if val_name is not None:
            val_files = _class_files(os.path.join(root_abs, val_name), walk)
            _check_same_classes(train_files, val_files, val_name)
            spec = SplitSpec("folders", train="train", val=val_name, test=test_name)
        else:
            val_files = None
            spec = SplitSpec("random", train="train", val_fraction=val_fraction, seed=seed, test=test_name)
        classes = _check_classes(sorted(train_files), train_dir)
        if test_name is not None:
            test_files = _class_files(os.path.join(root_abs, test_name), walk)
            _check_same_classes(train_files, test_files, test_name)
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
        spec = SplitSpec("random", val_fraction=val_fraction, seed=seed)

    groups = [files for files in (train_files, val_files, test_files) if files is not None]
    all_files = [p for files in groups for fs in files.values() for p in fs]
    digests, bad, headers = _inspect(all_files, walk.stats, root_abs, verify=verify, cache_dir=cache_dir)
    for p in all_files:  # report in path order, whatever order the threads finished in
        if p in bad:
            walk.skip(p, bad[p])
    train_files = _without(train_files, bad)
    val_files = _without(val_files, bad) if val_files is not None else None
    test_files = _without(test_files, bad) if test_files is not None else None

    if val_files is None:
        train_files, val_files = _random_split(train_files, val_fraction=val_fraction, seed=seed)
    else:
        for split_name, files in (("train", train_files), (val_name, val_files)):
            for c in classes:
                if not files[c]:
                    raise DatasetError(f"class {c!r} has no usable image in {split_name}/")

    label = {c: i for i, c in enumerate(classes)}
    groups = [train_files, val_files, test_files or {}]
    everything = [(p, label[c]) for files in groups for c, fs in files.items() for p in fs]
    content = _content_fingerprint(root_abs, everything, walk.stats, digests)
    return _make_index(
        root_abs, classes, train_files, val_files, test_files or {}, spec, tuple(walk.skipped), content,
        health=_health([p for p, _ in everything], digests, headers),
    )


def _scan_label_file(
    path: str, *, val_fraction: float, seed: int, verify: bool, warn: WarnFn, cache_dir: str | os.PathLike[str] | None
) -> DatasetIndex:
    """`scan_dataset` for a label file: its rows, their images checked, split as the file says."""
    walk = _Walk(warn=warn)
    folder = os.path.dirname(path)
    labels = read_label_file(path, lambda row, image, reason: walk.skip_row(path, row, image, reason))
    rows = [r for r in labels.rows if _row_file_ok(r, path, walk)]
    digests, bad, headers = _inspect([r.path for r in rows], walk.stats, folder, verify=verify, cache_dir=cache_dir)
    for r in rows:
        if r.path in bad:
            walk.skip_row(path, r.row, r.path, bad[r.path])
    rows = [r for r in rows if r.path not in bad]
    if not rows:
        raise DatasetError(f"no usable row in {path}: all {labels.n_rows} row(s) were skipped (see the warnings)")
    classes = list(labels.classes)
    if len(classes) < 2:
        named = f"only the label {classes[0]!r}" if classes else "no label"
        raise DatasetError(f"{path} names {named}; classification needs at least 2 classes")
    files: dict[str, dict[str, list[str]]] = {name: {c: [] for c in classes} for name in ("train", "val", "test")}
    for r in rows:
        files[r.split or "train"][r.label].append(r.path)
    has_test = any(files["test"].values())
    for c in classes:
        if not files["train"][c]:
            where = "train rows" if labels.has_split else "rows"
            raise DatasetError(f"class {c!r} has no usable image among the {where} of {path}")
    name = os.path.basename(path)
    if any(files["val"].values()):
        for c in classes:
            if not files["val"][c]:
                raise DatasetError(f"class {c!r} has no usable image among the val rows of {path}")
        spec = SplitSpec("csv", labels=name, test="test" if has_test else None)
        train_files, val_files = files["train"], files["val"]
    else:
        spec = SplitSpec("csv", labels=name, val_fraction=val_fraction, seed=seed, test="test" if has_test else None)
        train_files, val_files = _random_split(files["train"], val_fraction=val_fraction, seed=seed)
    test_files = {c: fs for c, fs in files["test"].items() if fs}
    content = _label_file_fingerprint(folder, [(r.path, r.label, r.split or "") for r in rows], walk.stats, digests)
    return _make_index(
        folder, classes, train_files, val_files, test_files, spec, tuple(walk.skipped), content,
        label_file=path, health=_health([r.path for r in rows], digests, headers),
    )


def _row_file_ok(row: LabelRow, label_file: str, walk: _Walk) -> bool:
    """Stats a row's image (recording it for the hashing pass); a missing one skips the row."""
    try:
        st = os.stat(row.path)
    except FileNotFoundError:
        walk.skip_row(label_file, row.row, row.path, "image not found")
        return False
    except OSError as err:
        walk.skip_row(label_file, row.row, row.path, f"cannot read: {err.strerror or err}")
        return False
    if not stat.S_ISREG(st.st_mode):
        walk.skip_row(label_file, row.row, row.path, "not a file")
        return False
    walk.stats[row.path] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return True


def _health(
    paths: list[str], digests: dict[str, str], headers: dict[str, Header]
) -> tuple[tuple[tuple[str, ...], ...], ImageStats | None]:
    """(groups of identical files, image sizes and modes) of the usable files, from the hashing pass."""
    return _duplicate_groups(digests, set(paths)), ImageStats.of([headers[p] for p in paths if p in headers])


def resplit(index: DatasetIndex, *, val_fraction: float, seed: int) -> DatasetIndex:
    """The same scan with another random train/val split; no file is read again.

    Equal to `scan_dataset(index.source, val_fraction=val_fraction, seed=seed)` on unchanged files.

    Args:
        index: a scan whose val is a random draw (`split_spec.drawn`: layout random, or a label
            file without val rows).
        val_fraction: share of each class that goes to val.
        seed: seed of the split.

    Returns:
        The re-split index (test/ and the skipped files unchanged).
    """
    spec = index.split_spec
    if spec is None or not spec.drawn:
        raise DatasetError(
            f"{index.source} is split by its {'val rows' if index.label_file else 'folders'} ({index.split}); "
            "a val_fraction and seed apply only to a random split"
        )
    new_spec = dataclasses.replace(spec, val_fraction=val_fraction, seed=seed)  # validates them
    pool: dict[str, list[str]] = {c: [] for c in index.classes}
    for path, label in index.train + index.val:
        pool[index.classes[label]].append(path)
    train_files, val_files = _random_split(pool, val_fraction=val_fraction, seed=seed)
    test_files: dict[str, list[str]] = {}
    for path, label in index.test:
        test_files.setdefault(index.classes[label], []).append(path)
    return _make_index(
        index.root, list(index.classes), train_files, val_files, test_files, new_spec, index.skipped,
        index.content_fingerprint, label_file=index.label_file, health=(index.duplicate_groups, index.image_stats),
    )


def _make_index(
    root: str,
    classes: list[str],
    train_files: dict[str, list[str]],
    val_files: dict[str, list[str]],
    test_files: dict[str, list[str]],
    spec: SplitSpec,
    skipped: tuple[tuple[str, str], ...],
    content: str,
    *,
    label_file: str | None = None,
    health: tuple[tuple[tuple[str, ...], ...], ImageStats | None] = ((), None),
) -> DatasetIndex:
    label = {c: i for i, c in enumerate(classes)}

    def samples(files: dict[str, list[str]]) -> tuple[Sample, ...]:
        return tuple(sorted((p, label[c]) for c, fs in files.items() for p in fs))

    train, val, test = samples(train_files), samples(val_files), samples(test_files)
    split = spec.describe()
    return DatasetIndex(
        root=root,
        classes=tuple(classes),
        train=train,
        val=val,
        split=split,
        skipped=skipped,
        fingerprint=_fingerprint(root, content, split, val),
        test=test,
        split_spec=spec,
        content_fingerprint=content,
        label_file=label_file,
        duplicate_groups=health[0],
        image_stats=health[1],
    )


def _without(files: dict[str, list[str]], bad: dict[str, str]) -> dict[str, list[str]]:
    return {c: [p for p in fs if p not in bad] for c, fs in files.items()}


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


def _fingerprint(root: str, content: str, split: str, val: tuple[Sample, ...]) -> str:
    # The files, how they were split and which went to val: train and test follow from them.
    h = hashlib.sha256()
    h.update(f"content={content}\nsplit={split}\n".encode())
    for key in sorted(_rel_key(p, root) for p, _ in val):
        h.update(f"val\t{key}\n".encode())
    return h.hexdigest()[:16]
