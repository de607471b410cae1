"""What a scan found: the split as data (`SplitSpec`), the scan result (`DatasetIndex`), its report."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from search.config import TLSearchError

# Split layouts a `SplitSpec` may record.
SPLIT_LAYOUTS = ("folders", "random")

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
    """

    layout: str  # "folders" | "random"
    train: str | None = None  # the training folder's name ("train"); None: DATA/<class>/ directly
    val: str | None = None  # folders: the validation folder's name ("val" or "valid")
    val_fraction: float | None = None  # random: each class's share drawn for validation
    seed: int | None = None  # random: the draw's seed (the search's --seed, not a trial's training seed)
    test: str | None = None  # the folder kept for the final evaluation ("test"), when DATA has one

    def __post_init__(self) -> None:
        if self.layout not in SPLIT_LAYOUTS:
            raise DatasetError(f"split layout must be one of {', '.join(SPLIT_LAYOUTS)}, got {self.layout!r}")
        if self.layout == "folders" and not self.val:
            raise DatasetError("a 'folders' split needs the name of its val folder (val: val)")
        if self.layout == "random":
            fraction = self.val_fraction
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
                raise DatasetError(f"val_fraction must be between 0 and 1 (exclusive), got {fraction!r}")
            if isinstance(self.seed, bool) or not isinstance(self.seed, int):
                raise DatasetError(f"a 'random' split needs an integer seed, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set, as a plain dict (what export and model.json record)."""
        return {f: getattr(self, f) for f in ("layout", "train", "val", "val_fraction", "seed", "test")
                if getattr(self, f) is not None}

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
        known = ("layout", "train", "val", "val_fraction", "seed", "test")
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise DatasetError(f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(known)}")
        try:
            return cls(**d)
        except DatasetError as e:
            raise DatasetError(f"{source}: {e}") from None

    def scan_args(self) -> dict[str, Any]:
        """The `scan_dataset` keywords that make this split again ({} for folders: they decide)."""
        if self.layout == "random":
            return {"val_fraction": float(self.val_fraction), "seed": int(self.seed)}  # type: ignore[arg-type]
        return {}

    def describe(self) -> str:
        """One line for people, e.g. "random from train/: fraction=0.2 seed=0 (test/ held out)"."""
        if self.layout == "folders":
            text = f"folders: {self.train or 'train'}/{self.val}"
        else:
            where = f" from {self.train}/" if self.train else ""
            text = f"random{where}: fraction={self.val_fraction:g} seed={self.seed}"
        return text + (f" ({self.test}/ held out for the final evaluation)" if self.test else "")


@dataclass(frozen=True)
class DatasetIndex:
    """What `scan_dataset` found: classes, the splits, skipped files, fingerprints."""

    root: str  # the dataset folder, absolute
    classes: tuple[str, ...]  # class names, sorted; a sample's label indexes this
    train: tuple[Sample, ...]  # (absolute path, label), sorted by path
    val: tuple[Sample, ...]  # (absolute path, label), sorted by path
    split: str  # how train/val were made, e.g. "folders: train/val", "random: fraction=0.2 seed=0"
    skipped: tuple[tuple[str, str], ...] = ()  # (path, reason) of files left out
    fingerprint: str = ""  # sha256[:16] over files (relative path, size, content), the split and val list
    test: tuple[Sample, ...] = ()  # (absolute path, label) of test/, for the final evaluation only
    split_spec: SplitSpec | None = None  # the split as data (what export records and train reuses)
    content_fingerprint: str = ""  # sha256[:16] over the files alone, whatever the split

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

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description (what `tlsearch check --json` prints).

        Returns:
            A dict with root, split (text and split_spec), fingerprint, classes, counts per class
            and split, totals and the skipped files with their reasons.
        """
        return {
            "root": self.root,
            "split": self.split,
            "split_spec": self.split_spec.to_dict() if self.split_spec is not None else None,
            "fingerprint": self.fingerprint,
            "classes": list(self.classes),
            "counts": self.counts(),
            "totals": {name: len(samples) for name, samples in self._splits()},
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
    splits = index._splits()
    width = max([len("class"), len("total"), *(len(c) for c in index.classes)])
    images = " / ".join(f"{len(samples)} {name}" for name, samples in splits)
    lines = [
        f"dataset: {index.root}",
        f"split: {index.split}",
        f"fingerprint: {index.fingerprint}",
        f"{len(index.classes)} classes, {images} images",
        "",
        f"{'class':<{width}}" + "".join(f"  {name:>7}" for name, _ in splits),
    ]
    for c in index.classes:
        lines.append(f"{c:<{width}}" + "".join(f"  {counts[c][name]:>7}" for name, _ in splits))
    lines.append(f"{'total':<{width}}" + "".join(f"  {len(samples):>7}" for _, samples in splits))
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
