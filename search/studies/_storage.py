"""Study storage: URLs and opening a study.

A study lives in any Optuna storage. The default is SQLite at `studies/<study>.db`; `--storage`
takes any Optuna RDB URL (postgresql://, mysql://, sqlite://) or `journal:PATH` for a journal file
on shared storage.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from search.config import TLSearchError, default_storage_url

if TYPE_CHECKING:
    import optuna

# SQLite waits this long for a lock instead of failing with "database is locked" when a reader
# (tlsearch show, optuna-dashboard) and the search touch the file at once.
SQLITE_TIMEOUT_S = 60
# Opening a fresh database that another process is creating at that moment: tries, a moment apart.
SCHEMA_RACE_TRIES = 4


def get_storage(url: str) -> "optuna.storages.BaseStorage":
    """Opens an Optuna storage from a URL.

    Args:
        url: an RDB URL (sqlite:///..., postgresql://..., mysql://...) or `journal:PATH`.

    Returns:
        The storage object, shared by every reader and writer in this process.
    """
    import optuna

    if url.startswith("journal:"):
        path = url[len("journal:") :]
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(path))
    engine_kwargs: dict = {}
    if url.startswith("sqlite:"):
        db = url.split("///", 1)[-1]
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    for attempt in range(SCHEMA_RACE_TRIES):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except ImportError as e:
            raise TLSearchError(f"storage {_redact(url)} needs a database driver: {e}") from None
        except Exception as e:  # sqlalchemy raises many kinds for a bad URL or an unreachable server
            if _schema_race(e) and attempt + 1 < SCHEMA_RACE_TRIES:
                time.sleep(0.2 * (attempt + 1))  # the other process has created the tables by now
                continue
            raise TLSearchError(f"cannot open storage {_redact(url)}: {str(e).splitlines()[0]}") from None
    raise AssertionError("unreachable")


def _schema_race(e: Exception) -> bool:
    """Whether opening a new database failed because another process created its tables at the
    same moment (two drivers, or a driver and a reader, on a fresh study file)."""
    text = str(e)
    return type(e).__name__ in ("IntegrityError", "OperationalError") and (
        "alembic_version" in text or "already exists" in text)


def load_study(
    name: str, *, storage: str | None = None, studies_dir: str | Path = "studies"
) -> "optuna.Study":
    """Opens an existing study.

    Args:
        name: the study name.
        storage: its storage URL; None: `studies/<name>.db`.
        studies_dir: where default SQLite studies live.

    Returns:
        The Optuna study.
    """
    import optuna

    url = storage or default_storage_url(name, studies_dir=studies_dir)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).exists():
        raise TLSearchError(f"no study named {name!r} (no file {url[len('sqlite:///'):]})")
    try:
        return optuna.load_study(study_name=name, storage=get_storage(url))
    except KeyError:
        raise TLSearchError(f"no study named {name!r} in {_redact(url)}") from None


def _redact(url: str) -> str:
    """Hides a password in a database URL before it is printed."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url
