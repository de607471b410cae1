"""What tlsearch keeps on disk, and the bounds on it.

Three kinds of files grow with use:

- the caches under `default_cache_dir()`: decoded images (`images/`, see `search.data`) and frozen
  features (`features/`, see `search.features`); each folder has a byte budget and loses its least
  recently used files first (`trim_lru`);
- trial checkpoints, `studies/<study>/checkpoints/trial-N.pt`: when a trial ends, the checkpoints
  no longer worth keeping are removed (`checkpoints_to_remove`, a pure rule over the study's
  trials): those of PRUNED and failed trials, and those of COMPLETE trials outside the best
  `keep` of their backbone. A trial cut short by a stop (interrupted) keeps its checkpoint until a
  retry of it has ended;
- temporary files (`*.tmp`) a killed process left behind (`clean_stale_tmp`).

`cache_usage` and `clear` are what `tlsearch cache` shows and frees. Only the standard library is
imported here (optuna lazily), so the CLI stays light.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:
    import optuna

# A file read or written this recently is taken to be in use by a trial: LRU trimming skips it.
IN_USE_S = 60.0
# A temporary file nobody has written for this long is stale, whoever its writer was.
TMP_STALE_S = 3600.0
# A temporary file of a writer that is gone (its pid is dead on this host) is stale once idle for
# this long: a writer on another host that shares the folder keeps touching its file while it writes.
TMP_DEAD_WRITER_S = 60.0
# `checkpoint_removed/<trial number>` study user_attrs record checkpoints removed after their trial
# ended (Optuna keeps a finished trial's attributes read-only); one key per trial, so several
# drivers never overwrite each other's records.
REMOVED_KEY = "checkpoint_removed/"
# A RUNNING trial whose heartbeat is this recent belongs to a live search (runner.STALE_AFTER_S).
LIVE_HEARTBEAT_S = 120.0

_TMP_PID = re.compile(r"\.(\d+)(?:\.\d+)?\.tmp$")  # <name>.<pid>[.<thread>].tmp


# ----- least-recently-used trimming -----------------------------------------------------------------


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


# ----- temporary files ------------------------------------------------------------------------------


def tmp_name(path: Path) -> Path:
    """The temporary name a writer of `path` uses: `<name>.<pid>.tmp` (renamed to `path` when done).

    The pid tells `clean_stale_tmp` whether the writer is still alive.
    """
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


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


# ----- trial checkpoints ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointTrial:
    """What the checkpoint rule needs to know about one trial."""

    number: int  # the Optuna trial number
    state: str  # COMPLETE | PRUNED | FAIL | RUNNING | WAITING
    value: float | None = None  # the objective value (COMPLETE trials)
    backbone: str | None = None  # best-`keep` is counted per backbone
    interrupted: bool = False  # FAIL because a stop cut it short (it is retried)
    retry_of: int | None = None  # the interrupted trial this one retries
    has_checkpoint: bool = True  # a checkpoint is recorded and not removed yet


def checkpoints_to_remove(trials: Sequence[CheckpointTrial], *, maximize: bool, keep: int) -> list[int]:
    """Which trials' checkpoints are no longer needed (a pure rule; nothing is removed here).

    Kept: RUNNING and WAITING trials; the best `keep` COMPLETE trials of each backbone (ties: the
    earlier trial wins), so an ensemble can mix backbones; an interrupted trial until a retry of it
    has ended (the retry may resume from it). Removed: PRUNED trials, failed trials, the other
    COMPLETE trials and interrupted trials whose retry has ended.

    Args:
        trials: every trial of the study (trials without a checkpoint still count in the ranking).
        maximize: the study's direction.
        keep: COMPLETE checkpoints kept per backbone (>= 0).

    Returns:
        Trial numbers, ascending, of trials with a checkpoint to remove.
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    best: set[int] = set()
    by_backbone: dict[str | None, list[CheckpointTrial]] = {}
    for t in trials:
        if t.state == "COMPLETE" and _finite(t.value):
            by_backbone.setdefault(t.backbone, []).append(t)
    for group in by_backbone.values():
        group.sort(key=lambda t: ((-t.value if maximize else t.value), t.number))  # type: ignore[operator]
        best.update(t.number for t in group[:keep])
    retried = {t.retry_of for t in trials if t.retry_of is not None and t.state not in ("RUNNING", "WAITING")}
    out = []
    for t in trials:
        if not t.has_checkpoint or t.state in ("RUNNING", "WAITING"):
            continue
        if t.state == "COMPLETE" and t.number in best:
            continue
        if t.state == "FAIL" and t.interrupted and t.number not in retried:
            continue
        out.append(t.number)
    return sorted(out)


