"""What every search ends with, for `run`, `resume` and `demo`: the leaderboard, the report, the
best config, and how to continue an interrupted search."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from search.config import TLSearchError

# Exit codes of the `tlsearch` command (DESIGN.md): success, the work failed, bad input, interrupted.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def after_search(summary: Any, study: str, storage: str | None) -> int:
    """Prints the leaderboard, writes the report and best config; Ctrl-C says how to resume."""
    from search.studies import format_leaderboard, leaderboard, load_study

    st = load_study(study, storage=storage)
    print(format_leaderboard(leaderboard(st), top=10))
    write_outputs(study, storage)
    if getattr(summary, "interrupted", False):
        print(f"interrupted; continue with: tlsearch resume {study}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


def write_outputs(study: str, storage: str | None) -> dict[str, Path]:
    """Writes the report and, when there is a COMPLETE trial, best.yaml; returns their paths."""
    paths: dict[str, Path] = {}
    try:
        from search.report import write_report

        paths["report"] = write_report(study, storage=storage)
        print(f"report: {paths['report']}")
    except ImportError:
        pass
    try:
        from search.export import export_trial

        paths["best"] = export_trial(study, storage=storage)[0]
        print(f"best config: {paths['best']}")
    except TLSearchError as e:
        print(f"no best config: {e}", file=sys.stderr)
    return paths
