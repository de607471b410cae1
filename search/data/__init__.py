"""Datasets: scan an ImageFolder or a label file once, validate and split it, decode images, cache them.

`scan_dataset` walks DATA (class folders, or a CSV/TSV of path, label[, split]) a single time and returns a `DatasetIndex`: the classes, the train and
val samples (and the test samples kept for the final evaluation), how they were split (as text and
as a `SplitSpec` that `tlsearch train` reuses), the files it skipped (and why) and a fingerprint
that changes whenever a file's content or the split changes, and only then (a copy of the dataset
elsewhere, with new modification times, keeps it). `ImageDataset` serves the samples as uint8 CHW tensors of
side `stored_size(image_size)`, from a memory-mapped array of decoded images that every trial on
the machine shares (built once per dataset fingerprint and size), or decoded on access when the
array would not fit the cache budget.

Where things live (import them from `search.data`, not from the private modules):

- `_decode`: `load_image` (the decoding rules), `decode_resized`, `stored_size`, `BadImageError`.
- `_index`: `SplitSpec`, `DatasetIndex`, `ImageStats`, `format_summary`, `DatasetError`, the `Sample` type.
- `_labels`: label files (CSV/TSV): which file DATA stands for, its header and rows.
- `_scan`: `scan_dataset`, `resplit`: the walk, the checks, the random split, the fingerprint.
- `_near`: near-duplicates across splits (perceptual fingerprints: resized, re-encoded, trimmed copies).
- `_hashes`: per-file content hashes and their cache, `verify`'s decode (and each file's size and
  mode), known placeholders, identical files.
- `_cache`: `ImageDataset` (the shared decoded-image cache) and `dataset_splits`.
"""

from __future__ import annotations

# Re-exported: code elsewhere has always found the cache folder here.
from search.config import default_cache_dir
from search.data._cache import (
    BUILD_CHUNK_BYTES,
    CACHE_FORMAT,
    DEFAULT_MAX_CACHE_BYTES,
    ImageDataset,
    dataset_splits,
)
from search.data._decode import (
    CROP_RATIO,
    MAX_IMAGE_PIXELS,
    BadImageError,
    decode_resized,
    load_image,
    stored_size,
)
from search.data._hashes import HASH_CACHE_FORMAT, KNOWN_PLACEHOLDERS
from search.data._index import (
    SPLIT_LAYOUTS,
    DatasetError,
    DatasetIndex,
    ImageStats,
    Sample,
    SplitSpec,
    WarnFn,
    format_summary,
)
from search.data._labels import LABEL_FILE_EXTENSIONS, SPLIT_VALUES
from search.data._near import (
    NEAR_DUPLICATE_SIMILARITY,
    NearDuplicate,
    fingerprint_files,
    format_near_duplicates,
    near_duplicates,
)
from search.data._scan import (
    IGNORED_NAMES,
    IMAGE_EXTENSIONS,
    TEST_SPLIT_NAME,
    VAL_SPLIT_NAMES,
    resplit,
    scan_dataset,
)
# Re-exported: the images/ folder's budget is the disk's, and has always been found here too.
from search.disk import DEFAULT_IMAGE_BUDGET_BYTES, image_budget_bytes

__all__ = [
    "BUILD_CHUNK_BYTES",
    "CACHE_FORMAT",
    "DEFAULT_IMAGE_BUDGET_BYTES",
    "CROP_RATIO",
    "DEFAULT_MAX_CACHE_BYTES",
    "image_budget_bytes",
    "HASH_CACHE_FORMAT",
    "IGNORED_NAMES",
    "IMAGE_EXTENSIONS",
    "KNOWN_PLACEHOLDERS",
    "LABEL_FILE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "NEAR_DUPLICATE_SIMILARITY",
    "NearDuplicate",
    "SPLIT_LAYOUTS",
    "SPLIT_VALUES",
    "TEST_SPLIT_NAME",
    "VAL_SPLIT_NAMES",
    "BadImageError",
    "DatasetError",
    "DatasetIndex",
    "ImageDataset",
    "ImageStats",
    "Sample",
    "SplitSpec",
    "WarnFn",
    "dataset_splits",
    "decode_resized",
    "default_cache_dir",
    "fingerprint_files",
    "format_near_duplicates",
    "format_summary",
    "load_image",
    "near_duplicates",
    "resplit",
    "scan_dataset",
    "stored_size",
]
