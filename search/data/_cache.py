"""The decoded-image cache: `ImageDataset` serves samples as uint8 CHW tensors, from a memory-mapped
array of decoded images that every trial on the machine shares, or decoded on access;
`dataset_splits` makes the train and val datasets of a scan.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap as mmap_module
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from search.config import (
    atomic_write_text,
    default_cache_dir,
    file_lock,
    tmp_path,
)
from search.data._decode import BadImageError, _workers, decode_resized, stored_size
from search.data._index import DatasetIndex, Sample, WarnFn, _default_warn
from search.disk import image_budget_bytes, touch, trim_lru

# Bump when decoding or resizing changes, so old cache files are not reused.
CACHE_FORMAT = 1
# Default budget of one cached image array; larger datasets are decoded on access.
DEFAULT_MAX_CACHE_BYTES = 8 * 1024**3
# Images are decoded and written this many bytes at a time, so building the cache holds one chunk
# in memory whatever the dataset's size.
BUILD_CHUNK_BYTES = 64 * 1024**2


class ImageDataset(torch.utils.data.Dataset):
    """Samples as (transform(uint8 CHW tensor of side `size`), label), cached or decoded on access.

    With cache=True and an array that fits `max_cache_bytes` (and the free disk), the first use
    decodes every image once into `<cache_dir>/images/<cache_key>-<size>.v<N>.u8` (N x size x size
    x 3 uint8, written under a temporary name and renamed, under a file lock so concurrent trial
    processes build it once), then memory-maps it read-only: every process on the machine shares
    the same pages. Otherwise each image is decoded on access (streaming).

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
                with file_lock(final.with_name(final.name + ".lock")):
                    if not _complete(final, self.nbytes):  # another process may have built it meanwhile
                        self._build(final, bad_path, shape)
            try:
                # Mapped through an open file: once open, another process trimming the cache
                # cannot take the array away from this one.
                with open(final, "rb") as f:
                    array = np.memmap(f, dtype=np.uint8, mode="r", shape=shape)
            except (FileNotFoundError, ValueError):  # trimmed (or cut) between the check and the open
                continue
            touch(final)  # least recently used goes first when the folder is trimmed
            with contextlib.suppress(FileNotFoundError, ValueError):
                for path, reason in json.loads(bad_path.read_text()).items():
                    self._record_bad(path, reason)
            return array
        raise OSError(f"{final} kept disappearing while it was opened (the cache folder is being cleared)")

    def _build(self, final: Path, bad_path: Path, shape: tuple[int, int, int, int]) -> None:
        budget = image_budget_bytes()
        # Room for the new array first: least recently used arrays go (never one in use right now).
        trim_lru(final.parent.glob("*.u8"), budget - self.nbytes, companions=(".bad.json",), keep=(final,))
        free = shutil.disk_usage(final.parent).free
        if free < self.nbytes + 256 * 2**20:
            raise OSError(f"only {free / 2**30:.1f} GiB free, the cache needs {self.nbytes / 2**30:.1f} GiB")
        tmp = tmp_path(final)
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
    atomic_write_text(path, text)


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
