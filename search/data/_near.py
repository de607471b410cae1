"""Near-duplicates across splits: the same picture resized, cropped a little or re-encoded.

Identical files are found by sha256 (`_hashes`). A copy that was resized, trimmed at its edges or
saved again as JPEG has other bytes but the same picture, and leaks just the same: a validation
image the model trained on inflates its score. Each image gets a perceptual fingerprint: its
32x32 grey version, less its mean, at unit length, as it is and with 4% and 8% cut from every
edge. Two images' similarity is the largest cosine between one's plain fingerprint and the
other's (plain or trimmed) one; pairs in different splits at `NEAR_DUPLICATE_SIMILARITY` or more
are reported. A cosine of grey pixels, unlike a hash's few bits, keeps a picture's fine layout, so
two different photos of one scene stay apart.

The threshold was measured on the clean real datasets in ../shared (benchmarks/data_issues.py
and its results): the closest cross-split pair of different pictures is at 0.974 (spoken_digits:
spectrograms of one speaker saying one digit), 0.941 on aid25 and 0.80 on hymenoptera, while every
resized (0.5-0.7x) and JPEG re-encoded (quality 60-80) copy of a val image is at 0.992 or more,
and every copy trimmed by 4% on each side at 0.993 or more. Pictures under about 64 px (CIFAR's
32 px) lose too much when resized to be found this way.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from search.data._decode import BadImageError, _workers, load_image

if TYPE_CHECKING:
    from search.data._index import DatasetIndex

# Two images at least this similar (cosine of their fingerprints) are the same picture.
NEAR_DUPLICATE_SIMILARITY = 0.985

_SIDE = 32  # the fingerprint's grey image is _SIDE x _SIDE
_TRIMS = (0.0, 0.04, 0.08)  # fraction cut from each edge: a copy trimmed a little still matches


@dataclass(frozen=True)
class NearDuplicate:
    """Two files in different splits that show the same picture (not byte-identical)."""

    similarity: float  # cosine of the fingerprints, at most 1.0
    split_a: str  # "train", "val" or "test"
    path_a: str  # absolute path
    split_b: str
    path_b: str

    def to_dict(self) -> dict[str, Any]:
        return {"similarity": round(self.similarity, 4), "a": {"split": self.split_a, "path": self.path_a},
                "b": {"split": self.split_b, "path": self.path_b}}


def fingerprint(path: str | os.PathLike[str] | Any) -> np.ndarray:
    """An image's fingerprints: (len(_TRIMS), _SIDE * _SIDE) float32 rows, zero mean, unit length.

    Args:
        path: an image file (decoded by the dataset's rules: orientation, RGB), or an open file.

    Raises:
        BadImageError: the file does not decode.
    """
    from PIL import Image

    im = load_image(path, draft=4 * _SIDE).convert("L")
    w, h = im.size
    rows = []
    for t in _TRIMS:
        dx, dy = round(t * w), round(t * h)
        g = im.crop((dx, dy, w - dx, h - dy)).resize((_SIDE, _SIDE), Image.Resampling.BILINEAR)
        v = np.asarray(g, dtype=np.float32).ravel()
        v = v - v.mean()
        rows.append(v / max(float(np.linalg.norm(v)), 1e-6))  # a flat picture stays all zeros
    return np.stack(rows)


def fingerprint_files(paths: list[str]) -> dict[str, np.ndarray]:
    """{path: fingerprint} of the files that decode (the scan already warned about those that do not)."""

    def one(p: str) -> np.ndarray | None:
        try:
            return fingerprint(p)
        except (BadImageError, OSError, ValueError):
            return None

    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        prints = list(pool.map(one, paths))
    return {p: f for p, f in zip(paths, prints) if f is not None}


def similar_pairs(a: np.ndarray, b: np.ndarray, *, threshold: float, block: int = 1024) -> list[tuple[int, int, float]]:
    """(i, j, similarity) of every pair of fingerprints a[i], b[j] at `threshold` or more.

    Args:
        a, b: (n, len(_TRIMS), D) fingerprints.
        threshold: the smallest similarity reported.
        block: rows of `a` compared at once (memory: block x len(b) floats).
    """
    out = []
    for start in range(0, len(a), block):
        x = a[start:start + block]
        s = x[:, 0] @ b[:, 0].T
        for k in range(1, x.shape[1]):
            np.maximum(s, x[:, k] @ b[:, 0].T, out=s)
            np.maximum(s, x[:, 0] @ b[:, k].T, out=s)
        for i, j in zip(*np.nonzero(s >= threshold)):
            out.append((start + int(i), int(j), float(s[i, j])))
    return out


def near_duplicates(
    index: DatasetIndex, *, threshold: float = NEAR_DUPLICATE_SIMILARITY,
    prints: dict[str, np.ndarray] | None = None,
) -> list[NearDuplicate]:
    """Pairs of files in different splits (train/val, train/test, val/test) that show the same
    picture, most similar first; byte-identical files are left out (`duplicates_across_splits`
    names them).

    Args:
        index: the scanned dataset.
        threshold: the smallest similarity reported (`NEAR_DUPLICATE_SIMILARITY`).
        prints: precomputed {path: fingerprint}; None: computed here.

    Returns:
        The pairs, by similarity (highest first), then by path.
    """
    splits = [(name, [p for p, _ in samples]) for name, samples in index._splits() if samples]
    if prints is None:
        prints = fingerprint_files([p for _, paths in splits for p in paths])
    identical = {frozenset((a, b)) for g in index.duplicate_groups for a in g for b in g if a != b}
    found = []
    for n, (name_a, paths_a) in enumerate(splits):
        for name_b, paths_b in splits[n + 1:]:
            pa = [p for p in paths_a if p in prints]
            pb = [p for p in paths_b if p in prints]
            if not pa or not pb:
                continue
            fa, fb = np.stack([prints[p] for p in pa]), np.stack([prints[p] for p in pb])
            for i, j, s in similar_pairs(fa, fb, threshold=threshold):
                if frozenset((pa[i], pb[j])) not in identical:
                    found.append(NearDuplicate(min(s, 1.0), name_a, pa[i], name_b, pb[j]))
    return sorted(found, key=lambda d: (-d.similarity, d.path_a, d.path_b))


def format_near_duplicates(found: list[NearDuplicate], *, root: str, shown: int = 20) -> list[str]:
    """The lines `tlsearch check` prints about them."""
    from search.data._index import _relative

    if not found:
        return [f"near-duplicates across splits: none (resized, re-encoded or trimmed copies; "
                f"similarity >= {NEAR_DUPLICATE_SIMILARITY})"]
    lines = [f"near-duplicates across splits: {len(found)} pair(s) of the same picture resized, re-encoded or "
             "trimmed (they inflate validation scores; remove one of each):"]
    for d in found[:shown]:
        lines.append(f"  {_relative(d.path_a, root)} ({d.split_a}) ~ {_relative(d.path_b, root)} ({d.split_b}), "
                     f"similarity {d.similarity:.3f}")
    if len(found) > shown:
        lines.append(f"  ... and {len(found) - shown} more (all in --json)")
    return lines
