"""Least-recently-used trimming of a cache folder."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:
    pass



# A file read or written this recently is taken to be in use by a trial: LRU trimming skips it.
IN_USE_S = 60.0


def trim_lru(files: Iterable[Path], budget_bytes: int, *, companions: Sequence[str] = (),
             keep: Iterable[Path] = (), in_use_s: float | None = None) -> list[Path]:
    """Removes the least recently used files (by modification time) until they fit the budget.

    A file used within `in_use_s` seconds, or named in `keep`, is never removed. A file that
    vanishes meanwhile (another process trimming the same folder) is simply skipped.

    Args:
        files: the candidate files (e.g. every array of a cache folder).
        budget_bytes: the total size the files may keep.
        companions: suffixes of small files that go with each removed file (`X.u8` ->
            `X.bad.json` for ".bad.json": the suffix replaces the file's own).
        keep: files never to remove (the one being built or read now).
        in_use_s: how recently used a file must be to be spared; None: IN_USE_S.

    Returns:
        The removed files.
    """
    in_use_s = IN_USE_S if in_use_s is None else in_use_s
    spared = {Path(p).resolve() for p in keep}
    stats = []
    for p in files:
        with contextlib.suppress(OSError):
            stats.append((p, p.stat()))
    total = sum(st.st_size for _, st in stats)
    removed = []
    now = time.time()
    for p, st in sorted(stats, key=lambda e: e[1].st_mtime):
        if total <= budget_bytes:
            break
        if now - st.st_mtime < in_use_s or p.resolve() in spared:
            continue
        try:
            p.unlink()
        except FileNotFoundError:  # another process's trim was first
            pass
        except OSError:
            continue
        total -= st.st_size
        removed.append(p)
        for suffix in companions:
            with contextlib.suppress(OSError):
                p.with_suffix(suffix).unlink()
    return removed


def touch(path: Path) -> None:
    """Marks a cache file as just used (LRU order); a file removed meanwhile is no error."""
    with contextlib.suppress(OSError):
        os.utime(path)


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0
