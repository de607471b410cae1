"""Atomic file writes and a file lock between processes, for every module that writes caches,
checkpoints, configs or reports (re-exported by `search.config`).

An atomic write goes to a temporary file next to the target, named with the process and thread,
and is then renamed over the target (`os.replace`): a reader sees the old file or the new one,
never half of one, and two writers never share a temporary file. The lock uses `fcntl` on POSIX
and `msvcrt` on Windows, imported only when a lock is taken, so the modules that lock import on
every platform.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

_WINDOWS = os.name == "nt"


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Writes UTF-8 text to `path` atomically, creating its folder.

    Args:
        path: the file to write.
        text: its new content.

    Returns:
        The path.
    """
    return _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Writes bytes to `path` atomically, creating its folder.

    Args:
        path: the file to write.
        data: its new content.

    Returns:
        The path.
    """
    return _atomic(path, lambda tmp: tmp.write_bytes(data))


def atomic_save(path: str | os.PathLike[str], obj: Any) -> Path:
    """`torch.save(obj, path)` atomically, creating its folder (a crash never leaves half a file).

    Args:
        path: the file to write.
        obj: what to save (a state_dict, a dict of tensors).

    Returns:
        The path.
    """
    import torch

    return _atomic(path, lambda tmp: torch.save(obj, tmp))


def tmp_path(path: str | os.PathLike[str]) -> Path:
    """The temporary name a writer of `path` uses before renaming it: `<name>.<pid>.<thread>.tmp`.

    The pid tells a later clean-up (`search.disk.clean_stale_tmp`) whether the writer still runs.
    """
    p = Path(path)
    return p.with_name(f"{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def _atomic(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(p)
    try:
        write(tmp)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return p


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Holds an exclusive lock on `path` (created if missing) between processes on this machine.

    A second process (or thread) asking for the same lock waits until the first one leaves the
    `with` block. The lock file itself is left in place; its folder must exist.

    Args:
        path: the lock file, e.g. `<target>.lock`.
    """
    fd = os.open(os.fspath(path), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _lock(fd)
        try:
            yield
        finally:
            _unlock(fd)
    finally:
        os.close(fd)


def _lock(fd: int) -> None:
    if _WINDOWS:
        import msvcrt

        while True:  # LK_LOCK gives up after about 10 s; a lock holder may build for minutes
            try:
                msvcrt.locking(fd, msvcrt.LK_LOCK, 1)  # the first byte, the same in every process
                return
            except OSError:
                continue
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX)


def _unlock(fd: int) -> None:
    if _WINDOWS:
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_UN)