def checkpoint_trials(trials: Sequence["optuna.trial.FrozenTrial"],
                      removed: Iterable[int] = ()) -> list[CheckpointTrial]:
    """The study's trials as the checkpoint rule sees them.

    Args:
        trials: frozen trials of one study.
        removed: numbers of trials whose checkpoint is recorded as removed on the study.

    Returns:
        One CheckpointTrial per trial.
    """
    gone = set(removed)
    out = []
    for t in trials:
        attrs = t.user_attrs
        config = attrs.get("config") if isinstance(attrs.get("config"), dict) else {}
        retry_of = attrs.get("retry_of")
        out.append(CheckpointTrial(
            number=t.number,
            state=t.state.name,
            value=float(t.values[0]) if t.values else None,
            backbone=t.params.get("backbone", config.get("backbone")),
            interrupted=bool(attrs.get("interrupted")),
            retry_of=retry_of if isinstance(retry_of, int) else None,
            has_checkpoint=(bool(attrs.get("checkpoint")) and not attrs.get("checkpoint_removed")
                            and t.number not in gone),
        ))
    return out


def removed_on_study(study_attrs: dict[str, Any]) -> set[int]:
    """Trial numbers whose checkpoint the study records as removed (`REMOVED_KEY` attributes)."""
    out = set()
    for key in study_attrs:
        if key.startswith(REMOVED_KEY) and key[len(REMOVED_KEY):].isdigit():
            out.add(int(key[len(REMOVED_KEY):]))
    return out


def remove_file(path: str | os.PathLike[str] | None) -> int:
    """Removes one file if it is there; returns the bytes freed (0: nothing was there)."""
    if not path:
        return 0
    p = Path(path)
    try:
        size = p.stat().st_size
        p.unlink()
    except OSError:
        return 0
    return size


def prune_study_checkpoints(study: "optuna.Study", *, keep: int,
                            ending: CheckpointTrial | None = None) -> tuple[list[int], bool]:
    """Removes the checkpoints of the study's finished trials that the rule no longer keeps.

    The study (its storage) is the source of truth, so several drivers on one study agree: each
    decides from what the study holds now, and a trial it does not see yet can only make it keep
    more, never remove one of the best. Checkpoints of finished trials are recorded as removed on
    the study (`REMOVED_KEY`); the caller records the ending trial's own on that trial.

    Args:
        study: the Optuna study.
        keep: COMPLETE checkpoints kept per backbone.
        ending: the trial that is ending now (not told to the study yet), with its final state.

    Returns:
        (numbers of finished trials whose checkpoint was removed, whether `ending`'s checkpoint
        is to be removed: its file is removed here, its attributes are the caller's).
    """
    import optuna

    frozen = study.get_trials(deepcopy=False)
    gone = removed_on_study(study.user_attrs)
    trials = checkpoint_trials(frozen, gone)
    if ending is not None:
        trials = [t for t in trials if t.number != ending.number] + [ending]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    doomed = set(checkpoints_to_remove(trials, maximize=maximize, keep=keep))
    removed = []
    for t in frozen:
        if t.number in doomed and (ending is None or t.number != ending.number):
            remove_file(t.user_attrs.get("checkpoint"))
            with contextlib.suppress(Exception):  # a storage hiccup: the next trial's end retries
                study.set_user_attr(f"{REMOVED_KEY}{t.number}", True)
                removed.append(t.number)
    return removed, ending is not None and ending.number in doomed


# ----- what tlsearch cache shows and frees ----------------------------------------------------------


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
        if not _finite(beat):
            beat = t.datetime_start.timestamp() if t.datetime_start else now
        if now - beat < LIVE_HEARTBEAT_S:
            return t.number
    return None


def open_study_of(folder: Path) -> "optuna.Study | None":
    """The study of an experiment folder (its settings.yaml names the storage), or None."""
    from search.config import load_yaml
    from search.settings import SearchSettings
    from search.studies import load_study

    with contextlib.suppress(Exception):
        stored = load_yaml(folder / "settings.yaml")
        settings = SearchSettings.from_dict(stored)
        return load_study(settings.study, storage=settings.storage_url)
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
    from search.data import image_budget_bytes
    from search.features import DEFAULT_BUDGET_BYTES

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
        "features": {**feats.to_dict(), "budget_bytes": DEFAULT_BUDGET_BYTES},
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


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


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


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
