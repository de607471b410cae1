"""What a scan found: the split as data (`SplitSpec`), the scan result (`DatasetIndex`), its report."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from search.config import TLSearchError

# Split layouts a `SplitSpec` may record.
SPLIT_LAYOUTS = ("folders", "random", "csv")
# The fields of a `SplitSpec`, in the order its record lists them.
_SPEC_FIELDS = ("layout", "train", "val", "val_fraction", "seed", "test", "labels")

WarnFn = Callable[[str], None]
Sample = tuple[str, int]


class DatasetError(TLSearchError):
    """A dataset folder that cannot be used as it is (missing, no classes, a class too small)."""


def _default_warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@dataclass(frozen=True)
class SplitSpec:
    """How a scan chose its validation images, as data: exported with every config, reused by `train`.

    `folders`: validation is the folder `val` beside train/. `random`: a seeded, stratified draw of
    `val_fraction` of each class, from train/ when DATA has one (`train: train`), else from the
    class folders. A `test` folder is recorded, and kept for the final evaluation, in both.
    `csv`: a label file (`labels`, its name beside the images) lists path and label, and maybe
    split, per row; its val rows are validation, or, when it names none, a seeded stratified draw
    of `val_fraction` of its train rows (`val_fraction` and `seed` set); `test: test` when some
    rows are test rows.
    """

    layout: str  # "folders" | "random"
    train: str | None = None  # the training folder's name ("train"); None: DATA/<class>/ directly
    val: str | None = None  # folders: the validation folder's name ("val" or "valid")
    val_fraction: float | None = None  # random: each class's share drawn for validation
    seed: int | None = None  # random: the draw's seed (the search's --seed, not a trial's training seed)
    test: str | None = None  # the folder kept for the final evaluation ("test"), when DATA has one
    labels: str | None = None  # csv: the label file's name, relative to the dataset folder

    def __post_init__(self) -> None:
        if self.layout not in SPLIT_LAYOUTS:
            raise DatasetError(f"split layout must be one of {', '.join(SPLIT_LAYOUTS)}, got {self.layout!r}")
        if self.layout == "folders" and not self.val:
            raise DatasetError("a 'folders' split needs the name of its val folder (val: val)")
        if self.layout == "csv" and not self.labels:
            raise DatasetError("a 'csv' split needs the name of its label file (labels: labels.csv)")
        if self.layout == "random" or (self.layout == "csv" and self.val_fraction is not None):
            fraction = self.val_fraction
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
                raise DatasetError(f"val_fraction must be between 0 and 1 (exclusive), got {fraction!r}")
            if isinstance(self.seed, bool) or not isinstance(self.seed, int):
                raise DatasetError(f"a 'random' split needs an integer seed, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set, as a plain dict (what export and model.json record)."""
        return {f: getattr(self, f) for f in _SPEC_FIELDS if getattr(self, f) is not None}

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "split") -> "SplitSpec":
        """Reads a split record written by `to_dict`.

        Args:
            d: the mapping, e.g. the `split` of an exported config.
            source: what to call it in error messages.

        Returns:
            The validated spec.
        """
        if not isinstance(d, dict):
            raise DatasetError(
                f"{source}: expected a mapping such as {{layout: random, val_fraction: 0.2, seed: 0}}, got {d!r}"
            )
        known = _SPEC_FIELDS
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise DatasetError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(known)}")
        try:
            return cls(**d)
        except DatasetError as e:
            raise DatasetError(f"{source}: {e}") from None

    @property
    def drawn(self) -> bool:
        """True when validation is a seeded random draw (`val_fraction` and `seed` decide it)."""
        return self.val_fraction is not None

    def scan_args(self) -> dict[str, Any]:
        """The `scan_dataset` keywords that make this split again ({} when folders or the file decide)."""
        if self.drawn:
            return {"val_fraction": float(self.val_fraction), "seed": int(self.seed)}  # type: ignore[arg-type]
        return {}

    def describe(self) -> str:
        """One line for people, e.g. "random from train/: fraction=0.2 seed=0 (test/ held out)"."""
        if self.layout == "folders":
            text = f"folders: {self.train or 'train'}/{self.val}"
        elif self.layout == "csv":
            text = f"csv {self.labels}: " + (
                f"val drawn from the train rows, fraction={self.val_fraction:g} seed={self.seed}" if self.drawn
                else "val rows from its split column"
            )
            return text + (" (test rows held out for the final evaluation)" if self.test else "")
        else:
            where = f" from {self.train}/" if self.train else ""
            text = f"random{where}: fraction={self.val_fraction:g} seed={self.seed}"
        return text + (f" ({self.test}/ held out for the final evaluation)" if self.test else "")


