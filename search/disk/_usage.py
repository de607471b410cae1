"""What `tlsearch cache` shows and frees."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.studies import is_finite

if TYPE_CHECKING:
    import optuna

from search.disk._budgets import FEATURE_BUDGET_BYTES, image_budget_bytes
from search.disk._checkpoints import REMOVED_KEY
from search.disk._lru import _size
from search.disk._tmp import clean_stale_tmp, stale_tmp_files

# A RUNNING trial whose heartbeat is this recent belongs to a live search (runner.STALE_AFTER_S).
LIVE_HEARTBEAT_S = 120.0


@dataclass(frozen=True)
class FolderUsage:
    """Files of one kind in one folder."""

    path: str  # the folder
    files: int  # how many
    bytes: int  # their total size

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "files": self.files, "bytes": self.bytes}


def folder_usage(folder: Path, pattern: str) -> FolderUsage:
    """Counts the files matching `pattern` directly in `folder` (missing folder: none)."""
    n = size = 0
    with contextlib.suppress(OSError):
        for p in folder.glob(pattern):
            with contextlib.suppress(OSError):
                size += p.stat().st_size
                n += 1
    return FolderUsage(str(folder), n, size)


def study_folders(studies_dir: Path) -> list[Path]:
    """The experiment folders under studies_dir that hold a checkpoints/ folder, sorted by name."""
    with contextlib.suppress(OSError):
        return sorted(p for p in studies_dir.iterdir() if (p / "checkpoints").is_dir())
    return []


def search_running(study: "optuna.Study", *, now: float | None = None) -> int | None:
    """The number of a trial a live search is running on the study, or None.

    A RUNNING trial counts as live while its heartbeat is younger than LIVE_HEARTBEAT_S (when in
    doubt, a search is taken to be running: its checkpoints are never removed from under it).
    """
    import optuna

    now = time.time() if now is None else now
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        beat = t.user_attrs.get("heartbeat")
        if not is_finite(beat):
            beat = t.datetime_start.timestamp() if t.datetime_start else now
        if now - beat < LIVE_HEARTBEAT_S:
            return t.number
    return None


def open_study_of(folder: Path) -> "optuna.Study | None":
    """The study of an experiment folder (its settings.yaml names the storage), or None."""
    from search.config import load_yaml
    from search.studies import load_study

    with contextlib.suppress(Exception):
        # The stored keys, not `SearchSettings`: a study's name and storage are all it takes, and the
        # settings (they hold the search space) sit layers above the disk.
        stored = load_yaml(folder / "settings.yaml")
        return load_study(stored["study"], storage=stored.get("storage"),
                          studies_dir=stored.get("studies_dir") or "studies")
    with contextlib.suppress(Exception):
        return load_study(folder.name, studies_dir=folder.parent)
    return None


def cache_usage(cache_dir: Path, studies_dir: Path) -> dict[str, Any]:
    """What `tlsearch cache` shows: the caches, stale temporary files, checkpoints per study.

    Args:
        cache_dir: the cache root (`default_cache_dir()`).
        studies_dir: the studies folder (experiment folders with checkpoints/ inside).

    Returns:
        A JSON-ready dict: cache_dir, images, features (path, files, bytes, budget_bytes),
        temporary (stale files, bytes), checkpoints (one entry per study: study, path, files,
        bytes) and total_bytes.
    """
    images = folder_usage(cache_dir / "images", "*.u8")
    feats = folder_usage(cache_dir / "features", "*.pt")
    studies = study_folders(studies_dir)
    stale = stale_tmp_files([cache_dir / "images", cache_dir / "features", *(s / "checkpoints" for s in studies)])
    stale_bytes = sum(_size(p) for p in stale)
    ckpts = []
    for s in studies:
        u = folder_usage(s / "checkpoints", "*.pt")
        ckpts.append({"study": s.name, **u.to_dict()})
    total = images.bytes + feats.bytes + stale_bytes + sum(c["bytes"] for c in ckpts)
    return {
        "cache_dir": str(cache_dir),
        "images": {**images.to_dict(), "budget_bytes": image_budget_bytes()},
        "features": {**feats.to_dict(), "budget_bytes": FEATURE_BUDGET_BYTES},
        "temporary": {"files": len(stale), "bytes": stale_bytes},
        "checkpoints": ckpts,
        "total_bytes": total,
    }


def clear(cache_dir: Path, studies_dir: Path, *, checkpoints: bool = False, study: str | None = None,
          warn: Any = None) -> dict[str, Any]:
    """Frees the caches (and, when asked, trial checkpoints); what `tlsearch cache --clear` does.

    Cached images and features are rebuilt when next needed, so clearing them loses nothing.
    Checkpoints of a study with a live search are never removed (a warning names the study).

    Args:
        cache_dir: the cache root.
        studies_dir: the studies folder.
        checkpoints: also remove the trial checkpoints (every study, or `study`).
        study: only this study's checkpoints.
        warn: called with one line per study left alone; None: print to stderr.

    Returns:
        {"files": removed, "bytes": freed, "skipped": [studies left alone]}.
    """
    import sys

    warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr))
    n = freed = 0
    studies = study_folders(studies_dir)
    if study is not None:
        studies = [s for s in studies if s.name == study]
    k, b = clean_stale_tmp([cache_dir / "images", cache_dir / "features", *(s / "checkpoints" for s in studies)])
    n, freed = n + k, freed + b
    for folder, patterns in ((cache_dir / "images", ("*.u8", "*.bad.json", "*.lock")),
                             (cache_dir / "features", ("*.pt", "*.lock"))):
        for pattern in patterns:
            for p in _glob(folder, pattern):
                size = _size(p)
                if p.suffix == ".lock" and not _unlock_free(p):
                    continue  # a builder holds it now
                with contextlib.suppress(OSError):
                    p.unlink()
                    n, freed = n + 1, freed + size
    skipped = []
    if checkpoints:
        for s in studies:
            st = open_study_of(s)
            running = search_running(st) if st is not None else None
            if st is None:
                warn(f"checkpoints of {s.name} kept: cannot open its study to tell whether a search is running")
                skipped.append(s.name)
                continue
            if running is not None:
                warn(f"checkpoints of {s.name} kept: a search is running on it (trial {running})")
                skipped.append(s.name)
                continue
            numbers = {f"trial-{t.number}.pt": t.number for t in st.get_trials(deepcopy=False)}
            for p in _glob(s / "checkpoints", "*.pt"):
                size = _size(p)
                with contextlib.suppress(OSError):
                    p.unlink()
                    n, freed = n + 1, freed + size
                if p.name in numbers:
                    with contextlib.suppress(Exception):
                        st.set_user_attr(f"{REMOVED_KEY}{numbers[p.name]}", True)
    return {"files": n, "bytes": freed, "skipped": skipped}


def _glob(folder: Path, pattern: str) -> list[Path]:
    try:
        return list(folder.glob(pattern))
    except OSError:
        return []


def _unlock_free(path: Path) -> bool:
    """Whether nobody holds the lock file now (a builder holding it keeps it)."""
    try:
        import fcntl
    except ImportError:
        return True
    try:
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(f, fcntl.LOCK_UN)
        return True
    except OSError:
        return False


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
