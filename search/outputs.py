"""What every search ends with, for `run`, `resume` and `demo`: the leaderboard, the report, the
best config, and how to continue an interrupted search."""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import Any

from search.config import TLSearchError

# Exit codes of the `tlsearch` command (DESIGN.md): success, the work failed, bad input, interrupted.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


TOP_SHOWN = 5  # leaderboard rows printed at the end of a search

_run_log: list[Path] = []  # the log file of the search running (or last run) in this process


def note_run_log(path: Path) -> None:
    """Records where this process's search writes Ray's and Optuna's messages (`run_log`)."""
    _run_log[:] = [Path(path)]


def forget_run_log() -> None:
    """Starts a command with no search log noted: an error line names only a search it ran."""
    _run_log.clear()


def run_log() -> Path | None:
    """The log file of the search this process ran last, if it wrote one (for error lines)."""
    return _run_log[0] if _run_log and _run_log[0].is_file() else None


def after_search(summary: Any, study: str, storage: str | None, *, here: Path | None = None) -> int:
    """Ends `run`, `resume` and `demo`: the top of the leaderboard, the report and best config, and
    the exact commands that come next (or how to resume an interrupted search).

    Args:
        summary: the run's `RunSummary`.
        study: the study name.
        storage: the study's storage URL (None: studies/<study>.db).
        here: the folder the user typed the command in, when the search ran in another (the
            demo's --dir); printed paths and commands work from there. None: the working folder.

    Returns:
        The exit code.
    """
    if getattr(summary, "interrupted", False):
        try:
            _show_results(study, storage, here=here)
        finally:  # a second Ctrl-C while the report is written: still say how to go on
            print(resume_hint(study, storage, here=here), file=sys.stderr)
        return EXIT_INTERRUPTED
    st, paths = _show_results(study, storage, here=here)
    print(next_steps(study, storage, paths, dataset=st.user_attrs.get("dataset"),
                     weights_dir=(st.user_attrs.get("settings") or {}).get("weights_dir"), here=here))
    return EXIT_OK


def _show_results(study: str, storage: str | None, *, here: Path | None = None) -> tuple[Any, dict[str, Path]]:
    """Prints the top of the leaderboard and writes the report and best config; returns (the
    study, the paths written)."""
    from search.studies import leaderboard, load_study

    st = load_study(study, storage=storage)
    print(format_top(leaderboard(st), top=TOP_SHOWN))
    return st, write_outputs(study, storage, here=here)


def resume_hint(study: str, storage: str | None, *, here: Path | None = None) -> str:
    """The line an interrupted search ends with: how to continue it (from the search's own folder,
    where `resume` finds studies/<study>/, when the user stands elsewhere)."""
    cd = f"cd {_quote(_short(Path.cwd(), here))} && " if _elsewhere(here) else ""
    return f"interrupted; continue with: {cd}tlsearch resume {study}{_storage_flag(storage)}"