@dataclass(frozen=True)
class ImageStats:
    """What the decode check saw of the images' files: sizes as stored and colour modes."""

    images: int  # files looked at (every usable one)
    min_width: int
    max_width: int
    min_height: int
    max_height: int
    grey: int = 0  # grey or black-and-white files (modes 1, L, LA, I, I;16, F), turned into RGB
    alpha: int = 0  # files with transparency (RGBA, LA, PA, or a transparent colour), put on white
    cmyk: int = 0  # CMYK files, converted to RGB
    median_side: int = 0  # the median of each file's shorter side (0: not recorded)

    @classmethod
    def of(cls, headers: list[tuple[int, int, str, bool]]) -> ImageStats | None:
        """Sums (width, height, mode, has transparency) per file; None when there is none."""
        if not headers:
            return None
        widths = [w for w, _, _, _ in headers]
        heights = [h for _, h, _, _ in headers]
        return cls(
            images=len(headers),
            min_width=min(widths), max_width=max(widths), min_height=min(heights), max_height=max(heights),
            grey=sum(m in GREY_MODES or m.startswith("I;16") for _, _, m, _ in headers),
            alpha=sum(bool(a) for _, _, _, a in headers),
            cmyk=sum(m == "CMYK" for _, _, m, _ in headers),
            median_side=sorted(min(w, h) for w, h, _, _ in headers)[len(headers) // 2],
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: images, width and height as [min, max], and the grey/alpha/cmyk counts."""
        return {
            "images": self.images,
            "width": [self.min_width, self.max_width],
            "height": [self.min_height, self.max_height],
            "grey": self.grey,
            "alpha": self.alpha,
            "cmyk": self.cmyk,
        }


# Image modes counted as grey in `ImageStats`.
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})


@dataclass(frozen=True)
class DatasetIndex:
    """What `scan_dataset` found: classes, the splits, skipped files, fingerprints, dataset health."""

    root: str  # the dataset folder, absolute (for a label file: the folder holding it)
    classes: tuple[str, ...]  # class names, sorted; a sample's label indexes this
    train: tuple[Sample, ...]  # (absolute path, label), sorted by path
    val: tuple[Sample, ...]  # (absolute path, label), sorted by path
    split: str  # how train/val were made, e.g. "folders: train/val", "random: fraction=0.2 seed=0"
    skipped: tuple[tuple[str, str], ...] = ()  # (path, reason) of files left out
    fingerprint: str = ""  # sha256[:16] over files (relative path, size, content), the split and val list
    test: tuple[Sample, ...] = ()  # (absolute path, label) of test/, for the final evaluation only
    split_spec: SplitSpec | None = None  # the split as data (what export records and train reuses)
    content_fingerprint: str = ""  # sha256[:16] over the files alone, whatever the split
    label_file: str | None = None  # the CSV/TSV listing path and label per row, absolute; None: folders
    # Usable files with the same content (sha256), each group sorted, >= 2 paths: found from the
    # fingerprint's digests, so `check` can name copies that leak between splits.
    duplicate_groups: tuple[tuple[str, ...], ...] = ()
    image_stats: ImageStats | None = None  # sizes and colour modes, when the scan decoded the files

    @property
    def source(self) -> str:
        """What the user pointed at: the label file, else the dataset folder."""
        return self.label_file or self.root

    def counts(self) -> dict[str, dict[str, int]]:
        """Returns {class: {"train": n, "val": n}}, and "test": n when DATA has a test/ folder."""
        splits = self._splits()
        out = {c: {name: 0 for name, _ in splits} for c in self.classes}
        for split, samples in splits:
            for _, label in samples:
                out[self.classes[label]][split] += 1
        return out

    def _splits(self) -> list[tuple[str, tuple[Sample, ...]]]:
        splits = [("train", self.train), ("val", self.val)]
        if self.test or (self.split_spec is not None and self.split_spec.test):
            splits.append(("test", self.test))
        return splits

    def imbalance_ratio(self) -> float:
        """Images in the largest training class over those in the smallest (1.0: balanced)."""
        per_class = [c["train"] for c in self.counts().values()]
        smallest = min(per_class, default=0)
        return max(per_class) / smallest if smallest else float("inf")

    def duplicates_across_splits(self) -> list[list[tuple[str, str]]]:
        """Groups of identical files that sit in more than one split, as (split, path) lists.

        They leak: a validation (or test) image the model also trained on inflates its score.
        """
        where = {path: name for name, samples in self._splits() for path, _ in samples}
        out = []
        for group in self.duplicate_groups:
            members = [(where[p], p) for p in group if p in where]
            if len({split for split, _ in members}) > 1:
                out.append(members)
        return out

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description (what `tlsearch check --json` prints).

        Returns:
            A dict with root, label_file, split (text and split_spec), fingerprint, classes, counts
            per class and split, totals, the imbalance ratio of train, duplicates across splits
            (identical content), duplicate files within one split, image sizes and colour modes,
            and the skipped files with their reasons.
        """
        ratio = self.imbalance_ratio()
        across = self.duplicates_across_splits()
        return {
            "root": self.root,
            "label_file": self.label_file,
            "split": self.split,
            "split_spec": self.split_spec.to_dict() if self.split_spec is not None else None,
            "fingerprint": self.fingerprint,
            "classes": list(self.classes),
            "counts": self.counts(),
            "totals": {name: len(samples) for name, samples in self._splits()},
            "imbalance_ratio": round(ratio, 4) if ratio != float("inf") else None,
            "duplicates_across_splits": [[{"split": s, "path": p} for s, p in g] for g in across],
            "duplicate_groups_within_splits": len(self.duplicate_groups) - len(across),
            "images": self.image_stats.to_dict() if self.image_stats is not None else None,
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }


def format_summary(index: DatasetIndex, *, more_health: Sequence[str] = ()) -> str:
    """Human-readable report of a scan: a classes x splits table, then the skipped files.

    Args:
        index: the scan result.
        more_health: lines printed after the duplicate files (e.g. `format_near_duplicates`).

    Returns:
        Multi-line text without a trailing newline.
    """
    counts = index.counts()
    splits = index._splits()
    width = max([len("class"), len("total"), *(len(c) for c in index.classes)])
    images = " / ".join(f"{len(samples)} {name}" for name, samples in splits)
    lines = [
        f"dataset: {index.source}",
        f"split: {index.split}",
        f"fingerprint: {index.fingerprint}",
        f"{len(index.classes)} classes, {images} images",
        "",
        f"{'class':<{width}}" + "".join(f"  {name:>7}" for name, _ in splits),
    ]
    for c in index.classes:
        lines.append(f"{c:<{width}}" + "".join(f"  {counts[c][name]:>7}" for name, _ in splits))
    lines.append(f"{'total':<{width}}" + "".join(f"  {len(samples):>7}" for _, samples in splits))
    lines += ["", *_health_lines(index), *more_health]
    if index.skipped:
        lines += ["", f"skipped {len(index.skipped)} file(s):"]
        for p, reason in index.skipped:
            lines.append(f"  {_relative(p, index.root)}: {reason}")
    return "\n".join(lines)


def _health_lines(index: DatasetIndex) -> list[str]:
    """Imbalance, image sizes and modes, and duplicate files, as `format_summary` prints them."""
    train = {c: n["train"] for c, n in index.counts().items()}
    big, small = max(train, key=train.__getitem__), min(train, key=train.__getitem__)
    extremes = f"{big} {train[big]}, {small} {train[small]}" if train[big] != train[small] else f"{train[big]} each"
    lines = [f"imbalance (train, largest/smallest class): {index.imbalance_ratio():.2f} ({extremes})"]
    st = index.image_stats
    if st is not None:
        lines.append(f"images: {st.images} decoded, width {st.min_width}-{st.max_width}, "
                     f"height {st.min_height}-{st.max_height}; grey {st.grey}, alpha {st.alpha}, CMYK {st.cmyk}")
    across = index.duplicates_across_splits()
    within = len(index.duplicate_groups) - len(across)
    if not across:
        lines.append("duplicates across splits: none (identical content)")
    else:
        lines.append(f"duplicates across splits: {len(across)} group(s) of identical files "
                     "(they inflate validation scores; remove one of each):")
        # Only a split made of folders shows in the paths; a label file's rows and a random split's
        # draw do not: name each file's split.
        named = index.split_spec is not None and index.split_spec.layout == "folders"
        for group in across:
            lines.append("  " + " == ".join(
                f"{_relative(p, index.root)}" + ("" if named else f" ({split})") for split, p in group
            ))
    if within:
        lines.append(f"duplicates within one split: {within} group(s) of identical files")
    return lines


def _relative(path: str, root: str) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return path
