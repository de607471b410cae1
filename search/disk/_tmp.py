"""Temporary files a killed process left behind, and whether their writer still runs."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    pass



# A temporary file nobody has written for this long is stale, whoever its writer was.
TMP_STALE_S = 3600.0


# A temporary file of a writer that is gone (its pid is dead on this host) is stale once idle for
# this long: a writer on another host that shares the folder keeps touching its file while it writes.
TMP_DEAD_WRITER_S = 60.0


_TMP_PID = re.compile(r"\.(\d+)(?:\.\d+)?\.tmp$")  # <name>.<pid>[.<thread>].tmp


def is_stale_tmp(name: str, *, idle_s: float, pid_alive: bool | None) -> bool:
    """Whether a temporary file was left by a writer that stopped (a pure rule).

    Args:
        name: the file name (`<name>.<pid>.tmp` or `<name>.tmp`).
        idle_s: seconds since it was last written.
        pid_alive: whether the pid in its name runs on this host; None: no pid in the name.

    Returns:
        True when unwritten for TMP_STALE_S, or when its writer is dead and it has been idle for
        TMP_DEAD_WRITER_S.
    """
    if not name.endswith(".tmp"):
        return False
    if idle_s >= TMP_STALE_S:
        return True
    return pid_alive is False and idle_s >= TMP_DEAD_WRITER_S


def stale_tmp_files(folders: Iterable[Path], *, now: float | None = None) -> list[Path]:
    """The stale temporary files (see `is_stale_tmp`) directly inside `folders`."""
    now = time.time() if now is None else now
    out = []
    for folder in folders:
        try:
            entries = list(Path(folder).glob("*.tmp"))
        except OSError:
            continue
        for p in entries:
            try:
                idle = now - p.stat().st_mtime
            except OSError:
                continue
            m = _TMP_PID.search(p.name)
            alive = pid_alive(int(m.group(1))) if m else None
            if is_stale_tmp(p.name, idle_s=idle, pid_alive=alive):
                out.append(p)
    return out


def clean_stale_tmp(folders: Iterable[Path]) -> tuple[int, int]:
    """Removes the stale temporary files in `folders` (left by a kill -9 or a crash).

    Args:
        folders: e.g. the cache's images/ and features/ folders and a study's checkpoints/.

    Returns:
        (files removed, bytes freed).
    """
    n = freed = 0
    for p in stale_tmp_files(folders):
        try:
            size = p.stat().st_size
            p.unlink()
        except OSError:
            continue
        n, freed = n + 1, freed + size
    return n, freed


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (in this pid namespace)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    except OverflowError:
        return False
    return True