def is_interruption(error: BaseException) -> bool:
    """Whether an error ends the command as an interruption (exit 130), not as a failure.

    Ctrl-C raises KeyboardInterrupt wherever the program is; inside a storage write (a second
    Ctrl-C while the search records its trials) it can surface as another error raised from it or
    while handling it, such as Optuna's StorageInternalError. The study stays resumable then.

    Args:
        error: the exception that ended the command.

    Returns:
        True when it is a KeyboardInterrupt or one is in its chain (`__cause__`, `__context__`).
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        todo += [e.__cause__, e.__context__]
    return False


def format_top(df: Any, *, top: int = TOP_SHOWN) -> str:
    """The first `top` rows of a leaderboard, with the columns that tell configs apart.

    Args:
        df: `search.studies.leaderboard(study)`, best first.
        top: rows shown.

    Returns:
        A plain-text table and a line of counts by state.
    """
    from search.config import printable

    metric = df.attrs.get("metric") or "val_acc"
    cols = [c for c in ("rank", "trial", "state", "backbone", "pretrained", "freeze_depth", "augmentation", "lr",
                        "epochs_run", metric) if c in df.columns]

    def cell(col: str, v: Any) -> str:
        if v is None or (isinstance(v, float) and v != v) or v == "":
            return "-"
        if col == "lr":
            return f"{float(v):.1e}"
        if isinstance(v, float) and col != "rank":
            return f"{v:.4f}"
        return printable(str(v))

    rows = [cols] + [[cell(c, r.get(c)) for c in cols] for r in df.head(top).to_dict("records")]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    counts = df["state"].value_counts().to_dict() if len(df) else {}
    tally = ", ".join(f"{n} {state.lower()}" for state, n in counts.items())
    shown = f"top {min(top, len(df))} of {len(df)} trials" if len(df) > top else f"{len(df)} trials"
    return "\n".join([*lines, f"{shown}: {tally}" if tally else "no trials"])


def next_steps(study: str, storage: str | None, paths: dict[str, Path], *, dataset: str | None = None,
               weights_dir: str | None = None, here: Path | None = None) -> str:
    """The exact commands that take a finished study to a model, with this study's own names.

    Args:
        study: the study name.
        storage: its storage URL, when not the default.
        paths: what `write_outputs` wrote ("report", "best").
        dataset: the study's dataset folder (from the study's user_attrs).
        weights_dir: the --weights-dir the search used; train needs it too.
        here: the folder the commands are typed in (None: the working folder); paths are
            relative to it when inside it, else absolute.

    Returns:
        A few lines: show/export/train/predict commands.
    """
    if storage is None and _elsewhere(here):  # the default studies/<study>.db is not under `here`
        storage = f"sqlite:///{_short(Path('studies', study + '.db'), here)}"
    flag = _storage_flag(storage)
    data = _short(dataset, here) if dataset else "DATA"
    best = _short(paths.get("best", Path("reports", study, "best.yaml")), here)
    model = _short(Path("models", study), here)
    weights = f" --weights-dir {_quote(_short(weights_dir, here))}" if weights_dir else ""
    found = _an_image(dataset) if dataset else None
    image = _quote(_short(found, here)) if found else "IMAGE..."
    lines = ["next:"]
    lines += [
        f"  tlsearch show {study}{flag}   # the whole leaderboard",
        f"  tlsearch export {study}{flag} --trial N   # another trial's config (the best one is {best})",
        f"  tlsearch train {_quote(best)} {_quote(data)} --out {_quote(model)}{weights}   # retrain it, save a model",
        f"  tlsearch predict {_quote(model)} {image}   # classify images",
    ]
    return "\n".join(lines)


def _storage_flag(storage: str | None) -> str:
    return f" --storage {_quote(storage)}" if storage else ""


def _short(path: str | Path, here: Path | None = None) -> str:
    """A path (relative ones: to the working folder) as typed in `here` (None: the working folder):
    relative to it when inside it (shorter to read and type), else absolute."""
    p = Path(os.path.abspath(path))
    try:
        return str(p.resolve().relative_to(Path(here or Path.cwd()).resolve()))
    except (ValueError, OSError):
        return str(p)


def _elsewhere(here: Path | None) -> bool:
    """Whether the user's folder is not the working folder, so the default paths do not apply there."""
    try:
        return here is not None and Path(here).resolve() != Path.cwd().resolve()
    except OSError:
        return True


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(str(text))


def _an_image(dataset: str) -> Path | None:
    """One image of the dataset (a validation one where there is a val/ folder), for the example."""
    root = Path(dataset)
    for folder in (root / "val", root / "valid", root):
        if folder.is_dir():
            for p in itertools.islice(folder.rglob("*"), 2000):  # a big dataset is not listed in full
                if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp") and p.is_file():
                    return p
    return None


def write_outputs(study: str, storage: str | None, *, here: Path | None = None) -> dict[str, Path]:
    """Writes the report and, when there is a COMPLETE trial, best.yaml; returns their paths
    (printed as seen from `here`, see `after_search`)."""
    paths: dict[str, Path] = {}
    try:
        from search.report import write_report

        paths["report"] = write_report(study, storage=storage)
        print(f"report: {_short(paths['report'], here)}")
    except ImportError:
        pass
    try:
        from search.export import export_trial

        paths["best"] = export_trial(study, storage=storage)[0]
        print(f"best config: {_short(paths['best'], here)}")
    except TLSearchError as e:
        print(f"no best config: {e}", file=sys.stderr)
    return paths
